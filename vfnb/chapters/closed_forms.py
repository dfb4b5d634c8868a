"""Paper §A.1: the closed forms of a merged linear network (Proposition A.1 = Eq. 4.1, Proposition A.2 =
Eq. 5.2, Corollary A.3), computed from the weights alone and checked against the network's forward pass at
every layer; what Eq. 5.2 says about the vanishing feature."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import closed_form as cf
from ..activations import inputs
from ..config import Config
from ..merge import interpolate
from ..models import build_model
from ..train import TrainConfig
from ..zoo import get_or_train, resolve_device
from .claims import Claims
from .common import check_config, linear_mlp_configs, test_data

#: The three statements, in the paper's order, and the misprinted corollary.
STATEMENTS = {"Prop. A.1 (Eq. 4.1)": "no residuals (the §4 networks)",  # label -> the networks it is checked on
              "Prop. A.2 (Eq. 5.2)": "a residual at every layer (square, untrained)",
              "Cor. A.3": "a residual at every layer but the first (trained)",
              "Cor. A.3 as printed": "the same, summing k = 1…l as printed (no e₀)"}
#: A closed form "matches" the forward pass when its relative error is below this (float32 weights).
TOLERANCE = 1e-5


@dataclass
class ClosedFormsResult:
    """Per statement and layer, the relative error of the closed form against the forward pass; and, for the
    merged trained networks, the feature's size per layer against the edges' (plain and residual) with Eq. 5.2's
    terms by order."""

    cfg: Config
    errors: dict[str, dict[str, np.ndarray]]  # statement -> {"f", "g", "h"} -> per-layer relative error
    g_ratio: dict[str, np.ndarray]  # "plain"/"residual" -> E‖g_α‖ / mean of the edges' E‖g‖, per layer
    orders: np.ndarray  # [layer, k]: E‖e_k(…)x'‖ of the merged residual network / edges' E‖g‖
    edge_accuracy: dict[str, list[float]]


def _measure(closed: list[cf.ClosedForm], model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    forward = cf.forward_activations(model, x)
    zero = cf.forward_activations(model, torch.zeros_like(x[:1]))
    out = {"f": [], "g": [], "h": []}
    for c, f, f0 in zip(closed, forward, zero):
        out["f"].append(cf.relative_error(c.f, f))
        out["g"].append(cf.relative_error(c.g, f - f0))  # g = f(x) − f(0), measured
        out["h"].append(cf.relative_error(c.h, f0[0]))
    return {k: np.array(v) for k, v in out.items()}


def _g_norm(t: torch.Tensor) -> float:
    """E_x‖t(x)‖/√d (the book's feature size, :class:`vfnb.FeatureBias`)."""
    return float(t.norm(dim=1).mean() / t.shape[1] ** 0.5)


def _trained(cfg: Config, configs: list[TrainConfig], progress: bool) -> list[nn.Module]:
    device = resolve_device(cfg.device)
    return [get_or_train(c, cache_dir=cfg.cache_dir, data_root=cfg.data_root, device=device, progress=progress)
            .cpu().eval() for c in configs[:2]]


def run(cfg: Config, progress: bool = True) -> ClosedFormsResult:
    """Check every closed form of appendix A.1 at every layer on ``n_inputs`` Gaussian inputs.

    - Prop. A.1 on the trained linear MLPs of §4 (the zoo's, shared with that chapter), merged at α;
    - Prop. A.2 on two untrained linear MLPs of width ``width`` with a residual at every layer (input and
      output of width ``width``, so that every layer can have one);
    - Cor. A.3 on linear MLPs with the §4 recipe and a residual at every layer whose widths agree, trained
      here; the statement covers layers 1…L−1 (the classifier has no residual).
    """
    check_config(cfg, "closed_forms")
    gen = torch.Generator().manual_seed(cfg.seeds[0])
    plain = _trained(cfg, linear_mlp_configs(cfg), progress)
    residual = _trained(cfg, linear_mlp_configs(cfg, residual=True), progress)
    d_in = plain[0].layers[0].in_features
    x = torch.randn(cfg.n_inputs, d_in, generator=gen)
    errors: dict[str, dict[str, np.ndarray]] = {}

    merged = interpolate(plain[0], plain[1], cfg.alpha)
    layers = cf.merged_layers(cf.linear_layers(plain[0]), cf.linear_layers(plain[1]), cfg.alpha)
    errors["Prop. A.1 (Eq. 4.1)"] = _measure(cf.eq_4_1(layers, x), merged, x)

    square = []
    for s in cfg.seeds[:2]:
        torch.manual_seed(s)
        square.append(build_model("mlp", in_features=cfg.width, num_classes=cfg.width, depth=cfg.depth,
                                  width=cfg.width, activation="none", residual=True).eval())
    xs = torch.randn(cfg.n_inputs, cfg.width, generator=gen)
    layers = cf.merged_layers(cf.linear_layers(square[0]), cf.linear_layers(square[1]), cfg.alpha)
    errors["Prop. A.2 (Eq. 5.2)"] = _measure(cf.eq_5_2(layers, xs), interpolate(square[0], square[1], cfg.alpha), xs)

    merged_res = interpolate(residual[0], residual[1], cfg.alpha)
    layers = cf.merged_layers(cf.linear_layers(residual[0]), cf.linear_layers(residual[1]), cfg.alpha)[:-1]
    errors["Cor. A.3"] = _measure(cf.eq_5_2(layers, x), merged_res, x)
    errors["Cor. A.3 as printed"] = _measure(cf.eq_5_2(layers, x, printed_corollary=True), merged_res, x)

    # the vanishing feature through Eq. 5.2, on test images: the merged model's feature per layer against the
    # edges', for the plain and the residual networks, and the residual network's feature by order k
    test = test_data(cfg)
    xt = inputs(test, cfg.n_inputs)
    g_ratio, edge_g = {}, {}
    for name, edges in (("plain", plain), ("residual", residual)):
        merged_net = merged if name == "plain" else merged_res
        edge_g[name] = np.mean([[_g_norm(c.g) for c in _closed(e, xt)] for e in edges], axis=0)
        forms = _closed(merged_net, xt)
        g_ratio[name] = np.array([_g_norm(c.g) for c in forms]) / edge_g[name]
    forms = forms[:-1]  # the merged residual network's Eq. 5.2 layers (its terms by order)
    orders = np.full((len(forms), len(forms)), np.nan)
    for l, c in enumerate(forms):
        for k, t in enumerate(c.terms):
            orders[l, k] = _g_norm(t) / edge_g["residual"][l]
    from ..evaluate import evaluate
    acc = {name: [evaluate(e, test)["accuracy"] for e in edges] for name, edges in (("plain", plain),
                                                                                    ("residual", residual))}
    return ClosedFormsResult(cfg=cfg, errors=errors, g_ratio=g_ratio, orders=orders, edge_accuracy=acc)


def _closed(model: nn.Module, x: torch.Tensor) -> list[cf.ClosedForm]:
    """Every layer's closed form of a linear MLP: Eq. 4.1 without residuals; with them, Eq. 5.2 up to layer L−1
    and the plain classifier as one more factor."""
    layers = cf.linear_layers(model)
    if not any(layer.residual for layer in layers):
        return cf.eq_4_1(layers, x)
    forms = cf.eq_5_2(layers[:-1], x)
    last, prev = layers[-1], forms[-1]
    return forms + [cf.ClosedForm(prev.g @ last.weight.T, last.weight @ prev.h + last.bias)]


def error_table(res: ClosedFormsResult) -> list[dict[str, Any]]:
    """Per statement: the network, its layers, and the largest relative error of f, g and h over the layers."""
    return [{"statement": s, "network": STATEMENTS[s], "layers checked": len(e["f"]),
             "max rel. error f": float(e["f"].max()), "max rel. error g": float(e["g"].max()),
             "max rel. error h": float(e["h"].max())} for s, e in res.errors.items()]


def plot_errors(ax, res: ClosedFormsResult) -> None:
    """Relative error of each closed form against the forward pass, per layer (log scale)."""
    styles = {"Prop. A.1 (Eq. 4.1)": ("#2980b9", "o"), "Prop. A.2 (Eq. 5.2)": ("#27ae60", "s"),
              "Cor. A.3": ("#c0392b", "^"), "Cor. A.3 as printed": ("#7f8c8d", "x")}
    for s, e in res.errors.items():
        color, marker = styles[s]
        ax.semilogy(np.arange(1, len(e["f"]) + 1), e["f"], marker=marker, color=color, label=s,
                    ls="--" if "printed" in s else "-")
    ax.axhline(TOLERANCE, color="k", lw=0.8, ls=":")
    ax.set_xlabel("layer l")
    ax.set_ylabel("‖closed form − forward‖ / ‖forward‖")
    ax.set_title("Closed forms against the forward pass")
    ax.legend(loc="center right")


def plot_identity_path(axes, res: ClosedFormsResult) -> None:
    """Left: E‖g_α‖ over the edges' per layer, plain against residual. Right: the merged residual network's
    feature split by Eq. 5.2's order k (e₀ is the identity path), over the edges' E‖g‖."""
    ax = axes[0]
    for name, color in (("plain", "#c0392b"), ("residual", "#27ae60")):
        r = res.g_ratio[name]
        ax.semilogy(np.arange(1, len(r) + 1), r, marker="o", color=color, label=f"{name} linear MLP")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("layer l")
    ax.set_ylabel("E‖g_α‖ / E‖g_edges‖")
    ax.set_title(f"Merged over edges (α = {res.cfg.alpha:g})")
    ax.legend(loc="lower left")
    ax = axes[1]
    o = res.orders
    layers = np.arange(1, o.shape[0] + 1)
    colors = ["#27ae60", "#2980b9", "#8e44ad", "#e67e22", "#7f8c8d", "#c0392b", "#16a085", "#34495e"]
    for k in range(o.shape[1]):
        mask = ~np.isnan(o[:, k])
        if mask.any():
            ax.semilogy(layers[mask], o[mask, k], marker="o", color=colors[k % len(colors)],
                        label="e₀ (identity path)" if k == 0 else f"e{_sub(k)}")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("layer l")
    ax.set_ylabel("E‖e_k(W⁽²⁾…W⁽ˡ⁾) W⁽¹⁾x‖ / E‖g_edges‖")
    ax.set_title("Residual network by order k")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _sub(k: int) -> str:
    return str(k).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def claims(res: ClosedFormsResult) -> list[dict[str, str]]:
    """The appendix's statements, each checked here."""
    c = Claims()
    for s in ("Prop. A.1 (Eq. 4.1)", "Prop. A.2 (Eq. 5.2)", "Cor. A.3"):
        worst = float(res.errors[s]["f"].max())
        c.add(f"{s}: the closed form equals the forward pass at every layer", worst < TOLERANCE,
              f"largest relative error {worst:.1e} (float32 weights; tolerance {TOLERANCE:g})")
    printed = float(res.errors["Cor. A.3 as printed"]["f"][1:].min())
    right = float(res.errors["Cor. A.3"]["f"].max())
    c.add("Cor. A.3 is misprinted: summing the feature over k = 1…l, as printed, drops e₀ (the identity path), "
          "and k = 0…l−1 is right", bool(printed > 100 * TOLERANCE and right < TOLERANCE),
          f"relative error at layers 2…{len(res.errors['Cor. A.3']['f'])}: at least {printed:.2f} as printed, at most "
          f"{right:.1e} with k = 0…l−1")
    layer = res.orders.shape[0]  # L−1: the last layer with a residual connection
    plain, res_ = res.g_ratio["plain"][layer - 1], res.g_ratio["residual"][layer - 1]
    c.add("Residual connections keep more of the merged feature (paper §5.2, Eq. 5.2)", bool(res_ > plain),
          f"E‖g_α‖/E‖g_edges‖ at layer {layer}: residual {res_:.2f}, plain {plain:.2f}")
    e0 = float(res.orders[-1, 0])
    c.add("The identity path e₀ alone keeps more feature than the whole plain merged network", bool(e0 > plain),
          f"at layer {layer}: e₀ term {e0:.2f} of the edges' E‖g‖, plain merged network {plain:.2f}")
    return c.rows
