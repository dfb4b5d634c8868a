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
from ..diagnose import VFCurve
from .claims import Claims, all_of
from .common import VF_THRESHOLD, Merged, check_config, load_edges, match_data, merge_pair, test_data

#: The architectures of Fig. 3B (labels of :data:`vfnb.chapters.common.ARCHS`).
FIG3B = ("VGG16", "VGG16-BN", "ResNet20", "ResNet20-LN")


@dataclass
class VanishingResult:
    """Fig. 3A/3B and Definition 5.1 for the merged midpoint models of :data:`FIG3B`."""

    cfg: Config
    merged: dict[str, Merged]
    n_test: int = 0  # test images behind every accuracy

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
    return VanishingResult(cfg, merged, n_test=len(test))


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
    return c.table()
