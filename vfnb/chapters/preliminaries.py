"""Paper §2: permutation invariance, and direct / weight-matching / activation-matching merging.

Two VGG edge models (no normalization) are trained from different seeds. Model 1 is aligned to
model 0 by weight matching (WM) or activation matching (AM) and the two are interpolated,
θ_α = (1−α)θ₀ + α·π(θ₁); direct merging uses no permutation. The same interpolation is then
renormalized: REPAIR (Eq. 2) on the pair itself, and RESET on a VGG-BN pair of the same recipe.
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
from ..data import VisionData
from ..diagnose import weight_scale
from ..evaluate import barrier, evaluate, interpolation_curve
from ..graph import Permutation, apply_permutation, permutation_spec, random_permutation
from ..matching import activation_matching, weight_matching
from ..merge import interpolate
from ..models import device_of
from ..normalize import layer_stats, repair, reset_bn_stats, weighted_stats
from ..zoo import info
from .claims import Claims, all_of
from .common import check_config, edge_configs, edge_models, match_data, test_data

METHODS = ("direct", "weight matching", "activation matching")
#: The renormalized curves: REPAIR on the chapter's pair, and the BatchNorm pair with and without RESET.
REPAIRED = ("weight matching + REPAIR", "activation matching + REPAIR")
BN_CURVES = ("BN: weight matching", "BN: activation matching", "BN: weight matching + RESET",
             "BN: activation matching + RESET")  # the order of the REPAIR panel, so colours match


@torch.no_grad()
def permutation_invariance(model: nn.Module, data: VisionData, seed: int = 0) -> dict[str, Any]:
    """Permute every hidden unit of ``model`` at random and compare the outputs on ``data``."""
    x = example_input(data, model=model)
    spec = permutation_spec(model, x)
    perm = random_permutation(spec, seed)
    permuted = apply_permutation(model, perm)
    diff, scale = 0.0, 0.0
    for xb, _ in data.batches(500, augment=False, device=device_of(model)):
        a, b = model(xb), permuted(xb)
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
    moved = sum(int((p != torch.arange(len(p))).sum()) for p in perm.perms)
    w0 = dict(model.named_parameters())
    changed = sum(1 for k, v in permuted.named_parameters() if not torch.equal(v, w0[k]))
    return {"permutation groups": len(spec.groups), "units moved": moved,
            "parameter tensors changed": f"{changed} of {len(w0)}",
            "max |f(x) − f_π(x)|": diff, "max |f(x)|": scale,
            "accuracy before": evaluate(model, data)["accuracy"],
            "accuracy after": evaluate(permuted, data)["accuracy"]}


@dataclass
class MergingResult:
    """Everything the §2 chapter shows, for edge models 0 and 1 (the first two seeds)."""

    cfg: Config
    edges: list[nn.Module]
    edge_metrics: list[dict[str, float]]
    invariance: dict[str, Any]
    perms: dict[str, Permutation]
    seconds: dict[str, float]
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    barriers: dict[str, float] = field(default_factory=dict)
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the BatchNorm pair (``norm="bn"``, same recipe and seeds) of the RESET curves, and its accuracies
    bn_edge_metrics: list[dict[str, float]] = field(default_factory=list)
    n_test: int = 0  # test images behind every accuracy

    def midpoint(self, method: str) -> dict[str, float]:
        c = self.curves[method]
        i = int(np.argmin(np.abs(c["alpha"] - self.cfg.alpha)))
        return {"accuracy": float(c["accuracy"][i]), "loss": float(c["loss"][i])}

    @property
    def edge_scale(self) -> dict[str, Any]:
        ws = [weight_scale(e) for e in self.edges]
        return {"names": ws[0]["names"], "weight": np.mean([w["weight"] for w in ws], 0)}

    def scale_ratio(self, method: str) -> np.ndarray:
        """mean|W| of the merged model at α, per layer, divided by the edges' average."""
        return self.scales[method]["weight"] / self.edge_scale["weight"]


def aligned_partner(res: MergingResult, method: str) -> nn.Module:
    """Edge model 1 as merged by ``method``: unchanged for direct merging, else permuted onto model 0."""
    return res.edges[1] if method == "direct" else apply_permutation(res.edges[1], res.perms[method])


def run(cfg: Config, progress: bool = True) -> MergingResult:
    """Train (or load) the edge models, align them by WM and AM, and evaluate every α of the grid."""
    check_config(cfg, "preliminaries")
    torch.manual_seed(0)
    edges = edge_models(cfg, seeds=list(cfg.seeds[:2]), progress=progress)
    data, mdata = test_data(cfg), match_data(cfg)
    x = example_input(data, model=edges[0])
    inv = permutation_invariance(edges[0], data, seed=0)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    wm = weight_matching(edges[0], edges[1], x, seed=0)
    seconds["weight matching"] = time.perf_counter() - t
    t = time.perf_counter()
    am = activation_matching(edges[0], edges[1], mdata, example_input=x)
    seconds["activation matching"] = time.perf_counter() - t
    res = MergingResult(cfg=cfg, edges=edges, edge_metrics=[evaluate(e, data) for e in edges], invariance=inv,
                        perms={"weight matching": wm, "activation matching": am}, seconds=seconds,
                        n_test=len(data))
    for method in tqdm(METHODS, desc="merge", disable=not progress, leave=False):
        partner = aligned_partner(res, method)
        curve = interpolation_curve(edges[0], partner, data, cfg.alphas, progress=progress)
        res.curves[method] = curve
        res.barriers[method] = barrier(curve["alpha"], curve["accuracy"])
        res.scales[method] = weight_scale(interpolate(edges[0], partner, cfg.alpha))
    for method in tqdm(METHODS[1:], desc="REPAIR", disable=not progress, leave=False):
        name = f"{method} + REPAIR"
        res.curves[name] = repaired_curve(edges[0], aligned_partner(res, method), data, mdata, cfg.alphas,
                                          progress=progress)
        res.barriers[name] = barrier(res.curves[name]["alpha"], res.curves[name]["accuracy"])
    _reset_curves(res, data, mdata, progress)
    return res


def repaired_curve(model_a: nn.Module, partner: nn.Module, data: VisionData, calib: VisionData,
                   alphas: list[float], progress: bool = True) -> dict[str, np.ndarray]:
    """Accuracy and loss along α of the interpolation followed by REPAIR (paper Eq. 2): each channel's
    pre-activation mean/std on ``calib`` is set to (1−α)·edge₀ + α·partner. The two references are
    measured once; each α costs one pass over ``calib``."""
    stats = [layer_stats(model_a, calib), layer_stats(partner, calib)]
    return interpolation_curve(model_a, partner, data, alphas, progress=progress, after=lambda m, a: repair(
        m, data=calib, targets=weighted_stats(stats, [1 - a, a]), inplace=True))


def reset_curve(model_a: nn.Module, partner: nn.Module, data: VisionData, calib: VisionData,
                alphas: list[float], progress: bool = True) -> dict[str, np.ndarray]:
    """Accuracy and loss along α of the interpolation of two BatchNorm models followed by RESET (appendix
    Alg. 1): every BatchNorm's running statistics are re-estimated on ``calib``."""
    return interpolation_curve(model_a, partner, data, alphas, progress=progress,
                               after=lambda m, a: reset_bn_stats(m, calib, inplace=True))


def _reset_curves(res: MergingResult, data: VisionData, mdata: VisionData, progress: bool) -> None:
    """The RESET curves: a VGG-BN pair of the same recipe, aligned by WM and by AM, with and without RESET."""
    cfg = res.cfg
    bn = edge_models(cfg, norm="bn", seeds=list(cfg.seeds[:2]), progress=progress)
    res.bn_edge_metrics = [evaluate(e, data) for e in bn]
    x = example_input(data, model=bn[0])
    perms = {"weight matching": weight_matching(bn[0], bn[1], x, seed=0),
             "activation matching": activation_matching(bn[0], bn[1], mdata, example_input=x)}
    for method, perm in perms.items():
        partner = apply_permutation(bn[1], perm)
        res.curves[f"BN: {method}"] = interpolation_curve(bn[0], partner, data, cfg.alphas, progress=progress)
        res.curves[f"BN: {method} + RESET"] = reset_curve(bn[0], partner, data, mdata, cfg.alphas, progress=progress)
    for name in BN_CURVES:
        res.barriers[name] = barrier(res.curves[name]["alpha"], res.curves[name]["accuracy"])


def curve_groups(res: MergingResult) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """The chapter's three panels: the plain merges, the merges with REPAIR, and the BN pair with RESET."""
    return {"no normalization": {m: res.curves[m] for m in METHODS},
            "with REPAIR": {m: res.curves[m] for m in (*METHODS[1:], *REPAIRED)},
            "BatchNorm pair, with RESET": {m.removeprefix("BN: "): res.curves[m] for m in BN_CURVES}}


def normalized_table(res: MergingResult) -> list[dict[str, Any]]:
    """Per renormalized curve: accuracy and loss at α, and the barrier, next to the edges it merges."""
    bn_edge = float(np.mean([m["accuracy"] for m in res.bn_edge_metrics]))
    edge = float(np.mean([m["accuracy"] for m in res.edge_metrics]))
    rows = []
    for m in (*METHODS[1:], *REPAIRED, *BN_CURVES):
        mid = res.midpoint(m)
        rows.append({"edge models": "VGG-BN" if m.startswith("BN") else f"VGG ({res.cfg.norm})",
                     "edges (mean accuracy)": bn_edge if m.startswith("BN") else edge,
                     "merge": m.removeprefix("BN: "), f"accuracy at α={res.cfg.alpha:g}": mid["accuracy"],
                     "loss": mid["loss"], "barrier": res.barriers[m]})
    return rows


def training_table(cfg: Config) -> list[dict[str, Any]]:
    """Per edge model: seed, zoo key, final training loss and test accuracy as stored in the zoo."""
    rows = []
    for c in edge_configs(cfg)[:2]:
        meta = info(c, cfg.cache_dir)
        rows.append({"model": c.model, "seed": c.seed, "key": c.key, "epochs": c.epochs,
                     "train loss": round(meta["metrics"]["train_loss"], 4),
                     "test accuracy (full split)": round(meta["metrics"]["test_accuracy"], 4)})
    return rows


def summary_table(res: MergingResult) -> list[dict[str, Any]]:
    """Per merging method: accuracy and loss at α, barrier, and the time the alignment took."""
    edge_acc = float(np.mean([m["accuracy"] for m in res.edge_metrics]))
    edge_loss = float(np.mean([m["loss"] for m in res.edge_metrics]))
    rows = [{"model": "edges (mean)", "accuracy": edge_acc, "loss": edge_loss, "barrier": "",
             "mean|W| / edges (all layers)": 1.0, "alignment seconds": ""}]
    for m in METHODS:
        mid = res.midpoint(m)
        rows.append({"model": f"{m}, α={res.cfg.alpha:g}", "accuracy": mid["accuracy"], "loss": mid["loss"],
                     "barrier": res.barriers[m],
                     "mean|W| / edges (all layers)": float(np.mean(res.scale_ratio(m))),
                     "alignment seconds": round(res.seconds.get(m, 0.0), 2) if m != "direct" else ""})
    return rows


def scale_table(res: MergingResult) -> list[dict[str, Any]]:
    """Per conv/linear layer: mean|W| of the merged midpoint divided by the edges' average, per method."""
    ratios = {m: res.scale_ratio(m) for m in METHODS}
    return [{"layer": name, **{m: float(ratios[m][i]) for m in METHODS}}
            for i, name in enumerate(res.edge_scale["names"])]


def plot_scale(ax, res: MergingResult) -> None:
    """Merged-to-edge weight-scale ratio per layer, one line per method."""
    from ..plots import color, style
    with style():
        depth = np.arange(1, len(res.edge_scale["names"]) + 1)
        for i, m in enumerate(METHODS):
            ax.plot(depth, res.scale_ratio(m), "o-", label=m, color=color(m, i))
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xlabel("layer (conv / linear)")
        ax.set_ylabel("mean|W_α| / mean|W_edge|")
        ax.set_title(f"parameter scale of the merged model, α = {res.cfg.alpha:g}")
        ax.legend()


def claims(res: MergingResult) -> list[dict[str, Any]]:
    """The paper's §2 claims, each checked on this run: claim, whether it holds, the evidence. Accuracy
    comparisons hold only beyond the test-set noise (:mod:`vfnb.chapters.claims`)."""
    c = Claims(n=res.n_test or None)
    inv = res.invariance
    c.add("Permuting hidden units (and the next layer's inputs) leaves the outputs unchanged",
          bool(inv["max |f(x) − f_π(x)|"] <= 1e-4 * max(1.0, inv["max |f(x)|"])),
          f"max |f(x) − f_π(x)| = {inv['max |f(x) − f_π(x)|']:.2e} (outputs up to {inv['max |f(x)|']:.1f}), "
          f"{inv['units moved']} units moved")
    edge_acc = float(np.mean([m["accuracy"] for m in res.edge_metrics]))
    d, w, a = (res.midpoint(m)["accuracy"] for m in METHODS)
    c.add("Direct merging of models with different initializations degrades badly", d < edge_acc - 0.2,
          f"direct midpoint {d:.3f} vs edges {edge_acc:.3f}; barrier {res.barriers['direct']:.3f}",
          paper="chance, 10 % (CIFAR-10 VGG16)")
    c.add("Weight-matching merging improves on direct merging",
          all_of(c.greater(w, d), bool(res.barriers["weight matching"] < res.barriers["direct"])),
          f"WM midpoint {w:.3f} (barrier {res.barriers['weight matching']:.3f}) vs direct {d:.3f} (±{c.margin(w, d):.3f})")
    c.add("Activation-matching merging improves on direct merging",
          all_of(c.greater(a, d), bool(res.barriers["activation matching"] < res.barriers["direct"])),
          f"AM midpoint {a:.3f} (barrier {res.barriers['activation matching']:.3f}) vs direct {d:.3f} (±{c.margin(a, d):.3f})")
    c.add("A gap to the edge models remains after alignment (without REPAIR)", c.less(max(w, a), edge_acc),
          f"best aligned midpoint {max(w, a):.3f} vs edges {edge_acc:.3f} (±{c.margin(max(w, a), edge_acc):.3f})")
    rw_, ra_ = (res.midpoint(m)["accuracy"] for m in REPAIRED)
    c.add("REPAIR raises the aligned midpoints (WM and AM)", all_of(c.greater(rw_, w), c.greater(ra_, a)),
          f"midpoint WM {w:.3f} → {rw_:.3f} with REPAIR, AM {a:.3f} → {ra_:.3f} (edges {edge_acc:.3f})")
    if res.bn_edge_metrics:
        bn_edge = float(np.mean([m["accuracy"] for m in res.bn_edge_metrics]))
        bw, bwr = (res.midpoint(m)["accuracy"] for m in (BN_CURVES[0], BN_CURVES[2]))
        c.add("For BatchNorm models, RESET is needed after merging", c.greater(bwr, bw),
              f"VGG-BN WM midpoint {bw:.3f} → {bwr:.3f} with RESET (edges {bn_edge:.3f}; ±{c.margin(bwr, bw):.3f})")
    rd, rw, ra = (float(np.mean(res.scale_ratio(m))) for m in METHODS)
    c.add("Merging shrinks the parameter scale, alignment less so", rd < 1 and rd < min(rw, ra),
          f"mean|W_α| / edges averaged over layers: direct {rd:.3f}, WM {rw:.3f}, AM {ra:.3f}")
    return c.table()
