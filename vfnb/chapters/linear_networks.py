"""Paper §4: merging two linear networks (Fig. 1, Definition 4.1, accuracy against α)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..config import Config
from ..diagnose import FeatureBias, feature_bias, rescaled_features, weight_scale
from ..evaluate import barrier, evaluate
from ..merge import interpolate
from ..train import TrainConfig
from ..zoo import get_or_train, info, resolve_device
from .claims import Claims, all_of
from .common import check_config, linear_mlp_configs, test_data


def edge_configs(cfg: Config) -> list[TrainConfig]:
    """The training configuration of each edge model: a linear MLP per seed (paper Table 2)."""
    return linear_mlp_configs(cfg)


@dataclass
class LinearResult:
    """Everything the §4 chapter plots, for edge models 0 and 1 (the first two seeds)."""

    cfg: Config
    edges: list[nn.Module]
    edge_accuracy: list[float]
    alphas: list[float]
    curve: dict[str, np.ndarray]
    barrier: float
    edge_fb: list[FeatureBias]
    merged_fb: dict[float, FeatureBias] = field(default_factory=dict)
    merged_scale: dict[float, dict[str, Any]] = field(default_factory=dict)
    rescaled: dict[float, np.ndarray] = field(default_factory=dict)
    n_test: int = 0  # test images behind every accuracy

    @property
    def edge_scale(self) -> list[dict[str, Any]]:
        return [weight_scale(e) for e in self.edges]

    def summary(self, alpha: float | None = None) -> dict[str, float]:
        """Headline numbers at ``alpha`` (default: the configured α)."""
        a = self._nearest(alpha)
        fb, ref = self.merged_fb[a], self.edge_fb
        g_edge = np.mean([e.g_mean for e in ref], 0)
        h_edge = np.mean([e.h_norm for e in ref], 0)
        i = int(np.argmin(np.abs(self.curve["alpha"] - a)))
        return {
            "alpha": a,
            "edge accuracy (mean)": float(np.mean(self.edge_accuracy)),
            "merged accuracy": float(self.curve["accuracy"][i]),
            "barrier": self.barrier,
            "E|g| merged / edges, first layer": float(fb.g_mean[0] / g_edge[0]),
            "E|g| merged / edges, last layer": float(fb.g_mean[-1] / g_edge[-1]),
            "|h| / E|g|, last layer, merged": float(fb.h_norm[-1] / fb.g_mean[-1]),
            "|h| / E|g|, last layer, edges": float(h_edge[-1] / g_edge[-1]),
            "Var f merged / edges, last layer": float(fb.variance[-1] / np.mean([e.variance[-1] for e in ref])),
        }

    def _nearest(self, alpha: float | None) -> float:
        a = self.cfg.alpha if alpha is None else alpha
        return min(self.merged_fb, key=lambda k: abs(k - a))


def run(cfg: Config, progress: bool = True) -> LinearResult:
    """Train (or load) the edge models, then measure every α of the grid.

    Per α: accuracy, and the feature–bias decomposition, weight scale and rescaled feature of the
    merged model θ_α = (1−α)θ₀ + αθ₁ (direct merging: linear networks are compared unaligned here;
    alignment is the subject of chapter 2, ``02_preliminaries``).
    """
    check_config(cfg, "linear_networks")
    device = resolve_device(cfg.device)
    edges = [get_or_train(c, cache_dir=cfg.cache_dir, data_root=cfg.data_root, device=device, progress=progress)
             for c in edge_configs(cfg)][:2]
    data = test_data(cfg)
    alphas = cfg.alphas
    acc, loss = [], []
    merged_fb, merged_scale, rescaled = {}, {}, {}
    for a in tqdm(alphas, desc="α grid", disable=not progress, leave=False):
        merged = interpolate(edges[0], edges[1], a)  # one merged model per α serves every measurement
        r = evaluate(merged, data)
        acc.append(r["accuracy"])
        loss.append(r["loss"])
        merged_fb[a] = fb = feature_bias(merged, data)
        merged_scale[a] = weight_scale(merged)
        rescaled[a] = rescaled_features(fb, merged, edges)
    curve = {"alpha": np.array(alphas), "accuracy": np.array(acc), "loss": np.array(loss)}
    return LinearResult(cfg=cfg, edges=edges, edge_accuracy=[evaluate(e, data)["accuracy"] for e in edges],
                        alphas=alphas, curve=curve, barrier=barrier(curve["alpha"], curve["accuracy"]),
                        edge_fb=[feature_bias(e, data) for e in edges], merged_fb=merged_fb,
                        merged_scale=merged_scale, rescaled=rescaled, n_test=len(data))


def training_table(cfg: Config) -> list[dict[str, Any]]:
    """Per edge model: seed, zoo key, final training loss and test accuracy as stored in the zoo."""
    rows = []
    for c in edge_configs(cfg)[:2]:
        meta = info(c, cfg.cache_dir)
        rows.append({"seed": c.seed, "key": c.key, "epochs": c.epochs,
                     "train loss": round(meta["metrics"]["train_loss"], 4),
                     "test accuracy (full split)": round(meta["metrics"]["test_accuracy"], 4)})
    return rows


def claims(res: LinearResult) -> list[dict[str, Any]]:
    """The paper's §4 claims, each checked on this run: claim, whether it holds, the evidence. Accuracy
    comparisons hold only beyond the test-set noise (:mod:`vfnb.chapters.claims`)."""
    c = Claims(n=res.n_test or None)
    a = res._nearest(None)
    fb, ref = res.merged_fb[a], res.edge_fb
    g_edge = np.mean([e.g_mean for e in ref], 0)
    h_edge = np.mean([e.h_norm for e in ref], 0)
    s = res.summary(a)
    ws = res.merged_scale[a]["weight"]
    we = np.mean([e["weight"] for e in res.edge_scale], 0)
    merged, edges = s["merged accuracy"], s["edge accuracy (mean)"]
    c.add(f"Merging at α={a:.2f} loses accuracy", all_of(c.less(merged, edges), bool(merged < edges - 0.05)),
          f"merged {merged:.3f} vs edges {edges:.3f} (±{c.margin(merged, edges):.3f}); barrier {res.barrier:.3f}")
    rel = fb.g_mean / g_edge
    c.add("The merged model's input-induced feature g vanishes with depth (relative to the edges)",
          bool(rel[-1] < rel[0] and rel[-1] < 0.5),
          f"E‖g_α‖ / E‖g_edge‖ goes from {rel[0]:.3f} (layer 1) to {rel[-1]:.4f} (layer {len(rel)})")
    c.add("The offset h grows with depth", bool(fb.h_norm[-1] > fb.h_norm[0]),
          f"‖h_α‖ goes from {fb.h_norm[0]:.4f} to {fb.h_norm[-1]:.4f}")
    c.add("In the last layer h overtakes g in the merged model but not in the edges",
          bool(fb.h_norm[-1] > fb.g_mean[-1] and h_edge[-1] < g_edge[-1]),
          f"‖h‖/E‖g‖ = {s['|h| / E|g|, last layer, merged']:.2f} merged, {s['|h| / E|g|, last layer, edges']:.3f} edges")
    c.add("Merging shrinks the weights (mean |W| below the edges' in every layer)", bool(np.all(ws < we)),
          f"mean|W_α| / mean|W_edge| per layer: {np.round(ws / we, 2).tolist()}")
    c.add("Variance collapses (Definition 4.1) in the last layer", bool(s["Var f merged / edges, last layer"] < 0.1),
          f"Var f_α / Var f_edge = {s['Var f merged / edges, last layer']:.4f}")
    resc = res.rescaled[a] / g_edge
    c.add("Rescaling g by the weight-scale ratio alleviates the vanishing", bool(resc[-1] > rel[-1] * 2),
          f"last layer relative to edges: {rel[-1]:.4f} before, {resc[-1]:.3f} after rescaling")
    return c.table()
