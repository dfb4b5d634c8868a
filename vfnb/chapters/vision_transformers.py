"""Paper §A.8.4 (appendix): merging vision transformers with direct merging, weight and activation matching and
optimal-transport fusion, each without and with post-merging normalization, and Preserve-First Merging
over whole transformer blocks (paper Table 5).

Edge models: two ViTs (``build_model("vit")``, torchvision's ``VisionTransformer``) trained from two
seeds with :data:`vfnb.train.TRANSFORMER_RECIPES`. PFM_l/L keeps the first ``l`` of the ``L`` stages
unmerged: the patch embedding, then the encoder blocks (``L = vit_depth + 1``, as the paper's 7-block
ViT gives PFM_l/8). Every accuracy is on the test set; alignments, normalization statistics and the
OT regularization sweep use training images only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import example_input
from ..config import Config
from ..data import VisionData, calibration_subset
from ..diagnose import VFCurve, feature_bias, vf_curve
from ..evaluate import evaluate
from ..flops import count_cost
from ..graph import apply_permutation, identity_permutation, permutation_spec, random_permutation
from ..matching import activation_matching, weight_matching
from ..merge import interpolate
from ..normalize import Fix, target_stats
from ..pfm import preserve_first
from ..plots import color
from ..structure import block_depths, repair_layers
from ..train import TrainConfig, recipe
from ..transport import TransportAlignment, ot_matching
from ..zoo import get_or_train, info, resolve_device
from .claims import Claims, all_of, noise_margin
from .common import check_config, match_data, test_data

#: The alignments of Table 5 at this scale, by short name.
METHODS = {"direct": "Direct", "wm": "WM", "am": "AM", "ot": "OT"}
METHOD_NAMES = {"direct": "direct merging", "wm": "weight matching", "am": "activation matching",
                "ot": "OT fusion (activations)"}
#: One colour per alignment in every figure of the chapter.
METHOD_COLORS = {name: color(name) for name in METHODS.values()}
#: The post-merging fixes compared for every alignment.
FIXES = (Fix.NONE, Fix.REPAIR, Fix.RESCALE)


@dataclass
class ViTResult:
    """Everything the chapter shows, measured on one pair of ViTs."""
    cfg: Config
    models: tuple[nn.Module, nn.Module]
    edge_acc: list[float]
    ensemble: float
    stages: list[str]                       # patch embedding, then the encoder blocks
    depths: list[int]                       # PFM_l/L keeps `depths[l]` layers as the paper counts them
    alignments: dict[str, Any]              # method -> Permutation / TransportAlignment / None
    align_seconds: dict[str, float]
    invariance: dict[str, float]            # a random permutation (heads as wholes) changes nothing
    table: dict[tuple[int, str, Fix], float] = field(default_factory=dict)   # (l, method, fix) -> accuracy
    cost: dict[int, dict[str, float]] = field(default_factory=dict)         # l -> params/FLOPs ratios
    edge_cost: dict[str, float] = field(default_factory=dict)
    vf: dict[tuple[str, Fix], VFCurve] = field(default_factory=dict)        # merged model (l = 0) per method/fix
    explorer: dict[int, dict[str, VFCurve]] = field(default_factory=dict)   # l -> method -> VF curve (no fix)
    ot_sweep: dict[float, dict[str, float]] = field(default_factory=dict)  # reg -> training accuracy, sharpness
    am_weights: dict[Fix, float] = field(default_factory=dict)             # AM with q/k/v matched by weights, l = 0
    seconds: dict[str, float] = field(default_factory=dict)
    n_test: int = 0
    n_match: int = 0

    @property
    def L(self) -> int:
        return len(self.stages)

    @property
    def edge_mean(self) -> float:
        return float(np.mean(self.edge_acc))

    def curve(self, method: str, fix: Fix = Fix.NONE) -> np.ndarray:
        """Accuracy of PFM_l/L over l = 0..L."""
        return np.array([self.table[(l, method, fix)] for l in range(self.L + 1)])


# ---------------------------------------------------------------------------------------------------
# models
def edge_configs(cfg: Config) -> list[TrainConfig]:
    """The training configuration of each edge ViT: :func:`vfnb.train.recipe` ("vit") with the chapter's
    sizes and training values."""
    check_config(cfg, "vision_transformers")
    return [recipe("vit", cfg.profile, dataset=cfg.dataset, seed=s, epochs=cfg.epochs, lr=cfg.lr,
                   weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, n_train=cfg.n_train,
                   width=cfg.model_width, depth=cfg.vit_depth, num_heads=cfg.num_heads, patch_size=cfg.patch_size)
            for s in cfg.seeds]


def edge_models(cfg: Config, progress: bool = True) -> list[nn.Module]:
    """The two trained ViTs, from the zoo (trained once, then cached)."""
    device = resolve_device(cfg.device)
    return [get_or_train(c, cache_dir=cfg.cache_dir, data_root=cfg.data_root, device=device, progress=progress)
            for c in edge_configs(cfg)]


def recipe_table(res: ViTResult) -> list[dict[str, Any]]:
    """Per edge model: the architecture, the training recipe and the stored test accuracy."""
    rows = []
    for c, m in zip(edge_configs(res.cfg), res.models):
        meta = info(c, res.cfg.cache_dir)
        k = c.model_kwargs
        rows.append({"seed": c.seed, "hidden size": m.hidden_dim, "blocks": k["depth"], "heads": k["num_heads"],
                     "patch": f"{k['patch_size']}×{k['patch_size']}", "optimizer": c.optimizer, "lr": c.lr,
                     "schedule": c.schedule, "weight decay": c.weight_decay, "grad clip": c.grad_clip,
                     "epochs": c.epochs, "batch": c.batch_size,
                     "parameters": sum(p.numel() for p in m.parameters()),
                     "test accuracy": round(meta["metrics"]["test_accuracy"], 4)})
    return rows


# ---------------------------------------------------------------------------------------------------
# the run
def _acc(model: nn.Module, data: VisionData) -> float:
    return evaluate(model, data)["accuracy"]


def _ratio(c: dict[str, float], edge: dict[str, float]) -> dict[str, float]:
    return {"params": c["params"] / edge["params"], "flops": c["flops"] / edge["flops"]}


def _sharpness(al: TransportAlignment) -> float:
    """Mean over every unit of its transport map's largest entry (1: a permutation; 1/n: uniform)."""
    rows = torch.cat([t.max(1).values for t in al.transforms])
    return float(rows.mean())


def run(cfg: Config, progress: bool = True) -> ViTResult:
    """Train (or load) the two ViTs, align them four ways, and measure Table 5, the vanishing-feature curves
    and the explorer's frames."""
    check_config(cfg, "vision_transformers")
    torch.manual_seed(0)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    a, b = edge_models(cfg, progress=progress)
    seconds["edge models"] = time.perf_counter() - t
    data, mdata = test_data(cfg), match_data(cfg)
    diag = mdata if cfg.n_diag >= len(mdata) else calibration_subset(mdata, cfg.n_diag, seed=2)
    x = example_input(data, model=a)
    alpha = cfg.alpha

    # invariance: a random permutation that moves heads as wholes leaves the function unchanged
    spec = permutation_spec(a, x)
    pb = apply_permutation(b, random_permutation(spec, 0))
    xs = next(iter(diag.batches(64)))[0].to(x)
    with torch.no_grad():
        inv = {"max |f(x) − f_π(x)|": float((b(xs) - pb(xs)).abs().max()),
               "largest logit": float(b(xs).abs().max()), "groups": len(spec.groups),
               "groups whose heads move as wholes": sum(g.heads is not None for g in spec.groups)}

    t = time.perf_counter()
    align_seconds: dict[str, float] = {}
    alignments: dict[str, Any] = {"direct": identity_permutation(spec)}
    for m in ("wm", "am", "ot"):
        t0 = time.perf_counter()
        if m == "wm":
            alignments[m] = weight_matching(a, b, x)
        elif m == "am":
            alignments[m] = activation_matching(a, b, mdata, example_input=x)
        else:
            alignments[m] = ot_matching(a, b, mdata, example_input=x, reg=cfg.ot_reg)
        align_seconds[m] = time.perf_counter() - t0
    seconds["alignments"] = time.perf_counter() - t

    stages = a.stages()
    depths = [0] + block_depths(a, stages)
    res = ViTResult(cfg, (a, b), [_acc(a, data), _acc(b, data)], 0.0, stages, depths, alignments, align_seconds,
                    inv, n_test=len(data), n_match=len(mdata))
    res.ensemble = _acc(preserve_first(a, b, alignments["am"], layers=spec.num_layers, alpha=alpha), data)
    res.edge_cost = count_cost(a, x)

    # model b in model a's units, once per alignment (the OT sweep and the normalization targets reuse it)
    partners = {m: (al.apply(b) if isinstance(al, TransportAlignment) else apply_permutation(b, al))
                for m, al in alignments.items()}

    # OT's regularization, chosen on training images (merged midpoint, l = 0, no normalization)
    t = time.perf_counter()
    for reg in tqdm(sorted(set(cfg.ot_regs) | {cfg.ot_reg}) + [float("inf")], desc="OT regularization",
                    disable=not progress, leave=False):
        if reg == float("inf"):  # the limit: model 2's units all become their layer's mean unit
            al = TransportAlignment.uniform(spec, b)
        else:
            al = alignments["ot"] if reg == cfg.ot_reg else ot_matching(a, b, mdata, example_input=x, reg=reg)
        moved = partners["ot"] if reg == cfg.ot_reg else al.apply(b)
        res.ot_sweep[reg] = {"merged accuracy": _acc(interpolate(a, moved, alpha), mdata),
                             "transported model 2 alone": _acc(moved, mdata),
                             "mean largest entry of T": _sharpness(al)}
    seconds["OT regularization"] = time.perf_counter() - t

    # Table 5: PFM_l/L for every l, every alignment, every fix
    t = time.perf_counter()
    rl = repair_layers(a)
    targets = {m: target_stats([a, p], [1 - alpha, alpha], mdata, layers=rl) for m, p in partners.items()}
    for l, layers in enumerate(tqdm(depths, desc="Table 5: PFM over blocks", disable=not progress, leave=False)):
        for m, al in alignments.items():
            for fix in FIXES:
                p = preserve_first(a, b, al, layers=layers, alpha=alpha, normalize=fix, data=mdata, targets=targets[m])
                res.table[(l, m, fix)] = _acc(p, data)
        res.cost[l] = _ratio(count_cost(p, x), res.edge_cost)
    seconds["Table 5"] = time.perf_counter() - t

    # activation matching with the attention's q/k/v units matched by their weights instead (l = 0)
    amw = activation_matching(a, b, mdata, example_input=x, attention="weights")
    tg = target_stats([a, apply_permutation(b, amw)], [1 - alpha, alpha], mdata, layers=rl)
    res.am_weights = {fix: _acc(preserve_first(a, b, amw, layers=0, alpha=alpha, normalize=fix, data=mdata,
                                               targets=tg), data) for fix in FIXES}

    # the vanishing feature along the residual stream, per merge (l = 0), and per l for the explorer
    t = time.perf_counter()
    points = a.stream_points()
    edge_fbs = [feature_bias(a, diag, names=points), feature_bias(b, diag, names=points)]
    for m, al in alignments.items():
        for fix in (Fix.NONE, Fix.REPAIR):
            p = preserve_first(a, b, al, layers=0, alpha=alpha, normalize=fix, data=mdata, targets=targets[m])
            res.vf[(m, fix)] = vf_curve(p, edge_fbs, diag)
    for l, layers in enumerate(tqdm(depths, desc="explorer: PFM over l", disable=not progress, leave=False)):
        res.explorer[l] = {m: res.vf[(m, Fix.NONE)] if l == 0 else
                           vf_curve(preserve_first(a, b, al, layers=layers, alpha=alpha), edge_fbs, diag)
                           for m, al in alignments.items()}
    seconds["vanishing feature"] = time.perf_counter() - t
    res.seconds = seconds
    return res


# ---------------------------------------------------------------------------------------------------
# tables
def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def table5(res: ViTResult) -> list[dict[str, str]]:
    """Paper Table 5 at this scale: test accuracy (%) of PFM_l/L at α for every l, each alignment's cell
    "plain / REPAIR / RESCALE"; the edge models and the ensemble in the Direct column, as in the paper;
    parameters and FLOPs relative to one edge model."""
    e = res.edge_cost

    def cost(r: dict[str, float]) -> dict[str, str]:
        return {"Params": f"{e['params'] * r['params'] / 1e3:.0f} k ({r['params']:.2f}×)",
                "FLOPs": f"{e['flops'] * r['flops'] / 1e6:.1f} M ({r['flops']:.2f}×)"}
    blank = {name: "" for name in list(METHODS.values())[1:]}
    rows = [{"Model": f"Model {i + 1}", "Direct": _pct(acc), **blank, **cost({"params": 1.0, "flops": 1.0})}
            for i, acc in enumerate(res.edge_acc)]
    rows.append({"Model": "Ensemble", "Direct": _pct(res.ensemble), **blank, **cost({"params": 2.0, "flops": 2.0})})
    for l in range(res.L + 1):
        row = {"Model": f"PFM {l}/{res.L}"}
        for m, name in METHODS.items():
            row[name] = " / ".join(_pct(res.table[(l, m, f)]) for f in FIXES)
        rows.append({**row, **cost(res.cost[l])})
    return rows


def stages_table(res: ViTResult) -> list[dict[str, Any]]:
    """What PFM_l/L preserves: the stages (patch embedding, blocks) and the paper's layer count."""
    return [{"l": l, "preserved": "nothing (the merged model)" if l == 0 else ", ".join(res.stages[:l]),
             "conv/linear layers preserved": res.depths[l],
             "params ×": round(res.cost[l]["params"], 3), "FLOPs ×": round(res.cost[l]["flops"], 3)}
            for l in range(res.L + 1)]


def alignment_table(res: ViTResult) -> list[dict[str, Any]]:
    """Each alignment at the merged midpoint (l = 0): test accuracy per fix, and the time it took."""
    rows = [{"alignment": METHOD_NAMES[m], **{f.label: _pct(res.table[(0, m, f)]) for f in FIXES},
             "seconds": "" if m == "direct" else round(res.align_seconds[m], 2)} for m in METHODS]
    rows.insert(3, {"alignment": "activation matching, q/k/v units by weights",
                    **{f.label: _pct(v) for f, v in res.am_weights.items()}, "seconds": ""})
    return rows


def _reg_name(res: ViTResult, reg: float) -> str:
    name = "0 (exact)" if reg == 0 else "∞ (uniform)" if reg == float("inf") else f"{reg:g}"
    return name + (" (used)" if reg == res.cfg.ot_reg else "")


def ot_table(res: ViTResult) -> list[dict[str, Any]]:
    """OT fusion's regularization on training images: 0 is the exact plan (a permutation), ∞ the uniform
    plan. Accuracy of the merged midpoint (l = 0, no normalization) and of transported model 2 on its own."""
    return [{"reg": _reg_name(res, reg), **{k: round(v, 3) for k, v in row.items()}}
            for reg, row in sorted(res.ot_sweep.items())]


# ---------------------------------------------------------------------------------------------------
# figures
def plot_pfm(ax, res: ViTResult, fix: Fix = Fix.REPAIR) -> None:
    """Table 5 as curves: PFM_l/L accuracy over l for each alignment, plain and with ``fix``."""
    from ..plots import plot_layer_sweep
    curves = {}
    for m, name in METHODS.items():
        curves[name] = res.curve(m)
        curves[f"{name} + {fix.label}"] = res.curve(m, fix)
    plot_layer_sweep(ax, np.arange(res.L + 1), curves, edge_mean=res.edge_mean, ensemble=res.ensemble,
                     xlabel=f"preserved stages l (of L = {res.L})", title="PFM over transformer blocks",
                     colors=METHOD_COLORS)


def plot_vf(ax, res: ViTResult, fix: Fix = Fix.NONE) -> None:
    """Definition 5.1's bound along the residual stream (one point per stage) for each merge (l = 0)."""
    from ..plots import plot_vf_curves
    plot_vf_curves(ax, {METHODS[m]: res.vf[(m, fix)] for m in METHODS}, legend="outside", colors=METHOD_COLORS)
    ax.set_title("residual stream, merged model" + ("" if fix is Fix.NONE else f" + {fix.label}"))


def render_explorer(res: ViTResult, l: int):
    """One frame of the explorer: the VF bound along the residual stream of PFM_l/L for each alignment
    (top), and accuracy over l with the chosen l marked (bottom)."""
    from ..plots import figure, plot_layer_sweep, plot_vf_curves
    fig, ax = figure(1, width=6.2, height=3.0, nrows=2)
    plot_vf_curves(ax[0], {METHODS[m]: c for m, c in res.explorer[l].items()}, legend="outside",
                   colors=METHOD_COLORS)
    ax[0].set_title(f"vanishing feature of PFM {l}/{res.L} (no normalization)")
    plot_layer_sweep(ax[1], np.arange(res.L + 1), {METHODS[m]: res.curve(m) for m in METHODS},
                     edge_mean=res.edge_mean, ensemble=res.ensemble, xlabel="preserved stages l", current=l,
                     colors=METHOD_COLORS,
                     title=f"l = {l}: params {res.cost[l]['params']:.2f}×, FLOPs {res.cost[l]['flops']:.2f}×")
    return fig


# ---------------------------------------------------------------------------------------------------
# claims
def claims(res: ViTResult) -> list[dict[str, Any]]:
    """The paper's Table 5 statements, checked on this run (accuracy comparisons beyond test noise)."""
    cl = Claims(n=res.n_test or None)
    L = res.L
    for m, name in METHODS.items():
        best = np.array([max(res.table[(l, m, f)] for f in FIXES) for l in range(L + 1)])
        plain = res.curve(m)
        steps_ok = all(cl.at_least(y, x) for x, y in zip(plain, plain[1:]))
        cl.add(f"PFM lifts {METHOD_NAMES[m]} steadily as l grows (no step falls beyond noise)",
               all_of(cl.greater(plain[-1], plain[0]), steps_ok),
               f"plain: {' → '.join(_pct(v) for v in plain)} %; best fix: {' → '.join(_pct(v) for v in best)} %")
    top = {m: max(res.table[(L, m, f)] for f in FIXES) for m in METHODS}
    cl.add(f"At large l the merge approaches the ensemble (PFM {L}/{L}, every alignment within noise of it)",
           all(cl.at_least(v, res.ensemble) for v in top.values()),
           ", ".join(f"{METHODS[m]} {_pct(v)}" for m, v in top.items()) + f" vs ensemble {_pct(res.ensemble)} %")
    ot0, d0 = res.table[(0, "ot", Fix.NONE)], res.table[(0, "direct", Fix.NONE)]
    cl.add("OT fusion is far better than direct merging without preserved blocks (paper: 61.5 % vs 7.6 %)",
           cl.greater(ot0, d0), f"OT {_pct(ot0)} % vs direct {_pct(d0)} %")
    used, uni = res.ot_sweep[res.cfg.ot_reg], res.ot_sweep[float("inf")]
    cl.add("OT fusion's gain comes from aligning units: it beats the uniform plan, which replaces model 2's units by "
           "their mean (this book's check; training images)",
           cl.greater(used["merged accuracy"], uni["merged accuracy"], n=res.n_match),
           f"reg = {res.cfg.ot_reg:g}: {used['merged accuracy']:.3f} vs uniform {uni['merged accuracy']:.3f}; transported "
           f"model 2 alone {used['transported model 2 alone']:.3f}")
    l_mid = max(1, round(6 * L / 8))
    otm, dm = res.table[(l_mid, "ot", Fix.NONE)], res.table[(l_mid, "direct", Fix.NONE)]
    cl.add(f"With most blocks preserved the gap closes (paper PFM 6/8: OT 90.8 % vs direct 89.4 %; here PFM {l_mid}/{L})",
           bool(otm - dm < ot0 - d0), f"OT − direct: {_pct(ot0 - d0)} points at l = 0, {_pct(otm - dm)} at l = {l_mid}")
    return cl.table()


# ---------------------------------------------------------------------------------------------------
# what each part shows in this run
def notes(res: ViTResult) -> dict[str, str]:
    """One Markdown paragraph per part of the chapter, with this run's numbers."""
    L = res.L
    out: dict[str, str] = {}
    best0 = max(((res.table[(0, m, f)], m, f) for m in METHODS for f in FIXES), key=lambda t: t[0])
    out["alignments"] = (
        f"Edge models: {_pct(res.edge_acc[0])} % and {_pct(res.edge_acc[1])} %. Merged at α = {res.cfg.alpha:g} with "
        f"nothing preserved, direct merging gives {_pct(res.table[(0, 'direct', Fix.NONE)])} %, weight matching "
        f"{_pct(res.table[(0, 'wm', Fix.NONE)])} %, activation matching {_pct(res.table[(0, 'am', Fix.NONE)])} % and "
        f"OT fusion {_pct(res.table[(0, 'ot', Fix.NONE)])} %. The best merged model is {METHODS[best0[1]]} with "
        f"{best0[2].label}: {_pct(best0[0])} %, still far below the edge models. Matching the attention's q/k/v "
        f"units by their weights instead of their activations gives "
        f"{_pct(res.am_weights[Fix.NONE])} % ({_pct(res.am_weights[Fix.REPAIR])} % with REPAIR), against "
        f"{_pct(res.table[(0, 'am', Fix.NONE)])} % ({_pct(res.table[(0, 'am', Fix.REPAIR)])} %) by activations.")
    used, uni, exact = res.ot_sweep[res.cfg.ot_reg], res.ot_sweep[float("inf")], res.ot_sweep.get(0.0)
    best = max((r for r in res.ot_sweep if r != float("inf")), key=lambda r: res.ot_sweep[r]["merged accuracy"])
    margin = noise_margin(used["merged accuracy"], uni["merged accuracy"], res.n_match)
    out["ot"] = (
        (f"On training images the merged midpoint scores best with reg = {best:g} "
         f"({res.ot_sweep[best]['merged accuracy']:.3f}); the table uses reg = {res.cfg.ot_reg:g} "
         f"({used['merged accuracy']:.3f}), " if best != res.cfg.ot_reg else
         f"On training images the merged midpoint scores best with the table's reg = {best:g} "
         f"({used['merged accuracy']:.3f}), ")
        + f"where the mean largest entry of a row of T is "
        f"{used['mean largest entry of T']:.2f} (a permutation has 1, the uniform plan 1/n). "
        + (f"The exact plan is a permutation, so transported model 2 keeps its accuracy "
           f"({exact['transported model 2 alone']:.3f}) and the merge reaches {exact['merged accuracy']:.3f}. "
           if exact else "")
        + f"Soft plans do not preserve model 2: on its own, transported model 2 scores "
          f"{used['transported model 2 alone']:.3f} at reg = {res.cfg.ot_reg:g}. The uniform plan, which replaces every "
          f"unit of model 2 by its layer's mean unit, merges to {uni['merged accuracy']:.3f}. "
        + ("So at this scale the soft plan's advantage is not alignment: a merge that discards model 2's units "
           "does as well. (A plausible reason: a constant map adds the same value to every channel, which the "
           "LayerNorms that read the stream largely remove, so the merge behaves like a rescaled model 1.) Read the "
           "OT column of Table 5 with this in mind."
           if uni["merged accuracy"] >= used["merged accuracy"] - margin else
           "The soft plan beats that baseline, so it does more than discard model 2's units."))
    first = {m: next((l for l in range(L + 1) if max(res.table[(l, m, f)] for f in FIXES) >= res.edge_mean), None)
             for m in METHODS}
    reach = "; ".join(f"{METHODS[m]} at l = {l} ({res.cost[l]['params']:.2f}× params)" if l is not None
                      else f"{METHODS[m]} never" for m, l in first.items())
    gain1 = np.mean([max(res.table[(1, m, f)] for f in FIXES) - max(res.table[(0, m, f)] for f in FIXES)
                     for m in METHODS])
    gain_blocks = np.mean([max(res.table[(L, m, f)] for f in FIXES) - max(res.table[(1, m, f)] for f in FIXES)
                           for m in METHODS]) / max(1, L - 1)
    out["table5"] = (
        f"Accuracy in %, each cell plain / REPAIR / RESCALE. Preserving the patch embedding (l = 1) changes the best "
        f"cell of a column by {100 * gain1:+.1f} points on average; each further preserved encoder block by "
        f"{100 * gain_blocks:+.1f} points on average. The edge models' average ({_pct(res.edge_mean)} %) is "
        f"first reached (best fix) by: {reach}. The ensemble scores {_pct(res.ensemble)} %. REPAIR and RESCALE act on "
        f"the merged MLP layers (hidden pre-activation and output); the attention's projections run inside "
        f"`nn.MultiheadAttention`'s fused kernel, so they are aligned and merged but not renormalized.")
    end = {(m, f): float(res.vf[(m, f)].bound[-1]) for m in METHODS for f in (Fix.NONE, Fix.REPAIR)}
    start = {m: float(res.vf[(m, Fix.NONE)].bound[0]) for m in METHODS}
    acc0 = {m: res.table[(0, m, Fix.NONE)] for m in METHODS}
    keep, lose = max(METHODS, key=lambda m: end[(m, Fix.NONE)]), min(METHODS, key=lambda m: end[(m, Fix.NONE)])
    ranks = np.corrcoef(np.argsort(np.argsort([end[(m, Fix.NONE)] for m in METHODS])),
                        np.argsort(np.argsort([acc0[m] for m in METHODS])))[0, 1]
    out["vf"] = (
        "Without normalization, the bound where the stream enters the first block is "
        + ", ".join(f"{METHODS[m]} {start[m]:.2f}" for m in METHODS)
        + "; at the final LayerNorm it is "
        + ", ".join(f"{METHODS[m]} {end[(m, Fix.NONE)]:.2f}" for m in METHODS)
        + " (with REPAIR: " + ", ".join(f"{METHODS[m]} {end[(m, Fix.REPAIR)]:.2f}" for m in METHODS) + "). "
        + ("The feature keeps vanishing block after block for every merge: here the residual connections do not "
           "keep it alive, as §5.2 argues they do for ResNets (Eq. 5.2's identity term). "
           if all(end[(m, Fix.NONE)] < start[m] for m in METHODS) else
           "The feature does not shrink along the stream for every merge: the residual connection carries it. ")
        + ("REPAIR restores part of it (it rescales the merged MLP outputs that write into the stream). "
           if all(end[(m, Fix.REPAIR)] > end[(m, Fix.NONE)] for m in METHODS) else "")
        + f"The bound does not simply rank the merges by accuracy: {METHODS[keep]} keeps the most feature "
          f"({end[(keep, Fix.NONE)]:.2f}, accuracy {_pct(acc0[keep])} %), {METHODS[lose]} the least "
          f"({end[(lose, Fix.NONE)]:.2f}, accuracy {_pct(acc0[lose])} %); the rank correlation over the four merges "
          f"is {ranks:+.2f}. "
        + ("A soft transport map averages model 2's units, which shrinks their input-induced part by construction."
           if lose == "ot" and isinstance(res.alignments["ot"], TransportAlignment)
           and not res.alignments["ot"].is_permutation() else ""))
    return out
