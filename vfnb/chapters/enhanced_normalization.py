"""Paper §5.3 (Fig. 2), appendices A.5.1 and A.6: post-merging normalizations that
target the vanishing feature, with weight matching and with ZipIt!.

Two VGG edge models (no normalization) from the zoo are merged along θ_α, after aligning model 1 to
model 0 by weight matching (WM), or zipped by ZipIt!, and then normalized by one of:

- **no normalization**: the merged model as is;
- **REPAIR** (Eq. 2): every channel's pre-activation gets the α-weighted mean and std of the edges';
- **RESCALE**: the same without centering (only the std is matched);
- **bias removal**: the biases of the last k conv/linear layers are zeroed, with k chosen on a
  validation split of the *training* images at α = 0.5 (the paper's code picked it on the test set);
- **bias calibration**: the bias of layer l becomes (1−α)^l b₀ + α^l b₁.

REPAIR/RESCALE statistics and ZipIt!'s correlations are measured on training images
(``n_match``), k is chosen on ``n_val`` other training images, and accuracy, logits and the
vanishing-feature bound are measured on test images. A second pair of edge models trained with
each weight decay of ``compare_weight_decay`` (the recipe otherwise unchanged) shows how the
training recipe decides which normalization wins (paper appendix A.4).
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import example_input
from ..config import Config
from ..data import VisionData, calibration_subset, load_dataset, train_val_split
from ..diagnose import FeatureBias, LogitStats, VFCurve, feature_bias, logit_stats, vf_curve
from ..evaluate import evaluate, interpolation_curve
from ..graph import Permutation, apply_permutation
from ..matching import weight_matching
from ..merge import calibrate_bias, interpolate
from ..normalize import Fix, layer_stats, remove_bias, repair, rescale, weighted_stats
from ..plots import color
from ..structure import conv_linear_layers
from ..zipit import Zip, zipit_matching
from ..zoo import info
from .claims import TIE, Claims, all_of, compare, noise_margin
from .common import check_config, edge_configs, edge_models, test_data

#: The fixes compared, by their labels (:class:`vfnb.normalize.Fix`).
FIXES = (Fix.NONE, Fix.REPAIR, Fix.RESCALE, Fix.BIAS_REMOVAL, Fix.BIAS_CALIBRATION)
METHODS = tuple(f.label for f in FIXES)
MATCHINGS = ("weight matching", "ZipIt!")
#: One colour per method, the book's (:func:`vfnb.plots.color`).
METHOD_COLORS = {m: color(m) for m in METHODS}
MATCHING_STYLE = {"weight matching": "-", "ZipIt!": "--"}
#: Dash patterns of the A.5.1 curves, one per method, so curves that coincide stay distinguishable.
VF_DASHES = ("-", (0, (6, 2)), (0, (2, 1.5)), (0, (6, 2, 1.5, 2)), (0, (1, 1)))


@dataclass
class Diagnosis:
    """The vanishing-feature curve and the output logits of one merged model."""

    vf: VFCurve
    logits: LogitStats


@dataclass
class Pair:
    """Two aligned edge models and everything needed to build any normalized merged model."""

    edges: list[nn.Module]
    wm: Permutation
    zip: Zip
    stats: dict[str, Any]  # "edge0", "wm partner", "edge1": layer_stats on the calibration images

    @property
    def partner(self) -> nn.Module:
        """Edge model 1 permuted onto edge model 0 by weight matching."""
        return apply_permutation(self.edges[1], self.wm)


@dataclass
class NormalizationResult:
    """Everything the §5.3 chapter shows."""

    cfg: Config
    pair: Pair
    edge_metrics: list[dict[str, float]]
    edge_fb: list[FeatureBias]
    edge_logits: list[LogitStats]
    direct: dict[str, np.ndarray]                               # unaligned interpolation (reference)
    k: dict[str, int]                                           # matching -> backward bias-removal k
    removal: dict[str, dict[str, np.ndarray]]                   # matching -> A.6 curves at α = 0.5
    curves: dict[tuple[str, str], dict[str, np.ndarray]]        # (matching, method) -> α, accuracy, loss
    diagnosis: dict[tuple[str, str, float], Diagnosis]          # (matching, method, α)
    offsets: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # matching -> model -> per layer
    compare: list[dict[str, Any]] = field(default_factory=list)  # weight-decay comparison rows
    degenerate: dict[str, int] = field(default_factory=dict)     # REPAIR/RESCALE dead-channel warnings
    seconds: dict[str, float] = field(default_factory=dict)
    n_eval: int = 0                                              # test images behind every accuracy

    @property
    def alphas(self) -> list[float]:
        return [float(a) for a in self.curves[(MATCHINGS[0], METHODS[0])]["alpha"]]

    @property
    def edge_accuracy(self) -> float:
        return float(np.mean([m["accuracy"] for m in self.edge_metrics]))

    def at(self, matching: str, method: str, alpha: float | None = None) -> float:
        """Test accuracy of one merged model on the α grid (default: the configured α)."""
        c = self.curves[(matching, method)]
        a = self.cfg.alpha if alpha is None else alpha
        return float(c["accuracy"][int(np.argmin(np.abs(c["alpha"] - a)))])

    @property
    def diag_alphas(self) -> list[float]:
        """The α values with a vanishing-feature curve and logits (see :func:`diagnosed_alphas`)."""
        return sorted({a for (_, _, a) in self.diagnosis})

    def nearest(self, alpha: float) -> float:
        """The diagnosed α closest to ``alpha``."""
        return min(self.diag_alphas, key=lambda a: abs(a - alpha))


# ---------------------------------------------------------------------------------------------------
def _check(cfg: Config) -> None:
    check_config(cfg, "enhanced_normalization")
    if cfg.norm != "none":
        raise ValueError(f"this chapter compares normalizations of VGG models *without* norm layers (bias "
                         f"calibration refuses BatchNorm); got norm={cfg.norm!r}")
    if not cfg.model.startswith("vgg"):
        raise ValueError(f"ZipIt! here needs a sequential network (a VGG); got model={cfg.model!r}")


def splits(cfg: Config) -> tuple[VisionData, VisionData]:
    """(calibration, validation): disjoint subsets of the *training* images. Calibration (``n_match``)
    feeds ZipIt! and REPAIR/RESCALE; validation (``n_val``) chooses k for bias removal."""
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    if cfg.n_val >= len(train):
        raise ValueError(f"n_val={cfg.n_val} leaves no training images for calibration ({len(train)} in all)")
    rest, val = train_val_split(train, cfg.n_val, seed=0)
    calib = rest if cfg.n_match >= len(rest) else calibration_subset(rest, cfg.n_match, seed=1)
    return calib, val


def align(cfg: Config, edges: list[nn.Module], calib: VisionData) -> Pair:
    """Weight matching and ZipIt! for one pair of edge models, and their REPAIR statistics."""
    x = example_input(calib, model=edges[0])
    wm = weight_matching(edges[0], edges[1], x, seed=0)
    z = zipit_matching(edges[0], edges[1], calib, example_input=x, decay=cfg.zip_alpha, beta=cfg.zip_beta)
    partner = apply_permutation(edges[1], wm)
    stats = {"edge0": layer_stats(edges[0], calib), "wm partner": layer_stats(partner, calib),
             "edge1": layer_stats(edges[1], calib)}
    return Pair(edges, wm, z, stats)


def merged_model(pair: Pair, matching: str, method: str, alpha: float, calib: VisionData, k: int = 0,
                 counter: dict[str, int] | None = None) -> nn.Module:
    """The merged model θ_α of ``matching`` ("weight matching" | "ZipIt!") after ``method`` (one of
    :data:`METHODS`); ``k`` is the number of backward-removed biases for "bias removal"."""
    if matching not in MATCHINGS:
        raise ValueError(f"unknown matching {matching!r}; choose one of {', '.join(MATCHINGS)}")
    fix = Fix.parse(method, FIXES, "method")
    e0, e1 = pair.edges
    wm = matching == "weight matching"
    if fix is Fix.BIAS_CALIBRATION:
        return calibrate_bias(e0, pair.partner, alpha) if wm else pair.zip.merge(e0, e1, alpha, bias_calibration=True)
    base = interpolate(e0, pair.partner, alpha) if wm else pair.zip.merge(e0, e1, alpha)
    if fix is Fix.NONE:
        return base
    if fix is Fix.BIAS_REMOVAL:
        return remove_bias(base, last=k)
    targets = (weighted_stats([pair.stats["edge0"], pair.stats["wm partner"]], [1 - alpha, alpha]) if wm
               else pair.zip.target_stats(pair.stats["edge0"], pair.stats["edge1"], alpha))
    normalize = repair if fix is Fix.REPAIR else rescale
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        out = normalize(base, data=calib, targets=targets)
    if counter is not None:
        counter[method] = counter.get(method, 0) + sum("zero variance" in str(w.message) for w in caught)
    return out


@torch.no_grad()
def removal_curves(pair: Pair, matching: str, calib: VisionData, val: VisionData, test: VisionData | None,
                   alpha: float = 0.5, forward: bool = True) -> dict[str, np.ndarray]:
    """Appendix A.6 at α: accuracy after zeroing the biases of the last k ("backward", on validation and
    test images) or of the first k ("forward", test images; only if ``forward``) conv/linear layers,
    k = 0..L (``test=None``: validation only): ``vfnb.remove_bias(base, last=k)`` (or ``first=k``), applied in
    place to one copy, one more layer at a time."""
    base = merged_model(pair, matching, "no normalization", alpha, calib)
    layers = conv_linear_layers(base)
    ks = np.arange(len(layers) + 1)
    out: dict[str, list[float]] = {"backward (validation)": []}
    directions = ["backward"] + (["forward"] if forward and test is not None else [])
    for direction in directions:
        model = copy.deepcopy(base)
        for k in ks:
            with warnings.catch_warnings():  # a layer without bias changes nothing, as expected
                warnings.simplefilter("ignore", RuntimeWarning)
                remove_bias(model, **{"last" if direction == "backward" else "first": int(k)}, inplace=True)
            if direction == "backward":
                out["backward (validation)"].append(evaluate(model, val)["accuracy"])
            if test is not None:
                out.setdefault(f"{direction} (test)", []).append(evaluate(model, test)["accuracy"])
    return {"k": ks, **{name: np.array(v) for name, v in out.items()}}


def choose_k(curves: dict[str, np.ndarray]) -> int:
    """The number of backward-removed biases with the best *validation* accuracy (smallest on ties)."""
    return int(curves["k"][int(np.argmax(curves["backward (validation)"]))])


def diagnosed_alphas(alphas: list[float], alpha: float) -> list[float]:
    """Every second point of the α grid, both ends and the configured α: where the vanishing-feature
    curve and the logits are measured (the explorer's slider). Accuracy uses the whole grid."""
    keep = set(alphas[::2]) | {alphas[0], alphas[-1]} | {min(alphas, key=lambda a: abs(a - alpha))}
    return [a for a in alphas if a in keep]


def run(cfg: Config, progress: bool = True) -> NormalizationResult:
    """Load the edge models, align them by WM and ZipIt!, choose k, and measure every (matching,
    method, α): test accuracy, vanishing-feature curve and logits; then the weight-decay comparison."""
    _check(cfg)
    torch.manual_seed(0)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    edges = edge_models(cfg, seeds=list(cfg.seeds[:2]), progress=progress)
    test = test_data(cfg)
    calib, val = splits(cfg)
    diag = test if cfg.n_diag >= len(test) else calibration_subset(test, cfg.n_diag, seed=2)
    seconds["edge models"] = time.perf_counter() - t0
    t = time.perf_counter()
    pair = align(cfg, edges, calib)
    seconds["alignment (WM, ZipIt!, statistics)"] = time.perf_counter() - t
    edge_fb = [feature_bias(e, diag) for e in edges]
    t = time.perf_counter()
    removal = {m: removal_curves(pair, m, calib, val, test, forward=m == MATCHINGS[0]) for m in MATCHINGS}
    k = {m: choose_k(removal[m]) for m in MATCHINGS}
    seconds["bias-removal sweep (A.6)"] = time.perf_counter() - t
    t = time.perf_counter()
    alphas = cfg.alphas
    diag_alphas = set(diagnosed_alphas(alphas, cfg.alpha))
    curves: dict[tuple[str, str], dict[str, list]] = {(m, n): {"accuracy": [], "loss": []}
                                                      for m in MATCHINGS for n in METHODS}
    diagnosis: dict[tuple[str, str, float], Diagnosis] = {}
    degenerate: dict[str, int] = {}
    jobs = [(m, a) for m in MATCHINGS for a in alphas]
    for m, a in tqdm(jobs, desc="matching × α", disable=not progress, leave=False):
        for method in METHODS:
            model = merged_model(pair, m, method, a, calib, k=k[m], counter=degenerate)
            r = evaluate(model, test)
            curves[(m, method)]["accuracy"].append(r["accuracy"])
            curves[(m, method)]["loss"].append(r["loss"])
            if a in diag_alphas:
                diagnosis[(m, method, a)] = Diagnosis(vf_curve(model, edge_fb, diag), logit_stats(model, diag))
    seconds["α grid (5 methods × 2 matchings)"] = time.perf_counter() - t
    res_curves = {key: {"alpha": np.array(alphas), "accuracy": np.array(v["accuracy"]), "loss": np.array(v["loss"])}
                  for key, v in curves.items()}
    t = time.perf_counter()
    direct = interpolation_curve(edges[0], edges[1], test, alphas, progress=False)
    res = NormalizationResult(cfg=cfg, pair=pair, edge_metrics=[evaluate(e, test) for e in edges], edge_fb=edge_fb,
                              edge_logits=[logit_stats(e, diag) for e in edges], direct=direct, k=k,
                              removal=removal, curves=res_curves, diagnosis=diagnosis, degenerate=degenerate,
                              seconds=seconds, n_eval=len(test))
    t = time.perf_counter()
    res.offsets = {m: offset_profile(pair, m, cfg.alpha, calib) for m in MATCHINGS}
    seconds["relative offsets"] = time.perf_counter() - t
    t = time.perf_counter()
    res.compare = [recipe_row(res.cfg, cfg.weight_decay, res=res)]
    res.compare += [recipe_row(cfg, wd, calib=calib, val=val, test=test, diag=diag, progress=progress)
                    for wd in cfg.compare_weight_decay if wd != cfg.weight_decay]
    seconds["weight-decay comparison"] = time.perf_counter() - t
    return res


def relative_offset(stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Per layer, the median over channels of mean / std of the pre-activation: how far the channels sit
    from zero in units of their input-induced spread (> 0: mostly active ReLUs)."""
    return np.array([float(torch.median(m / s.clamp_min(1e-12))) for m, s in stats.values()])


def offset_profile(pair: Pair, matching: str, alpha: float, calib: VisionData) -> dict[str, np.ndarray]:
    """The relative offset per layer (:func:`relative_offset`) of the edges and of the merged model at α
    before normalization, after REPAIR and after RESCALE. REPAIR sets it to the targets' (mean and std
    both prescribed); RESCALE multiplies each channel by one factor, so it keeps the merged model's own
    ratio at that layer."""
    out = {"edge 0": relative_offset(pair.stats["edge0"]), "edge 1": relative_offset(pair.stats["edge1"])}
    for method in ("no normalization", "REPAIR", "RESCALE"):
        out[method] = relative_offset(layer_stats(merged_model(pair, matching, method, alpha, calib), calib))
    return out


def recipe_row(cfg: Config, weight_decay: float, res: NormalizationResult | None = None, calib=None, val=None,
               test=None, diag=None, progress: bool = False) -> dict[str, Any]:
    """Midpoint (α = cfg.alpha) accuracy of every method with weight matching, for the edge models trained
    with ``weight_decay`` (the rest of the recipe unchanged), and the logit offset ratio of REPAIR/RESCALE."""
    a = cfg.alpha
    if res is not None:
        pair, k, edges = res.pair, res.k["weight matching"], res.pair.edges
        acc = {m: res.at("weight matching", m) for m in METHODS}
        edge_acc = res.edge_accuracy
        offsets = {m: res.diagnosis[("weight matching", m, res.nearest(a))].logits.offset_ratio
                   for m in ("REPAIR", "RESCALE")}
    else:
        cfg2 = cfg.replace(weight_decay=weight_decay)
        edges = edge_models(cfg2, seeds=list(cfg.seeds[:2]), progress=progress)
        x = example_input(calib, model=edges[0])
        wm = weight_matching(edges[0], edges[1], x, seed=0)
        partner = apply_permutation(edges[1], wm)
        pair = Pair(edges, wm, None, {"edge0": layer_stats(edges[0], calib),  # type: ignore[arg-type]
                                      "wm partner": layer_stats(partner, calib)})
        k = choose_k(removal_curves(pair, "weight matching", calib, val, None, alpha=a))
        acc, offsets = {}, {}
        for m in METHODS:
            model = merged_model(pair, "weight matching", m, a, calib, k=k)
            acc[m] = evaluate(model, test)["accuracy"]
            if m in ("REPAIR", "RESCALE"):
                offsets[m] = logit_stats(model, diag).offset_ratio
        edge_acc = float(np.mean([evaluate(e, test)["accuracy"] for e in edges]))
    return {"weight decay": weight_decay, "edges (mean)": edge_acc, **acc, "k (bias removal)": k,
            "‖f(0)‖/std, REPAIR": offsets["REPAIR"], "‖f(0)‖/std, RESCALE": offsets["RESCALE"]}


# ---------------------------------------------------------------------------------------------------
# tables
def training_table(cfg: Config) -> list[dict[str, Any]]:
    """Per edge model (the main pair and the weight-decay comparison): recipe and stored metrics."""
    rows = []
    for wd in [cfg.weight_decay] + [w for w in cfg.compare_weight_decay if w != cfg.weight_decay]:
        for c in edge_configs(cfg.replace(weight_decay=wd))[:2]:
            meta = info(c, cfg.cache_dir)
            rows.append({"model": c.model, "seed": c.seed, "weight decay": c.weight_decay, "epochs": c.epochs,
                         "lr": c.lr, "key": c.key, "train loss": round(meta["metrics"]["train_loss"], 4),
                         "test accuracy (full split)": round(meta["metrics"]["test_accuracy"], 4)})
    return rows


def midpoint_table(res: NormalizationResult) -> list[dict[str, Any]]:
    """Accuracy at the configured α (Fig. 2's midpoint), per method (rows) and matching (columns); the chosen k of
    bias removal per matching is in :func:`removal_table` and the text."""
    rows = [{"method": "edges (mean)", **{m: res.edge_accuracy for m in MATCHINGS}},
            {"method": "direct (no alignment)", **{m: float(np.interp(res.cfg.alpha, res.direct["alpha"],
                                                                       res.direct["accuracy"])) for m in MATCHINGS}}]
    for method in METHODS:  # the row labels do not depend on the run, so a sweep can average them over seeds
        label = "bias removal (last k, k from validation)" if method == "bias removal" else method
        rows.append({"method": label, **{m: res.at(m, method) for m in MATCHINGS}})
    return rows


def zip_table(res: NormalizationResult) -> list[dict[str, Any]]:
    """ZipIt!'s merges per layer: cross-model, within-model, clusters of more than two features."""
    return res.pair.zip.summary()


def removal_table(res: NormalizationResult) -> list[dict[str, Any]]:
    """The chosen k (validation) against the k a test-set search would pick, per matching."""
    rows = []
    for m in MATCHINGS:
        c = res.removal[m]
        k_test = int(c["k"][int(np.argmax(c["backward (test)"]))])
        rows.append({"matching": m, "k chosen on validation (training images)": res.k[m],
                     "test accuracy at that k": float(c["backward (test)"][res.k[m]]),
                     "k a test-set search picks": k_test,
                     "test accuracy at that k (optimistic)": float(c["backward (test)"][k_test]),
                     "no removal (k=0)": float(c["backward (test)"][0])})
    return rows


def timing_table(res: NormalizationResult) -> list[dict[str, Any]]:
    return [{"step": k, "seconds": round(v, 1)} for k, v in res.seconds.items()]


# ---------------------------------------------------------------------------------------------------
# figures
def plot_methods(ax, res: NormalizationResult, matching: str) -> None:
    """Paper Fig. 2 (LaTeX label "improve_renorm"): test accuracy against α for every method, for one matching."""
    from ..plots import style
    with style():
        ax.plot(res.direct["alpha"], res.direct["accuracy"], ":", color="black", lw=1, label="direct (no alignment)")
        for method in METHODS:
            c = res.curves[(matching, method)]
            label = "bias removal (last k, k from validation)" if method == "bias removal" else method
            ax.plot(c["alpha"], c["accuracy"], "o-", color=METHOD_COLORS[method], label=label)
        ax.set_ylim(0, 1)
        ax.set_xlabel("α")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{matching} (bias removal: k = {res.k[matching]})")


def plot_removal(ax, res: NormalizationResult, matching: str) -> None:
    """Appendix A.6: accuracy at α = 0.5 against the number of zeroed biases, forward vs backward."""
    from ..plots import style
    c = res.removal[matching]
    with style():
        ax.plot(c["k"], c["backward (test)"], "o-", color=METHOD_COLORS["bias removal"], label="backward (last k), test")
        ax.plot(c["k"], c["backward (validation)"], "o:", color=METHOD_COLORS["bias removal"], alpha=0.6,
                label="backward (last k), validation")
        if "forward (test)" in c:
            ax.plot(c["k"], c["forward (test)"], "s-", color=METHOD_COLORS["REPAIR"], label="forward (first k), test")
        ax.axvline(res.k[matching], color="gray", lw=1, ls="--", label="k chosen on validation")
        ax.set_xlabel("number of removed biases k")
        ax.set_ylabel("accuracy at α = 0.5")
        ax.set_ylim(0, 1)
        ax.set_title(f"{matching}: chosen k = {res.k[matching]}")
        ax.legend(loc="lower left")


def plot_offsets(ax, res: NormalizationResult, matching: str) -> None:
    """Per layer, the median channel mean/std of the pre-activations: edges against the merged model
    before normalization, after REPAIR and after RESCALE (α = cfg.alpha)."""
    from ..plots import style
    prof = res.offsets[matching]
    with style():
        x = np.arange(1, len(prof["edge 0"]) + 1)
        ax.plot(x, (prof["edge 0"] + prof["edge 1"]) / 2, "o-", color="black", lw=2.2,
                label="edges (average)")
        ax.plot(x, prof["edge 0"], ":", color="black", alpha=0.5, label="edge 0, edge 1")
        ax.plot(x, prof["edge 1"], ":", color="black", alpha=0.5)
        for m in ("no normalization", "REPAIR", "RESCALE"):
            ax.plot(x, prof[m], "s--" if m == "RESCALE" else "s-", color=METHOD_COLORS[m], label=f"merged, {m}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(x)
        ax.set_xlabel("layer l (conv, before ReLU)")
        ax.set_ylabel("median over channels of mean / std")
        ax.set_title(f"{matching}, α = {res.cfg.alpha:g}")


def vf_curves(res: NormalizationResult, matching: str, alpha: float) -> dict[str, VFCurve]:
    """The midpoint (or any grid α) vanishing-feature curve of every method, for one matching."""
    return {m: res.diagnosis[(matching, m, res.nearest(alpha))].vf for m in METHODS}


def plot_vf(ax, res: NormalizationResult, matching: str, alpha: float) -> None:
    """Appendix A.5.1: the upper bound ε_l (lines) and the ratio E_l (dots) of every method at α, against
    relative depth, in the method colours of the main figure."""
    from ..plots import style
    with style():
        # methods often coincide (RESCALE and bias calibration keep REPAIR's scale): the first is drawn widest and
        # each later one narrower and in its own dash pattern on top, so coinciding curves stay visible as stripes
        for i, (m, c) in enumerate(vf_curves(res, matching, alpha).items()):
            ax.plot(c.relative_depth, c.bound, ls=VF_DASHES[i % len(VF_DASHES)], color=METHOD_COLORS[m], label=m,
                    lw=3.4 - 0.55 * i, zorder=2 + i)
            ax.plot(c.relative_depth, c.ratio, "o", color=METHOD_COLORS[m], alpha=0.35, ms=3)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(*_vf_limits(res))
        ax.set_xlabel("relative depth l / L")
        ax.set_ylabel("bound ε_l  (E‖g_α‖ / edges)")
        ax.set_title(f"{matching}, α = {res.nearest(alpha):.2f}")


def _vf_limits(res: NormalizationResult) -> tuple[float, float]:
    """One y-range for every explorer frame, so that frames compare."""
    vals = np.concatenate([np.r_[d.vf.bound, d.vf.ratio] for d in res.diagnosis.values()])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    return float(min(0.5, vals.min()) / 1.5), float(max(2.0, vals.max()) * 1.5)


def explorer_figure(res: NormalizationResult, method: str, alpha: float):
    """One explorer frame: VF bound (WM and ZipIt!), logits, and the accuracy curve with α marked."""
    from ..plots import figure, plot_logits, style
    a = res.nearest(alpha)
    fig, ax = figure(3, width=3.9, height=3.0)
    with style():
        for m in MATCHINGS:
            d = res.diagnosis[(m, method, a)]
            ax[0].plot(d.vf.relative_depth, d.vf.bound, MATCHING_STYLE[m], color=METHOD_COLORS[method], label=m)
            ax[0].plot(d.vf.relative_depth, d.vf.ratio, "o", color=METHOD_COLORS[method], alpha=0.3, ms=3)
        ax[0].axhline(1.0, color="gray", lw=0.8, ls=":")
        ax[0].set_yscale("log")
        ax[0].set_ylim(*_vf_limits(res))
        ax[0].set_xlabel("relative depth l / L")
        ax[0].set_ylabel("bound ε_l (E‖g_α‖ / edges)")
        ax[0].set_title("vanishing feature")
        ax[0].legend(loc="lower left")
    plot_logits(ax[1], {"WM": res.diagnosis[("weight matching", method, a)].logits,
                        "ZipIt!": res.diagnosis[("ZipIt!", method, a)].logits, "edge 0": res.edge_logits[0]})
    ax[1].legend(loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=2)
    with style():
        for m in MATCHINGS:
            c = res.curves[(m, method)]
            ax[2].plot(c["alpha"], c["accuracy"], "o" + MATCHING_STYLE[m], color=METHOD_COLORS[method], label=m, ms=3)
            ax[2].plot([a], [res.at(m, method, a)], "o", ms=9, mfc="none", mec="black")
        ax[2].set_ylim(0, 1)
        ax[2].set_xlabel("α")
        ax[2].set_ylabel("test accuracy")
        ax[2].set_title(f"{method}, α = {a:.2f}: WM {res.at('weight matching', method, a):.3f}, "
                        f"ZipIt! {res.at('ZipIt!', method, a):.3f}", fontsize=8)
        ax[2].legend(loc="lower left")
    return fig


# ---------------------------------------------------------------------------------------------------
def claims(res: NormalizationResult) -> list[dict[str, Any]]:
    """The paper's §5.3 / A.5.1 / A.6 / A.4 claims, each checked on this run. A comparison of accuracies
    holds ("yes") only beyond two standard errors of the test accuracy (:func:`vfnb.chapters.claims.noise_margin`),
    else it is "within noise"."""
    c = Claims(n=res.n_eval or None)
    a = res.cfg.alpha
    wm, zp = MATCHINGS
    acc = {(m, k): res.at(m, k) for m in MATCHINGS for k in METHODS}
    d = float(np.interp(a, res.direct["alpha"], res.direct["accuracy"]))
    c.add("Direct merging without alignment falls to near chance", d < 0.3,
          f"direct α={a:g}: {d:.3f} (edges {res.edge_accuracy:.3f})")
    c.add("REPAIR improves on the un-normalized merge (WM)", c.greater(acc[(wm, "REPAIR")], acc[(wm, "no normalization")]),
          f"WM: REPAIR {acc[(wm, 'REPAIR')]:.3f} vs none {acc[(wm, 'no normalization')]:.3f}")
    for k in ("RESCALE", "bias calibration", "bias removal"):
        for m in MATCHINGS:
            c.add(f"{k} beats REPAIR at the midpoint ({m})", c.greater(acc[(m, k)], acc[(m, "REPAIR")]),
                  f"{k} {acc[(m, k)]:.3f} vs REPAIR {acc[(m, 'REPAIR')]:.3f} (±{c.margin(acc[(m, k)], acc[(m, 'REPAIR')]):.3f})"
                  + (f"; k = {res.k[m]}, chosen on validation" if k == "bias removal" else ""))
    others = [k for k in METHODS if k != "RESCALE"]
    best_other = max(others, key=lambda k: acc[(zp, k)])
    c.add("With ZipIt!, RESCALE is the best normalization",
          all_of(*(c.greater(acc[(zp, "RESCALE")], acc[(zp, k)]) for k in others)),
          f"RESCALE {acc[(zp, 'RESCALE')]:.3f}; best other: {best_other} {acc[(zp, best_other)]:.3f}")
    r = res.removal[wm]
    kk = min(5, len(r["k"]) - 1)
    c.add("Backward bias removal beats forward removal (A.6, WM, α = 0.5)",
          c.greater(float(np.mean(r["backward (test)"][1:])), float(np.mean(r["forward (test)"][1:]))),
          f"mean over k≥1: backward {np.mean(r['backward (test)'][1:]):.3f} vs forward "
          f"{np.mean(r['forward (test)'][1:]):.3f}; at k={kk}: {r['backward (test)'][kk]:.3f} vs "
          f"{r['forward (test)'][kk]:.3f}")
    c.add("Removing the last 5–6 biases is (near) optimal (A.6, WM)", 4 <= res.k[wm] <= 7,
          f"k chosen on validation: {res.k[wm]} (WM), {res.k[zp]} (ZipIt!)")
    ab = res.nearest(a)
    last = {k: res.diagnosis[(wm, k, ab)].vf.bound[-1] for k in METHODS}
    c.add("REPAIR and RESCALE lift the vanishing-feature bound of the merged model (A.5.1, WM)",
          bool(all(last[k] > 3 * last["no normalization"] for k in ("REPAIR", "RESCALE"))),
          "bound ε_L at the last layer: " + ", ".join(f"{k} {v:.3g}" for k, v in last.items()))
    c.add("Bias calibration lifts the vanishing-feature bound (A.5.1, WM)",
          bool(last["bias calibration"] > 3 * last["no normalization"]),
          f"ε_L {last['bias calibration']:.3g} against {last['no normalization']:.3g} without normalization")
    if len(res.compare) > 1:
        rows = sorted(res.compare, key=lambda row: row["weight decay"])
        lo, hi = rows[0], rows[-1]
        c.add(f"Weaker weight decay makes WM + REPAIR worse (A.4; {lo['weight decay']:g} vs {hi['weight decay']:g})",
              c.greater(hi["REPAIR"], lo["REPAIR"]), f"REPAIR {hi['REPAIR']:.3f} → {lo['REPAIR']:.3f}")
        c.add(f"RESCALE stays robust with weaker weight decay (A.4; {lo['weight decay']:g}, WM)",
              bool(lo["RESCALE"] > 0.5) and c.at_least(lo["RESCALE"], hi["RESCALE"]),
              f"RESCALE {hi['RESCALE']:.3f} → {lo['RESCALE']:.3f} (±{c.margin(hi['RESCALE'], lo['RESCALE']):.3f})")
        c.add(f"RESCALE beats REPAIR at the midpoint with weaker weight decay ({lo['weight decay']:g}, WM)",
              c.greater(lo["RESCALE"], lo["REPAIR"]), f"RESCALE {lo['RESCALE']:.3f} vs REPAIR {lo['REPAIR']:.3f}")
    return c.table()


# ---------------------------------------------------------------------------------------------------
# sentences with this run's numbers (the chapter displays them as Markdown)
def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _vs(a: float, b: float, n: int) -> str:
    return {True: "beats", False: "falls behind", TIE: "ties with (within noise)"}[compare(a, b, n)]


def midpoint_text(res: NormalizationResult) -> str:
    """What the main figure shows at the configured α, with this run's numbers."""
    a = res.cfg.alpha
    d = float(np.interp(a, res.direct["alpha"], res.direct["accuracy"]))
    lines = [f"At α = {a:g} the edge models average {_pct(res.edge_accuracy)} and direct merging without "
             f"alignment reaches {_pct(d)}."]
    for m in MATCHINGS:
        acc = {n: res.at(m, n) for n in METHODS}
        best = max(METHODS, key=acc.get)
        lines.append(
            f"With **{m}**: no normalization {_pct(acc['no normalization'])}, REPAIR {_pct(acc['REPAIR'])}, "
            f"RESCALE {_pct(acc['RESCALE'])}, bias removal (last k = {res.k[m]}) {_pct(acc['bias removal'])}, "
            f"bias calibration {_pct(acc['bias calibration'])}. The best is **{best}**. RESCALE "
            f"{_vs(acc['RESCALE'], acc['REPAIR'], res.n_eval)} REPAIR "
            f"({100 * (acc['RESCALE'] - acc['REPAIR']):+.1f} points), bias calibration "
            f"{_vs(acc['bias calibration'], acc['REPAIR'], res.n_eval)} it "
            f"({100 * (acc['bias calibration'] - acc['REPAIR']):+.1f} points).")
    lines.append(f"Differences smaller than about {100 * noise_margin(0.9, 0.9, res.n_eval):.1f} points (near 90 %) "
                 f"to {100 * noise_margin(0.5, 0.5, res.n_eval):.1f} points (near 50 %) are within the sampling "
                 f"noise of {res.n_eval} test images (two standard errors).")
    return "\n\n".join(lines)


def recipe_text(res: NormalizationResult) -> str:
    """What the weight-decay comparison shows, with this run's numbers."""
    if len(res.compare) < 2:
        return "No comparison recipe was run (`compare_weight_decay` is empty)."
    base = res.compare[0]
    parts = []
    for row in res.compare[1:]:
        parts.append(
            f"With weight decay **{row['weight decay']:g}** instead of {base['weight decay']:g} (everything else "
            f"equal), the edge models reach {_pct(row['edges (mean)'])} (against {_pct(base['edges (mean)'])}). "
            f"At the WM midpoint REPAIR goes from {_pct(base['REPAIR'])} to {_pct(row['REPAIR'])} and RESCALE from "
            f"{_pct(base['RESCALE'])} to {_pct(row['RESCALE'])}; bias calibration from "
            f"{_pct(base['bias calibration'])} to {_pct(row['bias calibration'])}. With this recipe RESCALE "
            f"{_vs(row['RESCALE'], row['REPAIR'], res.n_eval)} REPAIR and bias calibration "
            f"{_vs(row['bias calibration'], row['REPAIR'], res.n_eval)} it. The offset ratio ‖f(0)‖/std of the "
            f"logits is {row['‖f(0)‖/std, REPAIR']:.2f} after REPAIR and {row['‖f(0)‖/std, RESCALE']:.2f} after "
            f"RESCALE (strong recipe: {base['‖f(0)‖/std, REPAIR']:.2f} and {base['‖f(0)‖/std, RESCALE']:.2f}).")
        best = max(row[m] for m in METHODS)
        if best < 0.3:
            parts.append(
                f"Every method stays near chance with this recipe (best {_pct(best)}). Weight matching itself fails "
                f"here: with weak weight decay and this budget the weights stay close to their random "
                f"initialization, and weight matching aligns that noise (chapter 3). The paper's weak-decay regime, "
                f"in which REPAIR is unstable but the merge still works, is not reached at this scale. The REPAIR "
                f"logits do carry the larger input-independent offset there, as the paper argues, but no "
                f"normalization can repair a merge whose alignment failed.")
    return "\n\n".join(parts)


def offset_text(res: NormalizationResult) -> str:
    """The relative-offset evidence (:func:`offset_profile`) in words, with this run's numbers."""
    parts = []
    for m in MATCHINGS:
        p = res.offsets[m]
        edges = (p["edge 0"] + p["edge 1"]) / 2
        gap = np.abs(p["no normalization"] - edges)
        l = int(np.argmax(gap))
        dev = {k: float(np.mean(np.abs(p[k] - edges))) for k in ("no normalization", "REPAIR", "RESCALE")}
        parts.append(
            f"With **{m}** the merged model's median mean/std is farthest from the edges' at layer {l + 1}: "
            f"{p['no normalization'][l]:.2f} against {edges[l]:.2f}. REPAIR brings it to {p['REPAIR'][l]:.2f}, "
            f"RESCALE leaves {p['RESCALE'][l]:.2f}. Averaged over layers, the distance to the edges' profile is "
            f"{dev['no normalization']:.2f} before normalization, {dev['REPAIR']:.2f} after REPAIR and "
            f"{dev['RESCALE']:.2f} after RESCALE; the midpoint accuracies are REPAIR {_pct(res.at(m, 'REPAIR'))} "
            f"and RESCALE {_pct(res.at(m, 'RESCALE'))}.")
    return "\n\n".join(parts)
