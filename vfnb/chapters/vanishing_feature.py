"""Paper §5.1: the vanishing feature in merged CNNs.

Merged midpoint VGG16, VGG16-BN, ResNet20 (BatchNorm) and ResNet20-LN: their output logits against
f(0) (Fig. 3A), their normalized upper-bound sequences (Fig. 3B), and Definition 5.1 checked on each.
Every merged model is θ_α = (1−α)·θ₀ + α·π(θ₁), with π from ``cfg.alignment`` (weight matching by
default, as in the paper's Fig. 3), without post-merging normalization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config
from ..plots import color
from ..diagnose import VFCurve, feature_bias, scale_parameters, weight_norms
from .claims import Claims, all_of
from .common import ALIGNMENT_NAMES, VF_THRESHOLD, Merged, check_config, load_edges, match_data, merge_pair, test_data

#: The architectures of Fig. 3B (labels of :data:`vfnb.chapters.common.ARCHS`).
FIG3B = ("VGG16", "VGG16-BN", "ResNet20", "ResNet20-LN")


@dataclass
class VanishingResult:
    """Fig. 3A/3B and Definition 5.1 for the merged midpoint models of :data:`FIG3B`."""

    cfg: Config
    merged: dict[str, Merged]
    n_test: int = 0  # test images behind every accuracy
    degradation: "Degradation | None" = None  # appendix A.5.2 on VGG16

    @property
    def curves(self) -> dict[str, VFCurve]:
        return {k: m.curve for k, m in self.merged.items()}

    def table(self) -> list[dict[str, Any]]:
        return [m.summary() for m in self.merged.values()]


def run(cfg: Config, progress: bool = True) -> VanishingResult:
    """§5.1: merge the edge models of every Fig. 3B architecture at ``cfg.alpha`` and measure them."""
    check_config(cfg, "vanishing_feature")
    torch.manual_seed(0)
    test, mdata = test_data(cfg), match_data(cfg)
    merged = {}
    for label in tqdm(FIG3B, desc="architectures", disable=not progress, leave=False):
        merged[label] = merge_pair(cfg, load_edges(cfg, label, test, progress), test, mdata,
                                   with_logits=label.startswith("ResNet"))
    res = VanishingResult(cfg, merged, n_test=len(test))
    res.degradation = magnitude_degradation(res)
    return res


def logit_table(res: VanishingResult) -> list[dict[str, Any]]:
    """Fig. 3A in numbers: per model, the logits' spread over the data against the offset f(0)."""
    rows = []
    for label, m in res.merged.items():
        for who, s in m.logits.items():
            rows.append({"model": label, "which": who,
                         "logit std over the data (mean over classes)": float(s.std.mean()),
                         "‖f(0)‖/√C": float(np.linalg.norm(s.zero) / np.sqrt(len(s.zero))),
                         "offset / spread": s.offset_ratio})
    return rows


def definition_table(res: VanishingResult) -> list[dict[str, Any]]:
    """Definition 5.1 per merged model: the bound is a valid non-increasing bound, and how small it ends."""
    rows = []
    for label, m in res.merged.items():
        c = m.curve
        rows.append({"model": label, "layer outputs L": len(c.layers),
                     "bound non-increasing": "yes" if bool(np.all(np.diff(c.bound) <= 1e-12)) else "no",
                     "bound ≥ E_l everywhere": "yes" if bool(np.all(c.bound >= c.ratio - 1e-12)) else "no",
                     "ε_1": float(c.bound[0]), "ε_L": float(c.bound[-1]),
                     f"ε_L < {VF_THRESHOLD} (VF)": "yes" if c.vanishes(VF_THRESHOLD) else "no",
                     "edge accuracy": float(np.mean(m.edge_accuracy)), "merged accuracy": m.accuracy})
    return rows


#: Appendix A.5.2: the degradation factors λ of the weights (biases keep μ = 1), applied to VGG16's edge model 0.
MAGNITUDE_LAMBDAS = (0.95, 0.9, 0.8)


@dataclass
class Degradation:
    """Appendix A.5.2 on one edge model: per layer, E‖g‖ and ‖h‖ after scaling every weight by λ (biases by μ),
    over the unscaled model's, for each λ; and the weights' norms of the pair and of their midpoints."""

    label: str
    lambdas: tuple[float, ...]
    mu: float
    g_ratio: np.ndarray  # [λ, layer]
    h_ratio: np.ndarray  # [λ, layer]
    norms: dict[str, dict]  # "direct" / alignment -> vfnb.diagnose.weight_norms


def magnitude_degradation(res: VanishingResult, label: str = "VGG16", lambdas: tuple[float, ...] = MAGNITUDE_LAMBDAS,
                          mu: float = 1.0) -> Degradation:
    """Appendix A.5.2, measured: scale edge model 0 of ``label`` (λ on every weight, μ on every bias) and compare
    its feature and offset with the unscaled model's at every conv/linear output; and the triangle-inequality bound
    on the merged weights' norm, for the direct and the aligned midpoint."""
    m = res.merged[label]
    test = test_data(res.cfg)
    base = m.edge_fb[0]  # edge model 0 on the same test images (common.load_edges)
    g, h = [], []
    for lam in lambdas:
        fb = feature_bias(scale_parameters(m.edges[0], lam, mu), test, names=base.names)
        g.append(fb.g_mean / base.g_mean)
        h.append(fb.h_norm / np.maximum(base.h_norm, 1e-30))
    norms = {"direct": weight_norms(m.edges[0], m.edges[1], res.cfg.alpha)}
    if m.alignment != "direct":
        norms[ALIGNMENT_NAMES[m.alignment]] = weight_norms(m.edges[0], m.partner, res.cfg.alpha)
    return Degradation(label, tuple(lambdas), mu, np.array(g), np.array(h), norms)


def degradation_table(d: Degradation) -> list[dict[str, Any]]:
    """Per layer l: E‖g‖ ratio against λˡ (the linear-network prediction) and the ‖h‖ ratio, per λ."""
    rows = []
    for l in range(d.g_ratio.shape[1]):
        row: dict[str, Any] = {"layer l": l + 1}
        for i, lam in enumerate(d.lambdas):
            row[f"g ratio, λ={lam:g}"] = float(d.g_ratio[i, l])
            row[f"λ^l, λ={lam:g}"] = float(lam ** (l + 1))
            row[f"h ratio, λ={lam:g}"] = float(d.h_ratio[i, l])
        rows.append(row)
    return rows


def norm_table(d: Degradation) -> list[dict[str, Any]]:
    """Per layer: ‖W₀‖, ‖W₁‖ and each midpoint's ‖W_α‖ over the triangle bound (1−α)‖W₀‖ + α‖W₁‖."""
    first = next(iter(d.norms.values()))
    rows = []
    for i, name in enumerate(first["names"]):
        row: dict[str, Any] = {"layer": name, "‖W₀‖": float(first["a"][i]), "‖W₁‖": float(first["b"][i])}
        for who, n in d.norms.items():
            row[f"‖W_α‖ / bound, {who}"] = float(n["merged"][i] / n["triangle"][i])
        rows.append(row)
    return rows


def plot_degradation(axes, d: Degradation) -> None:
    """Left: E‖g⁽ˡ⁾‖ (solid) and ‖h⁽ˡ⁾‖ (dashed) of the scaled edge model over the unscaled one, with λˡ dotted.
    Right: ‖W_α‖ over its triangle-inequality bound per layer, direct and aligned, with 1/√2 (independent
    Gaussian weights) marked."""
    colors = ["#2980b9", "#8e44ad", "#c0392b", "#e67e22"]
    layers = np.arange(1, d.g_ratio.shape[1] + 1)
    ax = axes[0]
    for i, lam in enumerate(d.lambdas):
        c = colors[i % len(colors)]
        ax.semilogy(layers, d.g_ratio[i], marker="o", color=c, label=f"E‖g‖, λ = {lam:g}")
        ax.semilogy(layers, d.h_ratio[i], marker="x", ls="--", color=c, label=f"‖h‖, λ = {lam:g}")
        ax.semilogy(layers, lam ** layers, ls=":", color=c, lw=1)
    ax.set_xlabel("layer l")
    ax.set_ylabel("scaled / original")
    ax.set_title(f"{d.label} edge 0, weights × λ (dotted: λˡ)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax = axes[1]
    for i, (who, n) in enumerate(d.norms.items()):
        ax.plot(np.arange(1, len(n["names"]) + 1), n["merged"] / n["triangle"], marker="o", color=color(who, i),
                label=who)
    ax.axhline(1.0, color="k", lw=0.8, label="triangle bound")
    ax.axhline(2 ** -0.5, color="k", lw=0.8, ls=":", label="1/√2 (independent)")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("conv/linear layer")
    ax.set_ylabel("‖W_α‖ / ((1−α)‖W₀‖ + α‖W₁‖)")
    ax.set_title("Merged weights' norm against the bound")
    ax.legend(loc="lower left")


def claims(res: VanishingResult) -> list[dict[str, str]]:
    """The paper's §5.1 claims, checked on this run (accuracy comparisons beyond the test-set noise,
    :mod:`vfnb.chapters.claims`)."""
    c = Claims(n=res.n_test or None)
    m = res.merged
    edge = {k: float(np.mean(v.edge_accuracy)) for k, v in m.items()}
    c.add("Merging models trained from different initializations loses accuracy (no normalization)",
          all_of(*(c.less(v.accuracy, edge[k]) for k, v in m.items())),
          "; ".join(f"{k}: {v.accuracy:.3f} vs edges {edge[k]:.3f} (±{c.margin(v.accuracy, edge[k]):.3f})"
                    for k, v in m.items()))
    vf = {k: v.curve.vanishes(VF_THRESHOLD) for k, v in m.items()}
    c.add(f"Definition 5.1 holds for every merged model: the normalized non-increasing bound ends small "
          f"(here: ε_L < {VF_THRESHOLD})", all(vf.values()),
          "; ".join(f"{k}: ε_L = {v.eps_last:.3g}" for k, v in m.items()))
    c.add("The input-induced feature shrinks with depth (bound at the output below the bound at layer 1)",
          all(v.curve.bound[-1] < v.curve.bound[0] for v in m.values()),
          "; ".join(f"{k}: ε_1 = {v.curve.bound[0]:.3g} → ε_L = {v.eps_last:.3g}" for k, v in m.items()))
    for k in ("ResNet20", "ResNet20-LN"):
        if k in m and m[k].logits:
            lg = list(m[k].logits.values())
            edge_std = float(np.mean([s.std.mean() for s in lg[:2]]))
            merged_std = float(lg[2].std.mean())
            c.add(f"Fig. 3A ({k}): the merged model's logits barely vary with the input (spread over the "
                  "data far below the edges')", merged_std < 0.5 * edge_std,
                  f"mean per-class std of the logits: merged {merged_std:.3g}, edges {edge_std:.3g}; "
                  f"‖f(0)‖/std: merged {lg[2].offset_ratio:.3g}, edges "
                  f"{np.mean([s.offset_ratio for s in lg[:2]]):.3g}")
    if "ResNet20" in m and "ResNet20-LN" in m:
        a, b = m["ResNet20"].eps_last, m["ResNet20-LN"].eps_last
        c.add("The vanishing feature is milder in ResNet20-LN than in ResNet20 (BatchNorm, no RESET)",
              b > a, f"ε_L: ResNet20-LN {b:.3g}, ResNet20 {a:.3g}")
    d = res.degradation
    if d is not None:
        lam, last = d.lambdas[-1], d.g_ratio.shape[1]
        g, h = float(d.g_ratio[-1, -1]), float(d.h_ratio[-1, -1])
        c.add(f"A.5.2: scaling the weights by λ < 1 shrinks the feature g geometrically with depth, the offset h "
              f"less (λ = {lam:g})", bool(g < h and g < lam ** (last / 2)),
              f"at layer {last}: E‖g‖ × {g:.3g}, ‖h‖ × {h:.3g}; λ^L = {lam ** last:.3g}")
        med = {who: float(np.median(n["merged"] / n["triangle"])) for who, n in d.norms.items()}
        aligned = [who for who in med if who != "direct"]
        c.add("A.5.2: without alignment the merged weights keep about 1/√2 of the edges' norm (as for independent "
              "weights), and alignment keeps more", bool(0.6 <= med["direct"] <= 0.85 and
                                                         all(med[w] > med["direct"] for w in aligned)),
              "median over the layers of ‖W_α‖ / ((1−α)‖W₀‖ + α‖W₁‖) (≤ 1 by the triangle inequality): "
              + ", ".join(f"{who} {v:.2f}" for who, v in med.items()) + f"; 1/√2 = {2 ** -0.5:.2f}")
    return c.table()
