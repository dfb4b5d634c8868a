"""Paper §5.4 and appendix A.8: Preserve-First Merging (PFM), its tables, CCA merging and partial zipping.

Edge models: VGG16 pairs (the "preliminaries" recipe; consecutive seeds form the pairs) for Fig. 4 left,
Table 1, the CCA table (appendix Table 3), PFM against partial zipping (A.8.2) and the
preserved-layers explorer (A.8.1); ResNet20-BN pairs at ``resnet_width`` for appendix Table 7.
Every merged model is evaluated on the test set at α = ``cfg.alpha``; alignments and normalization
statistics use training images only (``n_match``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..cca import cca_matching
from ..config import Config
from ..data import VisionData, calibration_subset
from ..activations import example_input
from ..diagnose import feature_bias, vf_curve
from ..evaluate import evaluate
from ..flops import count_cost
from ..graph import Permutation, apply_permutation, identity_permutation
from ..matching import activation_matching
from ..merge import interpolate
from ..normalize import Fix, layer_stats, permute_stats, repair, reset_bn_stats, weighted_stats
from ..pfm import PreserveFirst, partial_zip, preserve_first
from ..structure import BN_TYPES, execution_order, repair_layers, structure_of
from ..zoo import info
from .claims import Claims, all_of
from .common import align, check_config, edge_configs, edge_models, match_data, seed_pairs, test_data

#: Table columns: the fixes compared for models without / with BatchNorm (paper Tables 1, 3 / 7, 8).
COLUMNS = {False: (Fix.NONE, Fix.REPAIR, Fix.RESCALE, Fix.BIAS_CALIBRATION), True: (Fix.NONE, Fix.RESET, Fix.REPAIR)}
FIG4_METHODS = {"wm": "weight matching", "am": "activation matching"}
#: CCA shrinkage values compared on training images (the default of cca_matching is 0.5).
CCA_SHRINKAGE = (1e-4, 0.1, 0.9)


@dataclass
class PairResult:
    """Everything measured on one pair of edge models of one architecture."""
    edge_acc: list[float]
    ensemble: float
    edge_cost: dict[str, float]
    table: dict[tuple[int, str], float] = field(default_factory=dict)      # (l, column) -> accuracy
    cost: dict[int, dict[str, float]] = field(default_factory=dict)        # l -> cost ratios
    cca: dict[tuple[int, str], float] = field(default_factory=dict)
    cca_cost: dict[int, dict[str, float]] = field(default_factory=dict)
    fig4: dict[tuple[str, Fix], np.ndarray] = field(default_factory=dict)  # (wm|am, NONE|fig4_fix) -> acc over l
    fig4_fix: Fix = Fix.REPAIR                                             # Fig. 4's fix: REPAIR, or RESET (BN)
    zip: dict[tuple[str, Fix], np.ndarray] = field(default_factory=dict)   # (pfm|zip, NONE|RESCALE) -> acc
    zip_cost: dict[str, np.ndarray] = field(default_factory=dict)          # pfm|zip -> params ratio
    explorer: dict[int, dict[str, Any]] = field(default_factory=dict)      # l -> curve, accuracy, ratios
    structure: dict[int, dict[str, Any]] = field(default_factory=dict)     # l -> what is preserved / averaged
    cca_reg: dict[float, dict[str, float]] = field(default_factory=dict)   # CCA shrinkage -> training accuracy
    models: tuple[nn.Module, nn.Module] | None = None                      # the edge pair, as loaded from the zoo
    perm: Permutation | None = None                                        # AM's alignment of model b to model a


@dataclass
class PFMResult:
    cfg: Config
    num_layers: int
    resnet_layers_total: int
    vgg: list[PairResult]
    resnet: list[PairResult]
    seconds: dict[str, float]
    n_test: int = 0

    @property
    def pairs(self) -> int:
        return len(self.vgg)

    def edge_mean(self, which: str = "vgg") -> float:
        return float(np.mean([np.mean(p.edge_acc) for p in getattr(self, which)]))


# ---------------------------------------------------------------------------------------------------
# helpers
def _acc(model: nn.Module, data: VisionData) -> float:
    return evaluate(model, data)["accuracy"]


def sweep(cfg: Config, L: int) -> list[int]:
    """The l grid of Fig. 4 left and the explorer: ``cfg.sweep_layers`` (bounded by ``resolve``), or every l
    from 0 to L."""
    return list(range(L + 1)) if cfg.sweep_layers is None else sorted(cfg.sweep_layers)


def resnet_config(cfg: Config) -> Config:
    """``cfg`` for the ResNet20-BN pairs of appendix Table 7: ``model`` resnet20 at ``resnet_width``, norm bn."""
    return cfg.replace(model="resnet20", model_width=cfg.resnet_width, norm="bn")


def fig4_fix(model: nn.Module) -> Fix:
    """The fix Fig. 4 left applies after merging: RESET for a model with BatchNorm (its running statistics
    must be re-estimated), else REPAIR (Eq. 2)."""
    return Fix.RESET if any(isinstance(m, BN_TYPES) for m in model.modules()) else Fix.REPAIR


def fig4_curves(a: nn.Module, b: nn.Module, am: Permutation, data: VisionData, mdata: VisionData, grid: Sequence[int],
                alpha: float, stats: tuple[dict, dict] | None = None, progress: bool = False
                ) -> tuple[Fix, dict[tuple[str, Fix], np.ndarray]]:
    """Paper Fig. 4 left: accuracy on ``data`` of the merge at ``alpha`` when only the first l layers of ``grid``
    are permuted (WM re-solved per l; AM ``am`` restricted), without and with :func:`fig4_fix`.

    Returns ``(fix, curves)`` with ``curves[(m, Fix.NONE)]`` and ``curves[(m, fix)]`` for m in wm, am. ``stats``:
    REPAIR's layer statistics of ``a`` and ``b`` on ``mdata`` (measured here if None; unused for RESET).
    """
    fix = fig4_fix(a)
    if fix is Fix.REPAIR and stats is None:
        rl = repair_layers(a)
        stats = (layer_stats(a, mdata, layers=rl), layer_stats(b, mdata, layers=rl))
    curves = {(m, norm): np.zeros(len(grid)) for m in FIG4_METHODS for norm in (Fix.NONE, fix)}
    for i, l in enumerate(tqdm(grid, desc="Fig. 4 left: permute the first l layers", disable=not progress,
                               leave=False)):
        for m in FIG4_METHODS:
            perm = align(a, b, "wm", mdata, layers=l) if m == "wm" else am.restrict(l)
            merged = interpolate(a, apply_permutation(b, perm), alpha)
            curves[(m, Fix.NONE)][i] = _acc(merged, data)
            if fix is Fix.REPAIR:
                tg = weighted_stats([stats[0], permute_stats(stats[1], perm)], [1 - alpha, alpha])
                curves[(m, fix)][i] = _acc(repair(merged, data=mdata, targets=tg), data)
            else:
                curves[(m, fix)][i] = _acc(reset_bn_stats(merged, mdata), data)
    return fix, curves


def _structure(p: PreserveFirst) -> dict[str, Any]:
    convs = [n for n in p.stem_layers]
    return {"preserved conv/linear layers (each stem)": ", ".join(convs) if convs else "none",
            "averaged values (fx nodes)": ", ".join(p.crossing),
            "merged conv/linear modules (incl. shortcuts)": len(p.tail_layers)}


def _ratio(c: dict[str, float], edge: dict[str, float]) -> dict[str, float]:
    return {"params": c["params"] / edge["params"], "flops": c["flops"] / edge["flops"]}


# ---------------------------------------------------------------------------------------------------
# the parts
def _vgg_pair(cfg: Config, a: nn.Module, b: nn.Module, data: VisionData, mdata: VisionData, diag: VisionData,
              x: torch.Tensor, L: int, seconds: dict[str, float], progress: bool, with_explorer: bool) -> PairResult:
    alpha = cfg.alpha
    bn = any(isinstance(m, BN_TYPES) for m in a.modules())
    cols = COLUMNS[bn]
    edge_cost = count_cost(a, x)
    pr = PairResult(edge_acc=[_acc(a, data), _acc(b, data)], ensemble=0.0, edge_cost=edge_cost, models=(a, b))
    t = time.perf_counter()
    am = pr.perm = activation_matching(a, b, mdata, example_input=x)
    seconds["activation matching"] = seconds.get("activation matching", 0) + time.perf_counter() - t
    pb = apply_permutation(b, am)
    pr.ensemble = _acc(preserve_first(a, b, am, layers=L, alpha=alpha), data)
    rl = repair_layers(a)
    stats_a, stats_b = layer_stats(a, mdata, layers=rl), layer_stats(b, mdata, layers=rl)

    direct = identity_permutation(am.spec)  # direct merging (same as perm=None, without re-tracing)
    t = time.perf_counter()
    pr.fig4_fix, pr.fig4 = fig4_curves(a, b, am, data, mdata, sweep(cfg, L), alpha, (stats_a, stats_b), progress)
    seconds["Fig. 4 left"] = seconds.get("Fig. 4 left", 0) + time.perf_counter() - t

    # Table 1: PFM_l with direct merging and AM + each normalization
    t = time.perf_counter()
    targets = weighted_stats([stats_a, permute_stats(stats_b, am)], [1 - alpha, alpha])
    for l in tqdm(cfg.pfm_layers, desc="Table 1", disable=not progress, leave=False):
        pr.table[(l, "Direct")] = _acc(preserve_first(a, b, direct, layers=l, alpha=alpha), data)
        for fix in cols:
            p = preserve_first(a, b, am, layers=l, alpha=alpha, normalize=fix, data=mdata, targets=targets)
            pr.table[(l, fix)] = _acc(p, data)
        pr.cost[l] = _ratio(count_cost(p, x), edge_cost)
        pr.structure[l] = _structure(p)
    seconds["Table 1"] = seconds.get("Table 1", 0) + time.perf_counter() - t

    # appendix Table 3: the same with CCA merging (networks without norm layers only)
    if not bn and cfg.norm == "none":
        t = time.perf_counter()
        for reg in CCA_SHRINKAGE:  # the shrinkage of the covariances, checked on training images
            c = cca_matching(a, b, mdata, example_input=x, reg=reg)
            pr.cca_reg[reg] = {"merged accuracy (training images)": _acc(interpolate(a, c.apply(b), alpha), mdata),
                               "largest condition number of T": max(float(torch.linalg.cond(t)) for t in c.transforms)}
        cca = cca_matching(a, b, mdata, example_input=x)
        partner = cca.apply(b)
        ctargets = weighted_stats([stats_a, layer_stats(partner, mdata, layers=rl)], [1 - alpha, alpha])
        for l in tqdm(cfg.pfm_layers, desc="CCA table", disable=not progress, leave=False):
            for fix in cols:
                p = preserve_first(a, b, cca, layers=l, alpha=alpha, normalize=fix, data=mdata, targets=ctargets)
                pr.cca[(l, fix)] = _acc(p, data)
            pr.cca_cost[l] = _ratio(count_cost(p, x), edge_cost)
        seconds["CCA"] = seconds.get("CCA", 0) + time.perf_counter() - t

    # appendix A.8.2: PFM (first n layers unmerged) against partial zipping (last n layers unmerged)
    t = time.perf_counter()
    zl = cfg.zip_layers
    znorm = Fix.RESET if bn else Fix.RESCALE
    for kind in ("pfm", "zip"):
        for norm in (Fix.NONE, znorm):
            pr.zip[(kind, norm)] = np.zeros(len(zl))
        pr.zip_cost[kind] = np.zeros(len(zl))
    for i, n in enumerate(tqdm(zl, desc="PFM vs partial zipping", disable=not progress, leave=False)):
        for kind, fn in (("pfm", preserve_first), ("zip", partial_zip)):
            for norm in (Fix.NONE, znorm):
                p = fn(a, b, am, layers=n, alpha=alpha, normalize=norm, data=mdata, targets=targets)
                pr.zip[(kind, norm)][i] = _acc(p, data)
            pr.zip_cost[kind][i] = count_cost(p, x)["params"] / edge_cost["params"]
    seconds["partial zipping"] = seconds.get("partial zipping", 0) + time.perf_counter() - t

    # appendix A.8.1 / the explorer: PFM_l (AM, no normalization) for every l
    if with_explorer:
        t = time.perf_counter()
        names = execution_order(a, x)
        edge_fbs = [feature_bias(a, diag, names=names), feature_bias(pb, diag, names=names)]
        for l in tqdm(sweep(cfg, L), desc="explorer: PFM_l over l", disable=not progress, leave=False):
            p = preserve_first(a, b, am, layers=l, alpha=alpha)
            pr.explorer[l] = {"curve": vf_curve(p, edge_fbs, diag), "accuracy": _acc(p, data),
                              **_ratio(count_cost(p, x), edge_cost)}
        seconds["explorer"] = seconds.get("explorer", 0) + time.perf_counter() - t
    return pr


def _resnet_pair(cfg: Config, a: nn.Module, b: nn.Module, data: VisionData, mdata: VisionData, x: torch.Tensor,
                 layers: list[int], progress: bool) -> PairResult:
    alpha = cfg.alpha
    edge_cost = count_cost(a, x)
    pr = PairResult(edge_acc=[_acc(a, data), _acc(b, data)], ensemble=0.0, edge_cost=edge_cost)
    am = activation_matching(a, b, mdata, example_input=x)
    L = am.spec.num_layers
    pr.ensemble = _acc(preserve_first(a, b, am, layers=L, alpha=alpha), data)
    direct = identity_permutation(am.spec)
    for l in tqdm(layers, desc="ResNet20 table", disable=not progress, leave=False):
        pr.table[(l, "Direct")] = _acc(preserve_first(a, b, direct, layers=l, alpha=alpha), data)
        for fix in (Fix.NONE, Fix.RESET):
            p = preserve_first(a, b, am, layers=l, alpha=alpha, normalize=fix, data=mdata)
            pr.table[(l, fix)] = _acc(p, data)
        pr.cost[l] = _ratio(count_cost(p, x), edge_cost)
        pr.structure[l] = _structure(p)
    return pr


def run(cfg: Config, progress: bool = True) -> PFMResult:
    """Train (or load) the edge pairs and compute every figure and table of the chapter."""
    check_config(cfg, "preserve_first_merging")
    torch.manual_seed(0)
    data, mdata = test_data(cfg), match_data(cfg)
    diag = mdata if cfg.n_diag >= len(mdata) else calibration_subset(mdata, cfg.n_diag, seed=2)
    seconds: dict[str, float] = {}
    vgg, resnet = [], []
    L = RL = 0
    for i, (s0, s1) in enumerate(seed_pairs(cfg.seeds)):
        t = time.perf_counter()
        a, b = edge_models(cfg, seeds=[s0, s1], progress=progress)
        seconds["edge models"] = seconds.get("edge models", 0) + time.perf_counter() - t
        x = example_input(data, model=a)
        L = structure_of(a).num_layers
        vgg.append(_vgg_pair(cfg, a, b, data, mdata, diag, x, L, seconds, progress, with_explorer=i == 0))
    rcfg = resnet_config(cfg)
    for s0, s1 in seed_pairs(cfg.seeds):
        t = time.perf_counter()
        a, b = edge_models(rcfg, seeds=[s0, s1], progress=progress)
        seconds["edge models"] = seconds.get("edge models", 0) + time.perf_counter() - t
        x = example_input(data, model=a)
        RL = structure_of(a).num_layers
        t = time.perf_counter()
        resnet.append(_resnet_pair(cfg, a, b, data, mdata, x, sorted(cfg.resnet_layers), progress))
        seconds["ResNet20 table"] = seconds.get("ResNet20 table", 0) + time.perf_counter() - t
    return PFMResult(cfg, L, RL, vgg, resnet, seconds, n_test=len(data))


# ---------------------------------------------------------------------------------------------------
# tables
def _fmt(values: Sequence[float], highlight_above: float | None = None) -> str:
    """Accuracy in % as ``mean`` (one pair) or ``mean ± std`` (several), bold above ``highlight_above``."""
    v = 100 * np.asarray(values, dtype=float)
    text = f"{v.mean():.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std():.2f}"
    return f"**{text}**" if highlight_above is not None and v.mean() > 100 * highlight_above else text


def _cost_cells(pairs: list[PairResult], ratio: dict[str, float] | None) -> dict[str, str]:
    """Params and FLOPs of a model as absolute numbers and as ratios to one edge model."""
    e = pairs[0].edge_cost
    r = ratio or {"params": 1.0, "flops": 1.0}
    return {"Params": f"{e['params'] * r['params'] / 1e6:.3f} M ({r['params']:.3g}×)",
            "FLOPs": f"{e['flops'] * r['flops'] / 1e6:.2f} M ({r['flops']:.3g}×)"}


def _pfm_table(pairs: list[PairResult], layers: Sequence[int], L: int, columns: list[Fix], attr: str,
               cost_attr: str, prefix: str) -> list[dict[str, str]]:
    edge = float(np.mean([np.mean(p.edge_acc) for p in pairs]))
    blank = {f"{prefix}{c.label}": "" for c in columns}
    rows = [{"Model": "Model 1", "Direct": _fmt([p.edge_acc[0] for p in pairs]), **blank, **_cost_cells(pairs, None)},
            {"Model": "Model 2", "Direct": _fmt([p.edge_acc[1] for p in pairs]), **blank, **_cost_cells(pairs, None)},
            {"Model": "Ensemble", "Direct": _fmt([p.ensemble for p in pairs]), **blank,
             **_cost_cells(pairs, {"params": 2.0, "flops": 2.0})}]
    for l in layers:
        row = {"Model": f"PFM {l}/{L}", "Direct": _fmt([p.table[(l, "Direct")] for p in pairs], edge)}
        for c in columns:
            row[f"{prefix}{c.label}"] = _fmt([getattr(p, attr)[(l, c)] for p in pairs], edge)
        rows.append({**row, **_cost_cells(pairs, getattr(pairs[0], cost_attr)[l])})
    return rows


def _pfm_values(pairs: list[PairResult], layers: Sequence[int], L: int, columns: list[Fix], attr: str,
                prefix: str) -> list[dict[str, Any]]:
    """The numbers behind :func:`_pfm_table`: accuracy (fraction, mean over this run's pairs) per row and column."""
    mean = lambda values: float(np.mean(values))  # noqa: E731
    rows = [{"Model": "Model 1", "Direct": mean([p.edge_acc[0] for p in pairs])},
            {"Model": "Model 2", "Direct": mean([p.edge_acc[1] for p in pairs])},
            {"Model": "Ensemble", "Direct": mean([p.ensemble for p in pairs])}]
    for l in layers:
        row: dict[str, Any] = {"Model": f"PFM {l}/{L}", "Direct": mean([p.table[(l, "Direct")] for p in pairs])}
        for c in columns:
            row[f"{prefix}{c.label}"] = mean([getattr(p, attr)[(l, c)] for p in pairs])
        rows.append(row)
    return rows


def table1_values(res: PFMResult) -> list[dict[str, Any]]:
    """Paper Table 1's accuracies as numbers (fractions; the mean over this run's pairs), in :func:`table1`'s
    layout: what the chapter records (:func:`vfnb.results.record_table`) for ``vfnb sweep``."""
    return _pfm_values(res.vgg, res.cfg.pfm_layers, res.num_layers, list(COLUMNS[res.cfg.norm == "bn"]), "table", "AM ")


def resnet_values(res: PFMResult) -> list[dict[str, Any]]:
    """Appendix Table 7's accuracies as numbers, in :func:`resnet_table`'s layout."""
    return _pfm_values(res.resnet, res.cfg.resnet_layers, res.resnet_layers_total, [Fix.NONE, Fix.RESET], "table", "AM ")


def table1(res: PFMResult) -> list[dict[str, str]]:
    """Paper Table 1 at this scale: PFM_{l/L} at α with direct merging and AM + each normalization,
    edge models and ensemble; accuracy in %, **bold** above the edge models' average."""
    bn = res.cfg.norm == "bn"
    cols = list(COLUMNS[bn])
    return _pfm_table(res.vgg, res.cfg.pfm_layers, res.num_layers, cols, "table", "cost", "AM ")


def cca_table(res: PFMResult) -> list[dict[str, str]]:
    """Appendix Table 3 at this scale: PFM with CCA merging (+ each normalization)."""
    if not res.vgg[0].cca:
        return []
    cols = list(COLUMNS[False])
    return _pfm_table(res.vgg, res.cfg.pfm_layers, res.num_layers, cols, "cca", "cca_cost", "CCA ")


def cca_reg_table(res: PFMResult) -> list[dict[str, Any]]:
    """CCA merging (l = 0, no normalization) for several covariance shrinkages, on training images."""
    return [{"shrinkage γ": reg, **{k: round(v, 3) for k, v in row.items()}}
            for reg, row in sorted(res.vgg[0].cca_reg.items())]


def resnet_table(res: PFMResult) -> list[dict[str, str]]:
    """Appendix Table 7 at this scale: PFM on ResNet20-BN with AM, without normalization and with RESET."""
    return _pfm_table(res.resnet, res.cfg.resnet_layers, res.resnet_layers_total, [Fix.NONE, Fix.RESET], "table",
                      "cost", "AM ")


def zip_table(res: PFMResult) -> list[dict[str, Any]]:
    """PFM (first n layers unmerged) against partial zipping (last n layers unmerged), AM-aligned."""
    pr = res.vgg[0]
    znorm = next(k[1] for k in pr.zip if k[1] is not Fix.NONE)
    rows = []
    for i, n in enumerate(res.cfg.zip_layers):
        def cell(kind: str, norm: str) -> str:
            return _fmt([p.zip[(kind, norm)][i] for p in res.vgg])
        rows.append({"unmerged layers n": n,
                     "PFM (first n)": cell("pfm", Fix.NONE), f"PFM + {znorm.label}": cell("pfm", znorm),
                     "params × (PFM)": f"{pr.zip_cost['pfm'][i]:.3g}",
                     "partial zip (last n)": cell("zip", Fix.NONE), f"zip + {znorm.label}": cell("zip", znorm),
                     "params × (zip)": f"{pr.zip_cost['zip'][i]:.3g}"})
    return rows


def structure_table(res: PFMResult, which: str = "vgg") -> list[dict[str, Any]]:
    """Per PFM_l of a table: the layers each stem preserves and the values averaged at the cut."""
    pr = getattr(res, which)[0]
    L = res.num_layers if which == "vgg" else res.resnet_layers_total
    return [{"model": f"PFM {l}/{L}", **pr.structure[l], "params ×": round(pr.cost[l]["params"], 3),
             "FLOPs ×": round(pr.cost[l]["flops"], 3)} for l in sorted(pr.structure)]


def training_table(cfg: Config) -> list[dict[str, Any]]:
    """Per edge model: architecture, seed, zoo key and the test accuracy stored in the zoo."""
    rcfg = resnet_config(cfg)
    rows = []
    for c in edge_configs(cfg) + edge_configs(rcfg):
        meta = info(c, cfg.cache_dir)
        rows.append({"model": c.model, "norm": c.model_kwargs.get("norm", ""),
                     "width": c.model_kwargs.get("width", ""), "seed": c.seed, "key": c.key, "epochs": c.epochs,
                     "test accuracy (full split)": round(meta["metrics"]["test_accuracy"], 4)})
    return rows


# ---------------------------------------------------------------------------------------------------
# figures
def plot_fig4(ax, res: PFMResult) -> None:
    """Paper Fig. 4 left: merged accuracy when only the first l layers are permuted (WM, AM; plain and
    with REPAIR), against the edge models' average."""
    from ..plots import plot_layer_sweep
    fix = res.vgg[0].fig4_fix
    curves = {}
    for m, name in FIG4_METHODS.items():
        curves[f"{name}"] = np.mean([p.fig4[(m, Fix.NONE)] for p in res.vgg], 0)
        curves[f"{name} + {fix.label}"] = np.mean([p.fig4[(m, fix)] for p in res.vgg], 0)
    plot_layer_sweep(ax, np.array(sweep(res.cfg, res.num_layers)), curves, edge_mean=res.edge_mean(),
                     xlabel="layers permuted (identity after l)", title="permute only the first l layers")


def plot_zip(ax, res: PFMResult) -> None:
    """Appendix A.8.2: accuracy against the parameter ratio for PFM and partial zipping (AM)."""
    from ..plots import plot_cost_curves
    pr = res.vgg[0]
    znorm = next(k[1] for k in pr.zip if k[1] is not Fix.NONE)
    curves = {}
    for kind, label in (("pfm", "PFM (first n unmerged)"), ("zip", "partial zip (last n unmerged)")):
        for norm in (Fix.NONE, znorm):
            name = label + ("" if norm is Fix.NONE else f" + {znorm.label}")
            curves[name] = (pr.zip_cost[kind], np.mean([p.zip[(kind, norm)] for p in res.vgg], 0))
    plot_cost_curves(ax, curves, edge_mean=res.edge_mean(), xlabel="parameters (× one edge model)",
                     title="PFM vs partial zipping at matching cost")


def render_explorer(res: PFMResult, l: int):
    """One frame of the preserved-layers explorer: the VF bound of PFM_l (left) against PFM_0, and
    accuracy over l with the parameter and FLOP ratios (right)."""
    from ..plots import figure, plot_layer_sweep, plot_vf_curves
    ex = res.vgg[0].explorer
    L = res.num_layers
    fig, ax = figure(2, width=5.4, height=3.4)
    curves = {f"PFM {l}/{L}": ex[l]["curve"]}
    if l != 0:
        curves["merged (PFM 0)"] = ex[0]["curve"]
    plot_vf_curves(ax[0], curves)
    ax[0].set_title(f"vanishing feature of PFM {l}/{L} (AM, no normalization)")
    grid = sorted(ex)
    plot_layer_sweep(ax[1], np.array(grid), {"PFM accuracy": np.array([ex[k]["accuracy"] for k in grid])},
                     edge_mean=res.edge_mean(), ensemble=float(np.mean([p.ensemble for p in res.vgg])),
                     xlabel="preserved layers l", current=l,
                     title=f"l = {l}: accuracy {ex[l]['accuracy']:.3f}, params {ex[l]['params']:.2f}×, "
                           f"FLOPs {ex[l]['flops']:.2f}×")
    return fig


# ---------------------------------------------------------------------------------------------------
# claims
def claims(res: PFMResult) -> list[dict[str, Any]]:
    """The paper's §5.4 / A.8 claims, each checked on this run: claim, whether it holds, the evidence.
    Accuracy comparisons hold only beyond the test-set noise (:mod:`vfnb.chapters.claims`)."""
    cl = Claims(n=res.n_test or None)
    edge = res.edge_mean()
    L = res.num_layers
    mean = lambda f: float(np.mean([f(p) for p in res.vgg]))  # noqa: E731
    note = "" if res.pairs > 1 else " (one edge pair)"
    fix = res.vgg[0].fig4_fix
    for m, name in FIG4_METHODS.items():
        curve = np.mean([p.fig4[(m, fix)] for p in res.vgg], 0)
        grid = sweep(res.cfg, L)
        rho = float(np.corrcoef(grid, curve)[0, 1]) if np.std(curve) > 0 else 0.0
        cl.add(f"Fig. 4 left ({name} + {fix.label}): accuracy rises with the number l of permuted layers",
               all_of(cl.greater(curve[-1], curve[0]), rho > 0),
               f"l = {grid[0]}: {curve[0]:.3f}, l = {grid[-1]}: {curve[-1]:.3f}, correlation with l {rho:.2f}{note}")
        cl.add(f"Fig. 4 left ({name}): even with every layer permuted, merging stays below the edge models",
               cl.less(float(curve.max()), edge), f"best {curve.max():.3f} vs edge average {edge:.3f}")
    ls = res.cfg.pfm_layers
    am = [mean(lambda p, l=l: p.table[(l, Fix.NONE)]) for l in ls]
    cl.add("PFM: accuracy (AM, no normalization) rises with l (and no step falls beyond noise)",
           all_of(cl.greater(am[-1], am[0]), all(cl.at_least(y, x) for x, y in zip(am, am[1:]))),
           ", ".join(f"l={l}: {v:.3f}" for l, v in zip(ls, am)))
    cols = list(COLUMNS[res.cfg.norm == "bn"])
    best = {l: max(mean(lambda p, l=l, c=c: p.table[(l, c)]) for c in cols) for l in ls}
    above = [l for l in ls if best[l] > edge]
    first = above[0] if above else None
    cost = res.vgg[0].cost
    cl.add("PFM exceeds the edge models' average at large l (paper: from l = 8 of 14 on CIFAR-10)",
           cl.greater(best[max(ls)], edge),
           (f"first l above the edge average {edge:.3f}: l = {first} ({best[first]:.3f}, "
            f"{cost[first]['params']:.2f}× params, {cost[first]['flops']:.2f}× FLOPs)") if above
           else f"best PFM {max(best.values()):.3f} vs edge average {edge:.3f}",
           paper="PFM 8/14 reaches the edges (CIFAR-10 VGG16)")
    mid = min(ls, key=lambda l: abs(l - round(8 * L / 14)))
    cl.add(f"PFM {mid}/{L} costs about 1.2× the parameters but more FLOPs (paper: 1.2× params, 1.67× FLOPs)",
           bool(1.05 < cost[mid]["params"] < 1.5 and cost[mid]["flops"] > cost[mid]["params"]),
           f"PFM {mid}/{L}: {cost[mid]['params']:.2f}× params, {cost[mid]['flops']:.2f}× FLOPs",
           paper="PFM 8/14: 1.2× params, 1.67× FLOPs")
    gap = [mean(lambda p, l=l: max(p.table[(l, c)] for c in cols[1:]) - p.table[(l, Fix.NONE)]) for l in ls]
    cl.add("Normalization matters less as more layers are preserved", bool(gap[-1] < gap[0]),
           ", ".join(f"l={l}: +{g:.3f}" for l, g in zip(ls, gap)) + " (best normalization over none)")
    if res.vgg[0].cca:
        c0 = mean(lambda p: p.cca[(ls[0], Fix.NONE)])
        a0 = mean(lambda p: p.table[(ls[0], Fix.NONE)])
        cbest = [max(mean(lambda p, l=l, c=c: p.cca[(l, c)]) for c in cols) for l in ls]
        cl.add("CCA merging beats AM merging without normalization (Table 3 vs Table 1, l = 0)", cl.greater(c0, a0),
               f"CCA {c0:.3f} vs AM {a0:.3f} (±{cl.margin(c0, a0):.3f})")
        cl.add("PFM also improves CCA merging", cl.greater(cbest[-1], cbest[0]),
               ", ".join(f"l={l}: {v:.3f}" for l, v in zip(ls, cbest)) + " (best normalization)")
    if res.resnet:
        rl = res.cfg.resnet_layers
        r_edge = res.edge_mean("resnet")
        reset = [float(np.mean([p.table[(l, Fix.RESET)] for p in res.resnet])) for l in rl]
        plain = [float(np.mean([p.table[(l, Fix.NONE)] for p in res.resnet])) for l in rl]
        cl.add("ResNet20-BN (Table 7): RESET is essential, and PFM with RESET rises with l",
               all_of(cl.greater(reset[0], plain[0]), cl.greater(reset[-1], reset[0])),
               f"l = {rl[0]}: {plain[0]:.3f} → {reset[0]:.3f} with RESET; l = {rl[-1]}: {reset[-1]:.3f} "
               f"(edges {r_edge:.3f})")
    pr = res.vgg[0]
    znorm = next(k[1] for k in pr.zip if k[1] is not Fix.NONE)
    zl = res.cfg.zip_layers
    wins = [n for i, n in enumerate(zl) if 0 < n < L
            and cl.at_least(float(np.mean([p.zip[("pfm", znorm)][i] for p in res.vgg])),
                            float(np.mean([p.zip[("zip", znorm)][i] for p in res.vgg])))]
    inner = [n for n in zl if 0 < n < L]
    cl.add(f"PFM beats partial zipping with the same number of unmerged layers (with {znorm.label})",
           len(wins) >= max(1, len(inner) - 1),
           f"PFM ≥ partial zipping (or within noise) at n = {wins} of {inner}")
    # at matching parameter cost: PFM's accuracy interpolated at each partial-zipping model's cost
    pc, zc = pr.zip_cost["pfm"], pr.zip_cost["zip"]
    for norm in (Fix.NONE, znorm):
        pa = np.mean([p.zip[("pfm", norm)] for p in res.vgg], 0)
        za = np.mean([p.zip[("zip", norm)] for p in res.vgg], 0)
        order = np.argsort(pc)
        pts = [(c, float(np.interp(c, pc[order], pa[order])), float(a)) for c, a in zip(zc, za)
               if pc.min() <= c <= pc.max()]
        if pts:
            ok = sum(cl.at_least(p_, z_) for _, p_, z_ in pts)
            cl.add("At matching parameter cost PFM beats partial zipping (or ties within noise)"
                   + ("" if norm is Fix.NONE else f" (with {znorm.label})"), ok >= len(pts) - 1 and ok > 0,
                   "; ".join(f"{c:.2f}×: PFM {p_:.3f} vs zip {z_:.3f}" for c, p_, z_ in pts))
    return cl.table()


# ---------------------------------------------------------------------------------------------------
# what each figure shows at this scale, with this run's numbers
def notes(res: PFMResult) -> dict[str, str]:
    """One Markdown paragraph per part of the chapter, stating what this run measured."""
    L, edge = res.num_layers, res.edge_mean()
    pairs = ("one edge pair (the profile's seeds form one pair, so there is no spread to report)" if res.pairs == 1
             else f"{res.pairs} edge pairs (mean ± std over pairs)")
    mean = lambda f, which="vgg": float(np.mean([f(p) for p in getattr(res, which)]))  # noqa: E731
    out: dict[str, str] = {}
    grid = sweep(res.cfg, L)
    fix = res.vgg[0].fig4_fix
    norm = fix.label
    f4 = {k: np.mean([p.fig4[k] for p in res.vgg], 0) for k in res.vgg[0].fig4}
    out["fig4"] = (
        f"Measured on {pairs}. Edge models: {100 * edge:.2f} % on average. With weight matching on the first l layers only, "
        f"the merged midpoint goes from {100 * f4[('wm', Fix.NONE)][0]:.2f} % (l = {grid[0]}) to {100 * f4[('wm', Fix.NONE)][-1]:.2f} % "
        f"(l = {grid[-1]}); with {norm} from {100 * f4[('wm', fix)][0]:.2f} % to {100 * f4[('wm', fix)][-1]:.2f} %. "
        f"Activation matching: {100 * f4[('am', Fix.NONE)][0]:.2f} % → {100 * f4[('am', Fix.NONE)][-1]:.2f} %, with {norm} "
        f"{100 * f4[('am', fix)][0]:.2f} % → {100 * f4[('am', fix)][-1]:.2f} %. The best point of any curve is "
        f"{100 * (max(v.max() for v in f4.values())):.2f} %, "
        + ("still below the edge models." if max(v.max() for v in f4.values()) < edge else "at or above the edge models here."))
    ls = res.cfg.pfm_layers
    cols = list(COLUMNS[res.cfg.norm == "bn"])
    best = {l: max((mean(lambda p, l=l, c=c: p.table[(l, c)]), c) for c in cols) for l in ls}
    above = [l for l in ls if best[l][0] > edge]
    cost = res.vgg[0].cost
    ens = mean(lambda p: p.ensemble)
    out["table1"] = (
        f"Measured on {pairs}; accuracy in %, **bold** where above the edge models' average ({100 * edge:.2f} %). "
        f"Without preserved layers the best AM column is {best[ls[0]][1].label} with {100 * best[ls[0]][0]:.2f} %. "
        + (f"PFM first exceeds the edge average at l = {above[0]} ({best[above[0]][1].label}: {100 * best[above[0]][0]:.2f} %) "
           f"for {cost[above[0]]['params']:.2f}× the parameters and {cost[above[0]]['flops']:.2f}× the FLOPs; "
           if above else f"No PFM row exceeds the edge average here (best {100 * max(b[0] for b in best.values()):.2f} %); ")
        + f"the ensemble reaches {100 * ens:.2f} % for 2× both. MNIST is close to its ceiling, so the edge models leave "
          f"little room: differences of a few tenths of a percent are within the noise of a {res.n_test:,}-image test set.")
    if res.resnet:
        rl = res.cfg.resnet_layers
        r = {(l, c): mean(lambda p, l=l, c=c: p.table[(l, c)], "resnet") for l in rl for c in ("Direct", Fix.NONE, Fix.RESET)}
        out["resnet"] = (
            f"ResNet20-BN (width {res.cfg.resnet_width:g}), {pairs}; edge average {100 * (res.edge_mean('resnet')):.2f} %. At "
            f"l = {rl[0]}: direct {100 * (r[(rl[0], 'Direct')]):.2f} %, AM {100 * (r[(rl[0], Fix.NONE)]):.2f} %, AM + RESET "
            f"{100 * (r[(rl[0], Fix.RESET)]):.2f} %. At l = {rl[-1]}: AM + RESET {100 * (r[(rl[-1], Fix.RESET)]):.2f} % for "
            f"{res.resnet[0].cost[rl[-1]]['params']:.2f}× the parameters. The cut after layer l falls inside a residual "
            f"block for even l: the stems then hand over two averaged values, the residual stream and the block's inner "
            f"branch (see the structure table).")
    if res.vgg[0].cca:
        c = {(l, k): mean(lambda p, l=l, k=k: p.cca[(l, k)]) for l in ls for k in cols}
        out["cca"] = (
            f"CCA merging at l = {ls[0]}: {100 * (c[(ls[0], Fix.NONE)]):.2f} % without normalization (AM: "
            f"{mean(lambda p: p.table[(ls[0], Fix.NONE)]):.3f}), {100 * (c[(ls[0], Fix.REPAIR)]):.2f} % with REPAIR and "
            f"{100 * (c[(ls[0], Fix.RESCALE)]):.2f} % with RESCALE; at l = {ls[-1]}: "
            f"{100 * (max(c[(ls[-1], k)] for k in cols)):.2f} % (best column). The CCA maps are general invertible matrices, "
            f"so model b's stem keeps its own weights and the map T is applied to its output (a few extra parameters, "
            f"visible in the Params column).")
    pr = res.vgg[0]
    znorm = next(k[1] for k in pr.zip if k[1] is not Fix.NONE)
    zl = res.cfg.zip_layers
    zm = {k: np.mean([p.zip[k] for p in res.vgg], 0) for k in pr.zip}
    i8 = min(range(len(zl)), key=lambda i: abs(zl[i] - round(8 * L / 14)))
    out["zip"] = (
        f"With n = {zl[i8]} unmerged layers, PFM reaches {100 * zm[('pfm', Fix.NONE)][i8]:.2f} % "
        f"({100 * zm[('pfm', znorm)][i8]:.2f} % with {znorm.label}) at {pr.zip_cost['pfm'][i8]:.2f}× the parameters; partial "
        f"zipping reaches {100 * zm[('zip', Fix.NONE)][i8]:.2f} % ({100 * zm[('zip', znorm)][i8]:.2f} %) at "
        f"{pr.zip_cost['zip'][i8]:.2f}×. Keeping the last layers unmerged is expensive in parameters (VGG's late layers "
        f"are its widest) and cheap in FLOPs; keeping the first layers is the opposite.")
    ex = pr.explorer
    if ex:
        g = sorted(ex)
        out["explorer"] = (
            f"The bound of the plain merged model (l = 0) ends at {100 * (ex[g[0]]['curve'].bound[-1]):.2f} % of the edge "
            f"models' feature norm; with l = {g[len(g) // 2]} preserved layers at "
            f"{100 * (ex[g[len(g) // 2]]['curve'].bound[-1]):.2f} %; with l = {g[-1]} at {100 * (ex[g[-1]]['curve'].bound[-1]):.2f} %. "
            f"Accuracy (AM, no normalization) goes from {100 * (ex[g[0]]['accuracy']):.2f} % to {100 * (ex[g[-1]]['accuracy']):.2f} %.")
    return out


# ---------------------------------------------------------------------------------------------------
# appendix A.8.5: the other settings, as parameter sets of this chapter
#: Paper table -> (what it is, the parameters that reach it, what this chapter computes of it). Every parameter
#: set is validated by the tests (``vfnb.resolve``), so the commands on the page always run.
PARAMETER_SETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "Table 1": ("VGG16, CIFAR-10, activation matching", {"dataset": "cifar10"}, "all of it (the chapter's default)"),
    "Table 3": ("VGG16, CIFAR-10, CCA merging", {"dataset": "cifar10"}, "all of it (the CCA table)"),
    "Table 4": ("VGG16-BN, CIFAR-10, CCA merging", {"dataset": "cifar10", "norm": "bn"},
                "not computed: CCA merging of BatchNorm networks is not implemented"),
    "Table 6": ("VGG16, CIFAR-10, ZipIt! merging", {"dataset": "cifar10"},
                "not computed: PFM with a ZipIt! alignment is not implemented (partial zipping, A.8.2, is)"),
    "Table 7": ("ResNet20, CIFAR-10, activation matching and ZipIt!", {"dataset": "cifar10"},
                "the activation-matching columns (the ResNet20 table)"),
    "Table 8": ("VGG16-BN, CIFAR-10, activation matching and ZipIt!", {"dataset": "cifar10", "norm": "bn"},
                "the activation-matching columns, with RESET (Table 1 switches to RESET / REPAIR for BatchNorm)"),
    "Table 9": ("VGG16-BN, CIFAR-100, activation matching and ZipIt!", {"dataset": "cifar100", "norm": "bn"},
                "the activation-matching columns"),
    "Table 10": ("VGG16, CIFAR-100", {"dataset": "cifar100"}, "all of it (Table 1's layout)"),
    "Table 11": ("VGG16, CIFAR-100, ZipIt! merging", {"dataset": "cifar100"},
                 "not computed: PFM with a ZipIt! alignment is not implemented"),
}


def parameter_sets_table(profile: str = "paper") -> list[dict[str, str]]:
    """Appendix A.8.5: each paper table of PFM in another setting, the command that runs this chapter in that
    setting at ``profile``, and what of the table the chapter computes."""
    rows = []
    for table, (what, params, covered) in PARAMETER_SETS.items():
        args = " ".join(f"-p {k} {v}" for k, v in params.items())
        rows.append({"paper": table, "setting": what, "command": f"python -m vfnb run 05_4 --profile {profile} {args}",
                     "this chapter computes": covered})
    return rows
