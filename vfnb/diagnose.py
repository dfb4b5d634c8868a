"""Feature–bias decomposition and the vanishing-feature measure (paper Eq. 4.1, Defs. 4.1, 4.2, 5.1).

For a layer output f⁽ˡ⁾(x), the input-induced feature is g⁽ˡ⁾(x) = f⁽ˡ⁾(x) − f⁽ˡ⁾(0) and the
input-independent offset is h⁽ˡ⁾ = f⁽ˡ⁾(0), where 0 is the all-zero input in normalized input
space. Norms are per sample and divided by √(number of elements), so layers of different size
compare.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .activations import inputs, labelled_batches, layer_outputs
from .structure import BN_TYPES, WEIGHT_TYPES, execution_order, structure_of
from .validate import check_finite, check_same_architecture

@dataclass
class FeatureBias:
    """Per-layer statistics of the feature–bias decomposition, in execution order.

    ``g_mean``/``g_std``: mean and std over the data of ‖g⁽ˡ⁾(x)‖/√d; ``h_norm``: ‖h⁽ˡ⁾‖/√d;
    ``variance``: Var_x[f⁽ˡ⁾(x)] averaged over the d units (Definition 4.1).
    """

    names: list[str]
    g_mean: np.ndarray
    g_std: np.ndarray
    h_norm: np.ndarray
    variance: np.ndarray

    @property
    def depth(self) -> np.ndarray:
        """Layer index 1..L."""
        return np.arange(1, len(self.names) + 1)

    @property
    def relative_depth(self) -> np.ndarray:
        """l / L, so that models of different depth share one axis."""
        return self.depth / len(self.names)

    def rows(self) -> list[dict[str, Any]]:
        return [{"layer": n, "E|g|": float(gm), "std|g|": float(gs), "|h|": float(h), "Var f": float(v)}
                for n, gm, gs, h, v in zip(self.names, self.g_mean, self.g_std, self.h_norm, self.variance)]


@torch.no_grad()
def feature_bias(model: nn.Module, data: Any, batch_size: int = 1000,
                 names: Sequence[str] | None = None) -> FeatureBias:
    """Feature–bias decomposition of every layer output over ``data`` (paper Eq. 4.1, Def. 5.1).

    ``data`` is a :class:`vfnb.data.VisionData` (anything with ``batches(batch_size, device=)``
    and ``len``). Statistics accumulate in float64 in one pass. A model that holds an edge layer more
    than once (a PFM model's stems: ``model.layer_aliases(names)``) reports each named layer as the
    mean over its copies.
    """
    check_finite(model)
    if len(data) < 2:
        raise ValueError("feature_bias needs at least 2 samples to estimate a variance")
    first = next(iter(labelled_batches(data, 1, model)))[0]
    names = list(names) if names is not None else execution_order(model, first)
    modules = dict(model.named_modules())
    edge = [n for n in names if n.partition(":")[0] not in modules]
    aliases = {n: [n] for n in names}
    if edge and hasattr(model, "layer_aliases"):  # edge-model layer names of a PFM model
        aliases.update(model.layer_aliases(edge))
    measured = list(dict.fromkeys(m for n in names for m in aliases[n]))
    zero = layer_outputs(model, torch.zeros_like(first), measured)
    h = {n: zero[n][0].reshape(-1).double() for n in measured}
    n_total = 0
    g_sum = {n: 0.0 for n in measured}
    g_sq = {n: 0.0 for n in measured}
    f_sum = {n: torch.zeros_like(h[n]) for n in measured}
    f_sq = {n: torch.zeros_like(h[n]) for n in measured}
    for x, _ in labelled_batches(data, batch_size, model):
        outs = layer_outputs(model, x, measured)
        n_total += len(x)
        for n in measured:
            f = outs[n].reshape(len(x), -1).double()
            d = f.shape[1]
            g = (f - h[n]).norm(dim=1) / d ** 0.5
            g_sum[n] += g.sum().item()
            g_sq[n] += (g * g).sum().item()
            f_sum[n] += f.sum(0)
            f_sq[n] += (f * f).sum(0)

    def per_layer(value: dict[str, float]) -> np.ndarray:
        return np.array([np.mean([value[m] for m in aliases[n]]) for n in names])

    g_mean = {n: g_sum[n] / n_total for n in measured}
    g_std = {n: float(np.sqrt(max(g_sq[n] / n_total - g_mean[n] ** 2, 0.0))) for n in measured}
    var = {n: ((f_sq[n] / n_total - (f_sum[n] / n_total) ** 2).clamp_min(0) * n_total / (n_total - 1)).mean().item()
           for n in measured}
    h_norm = {n: (h[n].norm() / h[n].numel() ** 0.5).item() for n in measured}
    return FeatureBias(names, per_layer(g_mean), per_layer(g_std), per_layer(h_norm), per_layer(var))


def weight_scale(model: nn.Module) -> dict[str, np.ndarray | list[str]]:
    """Mean absolute weight and bias of every conv/linear layer, in definition order (Fig. 1 mid).

    Returns ``{"names", "weight", "bias"}``; a layer without bias has ``nan``.
    """
    names, w, b = [], [], []
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_TYPES):
            names.append(name)
            w.append(m.weight.detach().abs().mean().item())
            b.append(m.bias.detach().abs().mean().item() if m.bias is not None else float("nan"))
    if not names:
        raise ValueError(f"{type(model).__name__} has no conv or linear layers")
    return {"names": names, "weight": np.array(w), "bias": np.array(b)}


def scale_parameters(model: nn.Module, weight: float, bias: float) -> nn.Module:
    """A copy of ``model`` with every conv/linear weight multiplied by ``weight`` (λ) and every bias by ``bias``
    (μ); norm layers are left alone (paper §4.2 "Magnitude perspective", appendix A.5.2). In a linear network
    this multiplies g⁽ˡ⁾ by λˡ and the contribution of layer j's bias to h⁽ˡ⁾ by λˡ⁻ʲμ."""
    import copy
    for name, v in (("weight", weight), ("bias", bias)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"scale_parameters: {name} must be a finite number, got {v!r}")
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, WEIGHT_TYPES):
                m.weight.mul_(weight)
                if m.bias is not None:
                    m.bias.mul_(bias)
    return out


def weight_norms(model_a: nn.Module, model_b: nn.Module, alpha: float = 0.5) -> dict[str, np.ndarray | list[str]]:
    """Per conv/linear layer: the Frobenius norms of both models' weights and of their interpolation
    ``W_α = (1−α)W_a + αW_b`` (appendix A.5.2). By the triangle inequality ``‖W_α‖ ≤ (1−α)‖W_a‖ + α‖W_b‖``;
    for independent Gaussian rows of equal scale, ``E‖W_½‖ ≈ ‖W‖/√2``."""
    from .validate import check_alpha
    check_alpha(alpha)
    names, na, nb, nm = [], [], [], []
    mods_b = dict(model_b.named_modules())
    for name, m in model_a.named_modules():
        if isinstance(m, WEIGHT_TYPES):
            other = mods_b.get(name)
            if other is None or other.weight.shape != m.weight.shape:
                raise ValueError(f"weight_norms needs two models of one architecture; layer {name!r} differs")
            wa, wb = m.weight.detach().double(), other.weight.detach().double()
            names.append(name)
            na.append(float(wa.norm()))
            nb.append(float(wb.norm()))
            nm.append(float(((1 - alpha) * wa + alpha * wb).norm()))
    return {"names": names, "a": np.array(na), "b": np.array(nb), "merged": np.array(nm),
            "triangle": (1 - alpha) * np.array(na) + alpha * np.array(nb)}


def scaling_matrix(w0: torch.Tensor, w1: torch.Tensor) -> dict[str, float]:
    """Statistics of the elementwise scaling matrix W0 ⊘ W1 (paper §5.2 "Permutation").

    ``sign agreement``: fraction of entries with W0·W1 > 0 (½ for unrelated weights, 1 for equal ones);
    ``median W0/W1``; ``midpoint scale``: ‖(W0+W1)/2‖_F / mean(‖W0‖_F, ‖W1‖_F) (1 when the two agree,
    about 0.71 when they are unrelated, so the average cancels).
    """
    a, b = w0.detach().double().flatten(), w1.detach().double().flatten()
    ratio = a / torch.where(b == 0, torch.full_like(b, 1e-30), b)
    return {"sign agreement": float((a * b > 0).double().mean()),
            "median W0/W1": float(ratio.median()),
            "midpoint scale": float(((a + b) / 2).norm() / ((a.norm() + b.norm()) / 2))}


def rescaled_features(fb: FeatureBias, merged: nn.Module, edges: Sequence[nn.Module]) -> np.ndarray:
    """E‖g_α⁽ˡ⁾‖ rescaled by Π_{j≤l} mean_e(‖W_e⁽ʲ⁾‖_{1,mean}) / ‖W_α⁽ʲ⁾‖_{1,mean} (paper Fig. 1 right).

    The product runs over the conv/linear layers executed up to and including layer l, so norm
    layers inherit the factor of the weight layer before them.
    """
    if not edges:
        raise ValueError("rescaled_features needs at least one edge model")
    ws = weight_scale(merged)
    edge_w = np.mean([weight_scale(e)["weight"] for e in edges], axis=0)
    ratio = dict(zip(ws["names"], edge_w / ws["weight"]))
    factor, out = 1.0, []
    for name, g in zip(fb.names, fb.g_mean):
        factor *= ratio.get(name, 1.0)
        out.append(g * factor)
    return np.array(out)


def vf_ratio(fb: FeatureBias, references: Sequence[FeatureBias]) -> np.ndarray:
    """E_l = E‖g_α⁽ˡ⁾‖ / mean over references of E‖g⁽ˡ⁾‖ (the measure behind Def. 5.1)."""
    if not references:
        raise ValueError("vf_ratio needs at least one reference model's FeatureBias")
    for r in references:
        if r.names != fb.names:
            raise ValueError("reference layers differ from the model's; diagnose models of one architecture")
    ref = np.mean([r.g_mean for r in references], axis=0)
    return fb.g_mean / np.maximum(ref, 1e-12)


def upper_bound(values: Sequence[float], gamma: float = 1.4) -> np.ndarray:
    """The smoothed non-increasing upper-bound sequence of Defs. 4.2/5.1 (appendix A.5.1).

    From the last layer backwards: ε_L = E_L and
    ε_l = max(E_l, ε_{l+1}·(γ + (1−γ)(1 − 1/(L−l+1)))), with l counted from 1.
    """
    e = np.asarray(values, dtype=float)
    if e.ndim != 1 or len(e) == 0:
        raise ValueError("upper_bound expects a non-empty 1-D sequence")
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1 for a non-increasing bound, got {gamma}")
    L = len(e)
    eps = e.copy()
    for i in range(L - 2, -1, -1):  # i = l - 1
        l = i + 1
        eps[i] = max(e[i], eps[i + 1] * (gamma + (1 - gamma) * (1 - 1 / (L - l + 1))))
    return eps


# ---------------------------------------------------------------------------------------------------
# Vanishing-feature curve, output logits and BatchNorm statistics (paper §5.1–5.2, Fig. 3)
@dataclass
class VFCurve:
    """One model's vanishing-feature measurement (Definition 5.1, Fig. 3B).

    ``ratio[l]`` is E_l = E‖g⁽ˡ⁾‖ / mean over references of E‖g⁽ˡ⁾‖ for the layer outputs ``layers``
    (every conv, linear and norm output in execution order); ``bound`` is the smoothed non-increasing
    upper-bound sequence ε_l of :func:`upper_bound`; ``relative_depth`` is l/L, so models of
    different depth share one axis.
    """

    layers: list[str]
    relative_depth: np.ndarray
    ratio: np.ndarray
    bound: np.ndarray

    def vanishes(self, threshold: float = 0.5) -> bool:
        """Definition 5.1 at this scale: the bound falls below ``threshold`` by the last layer."""
        return bool(self.bound[-1] < threshold)

    def rows(self) -> list[dict[str, Any]]:
        return [{"layer": n, "l/L": float(d), "E_l": float(r), "bound ε_l": float(b)}
                for n, d, r, b in zip(self.layers, self.relative_depth, self.ratio, self.bound)]


def vf_curve(model: nn.Module, references: Sequence[nn.Module | FeatureBias], data: Any, gamma: float = 1.4,
             batch_size: int = 1000, names: Sequence[str] | None = None) -> VFCurve:
    """The vanishing-feature curve of ``model`` (paper Def. 5.1, Fig. 3B, appendix A.5.1): per layer the
    ratio E_l of its E‖g⁽ˡ⁾‖ to the mean over ``references`` (edge models after merging, or the
    unpruned model after pruning), and the smoothed non-increasing upper bound with smoothing ``gamma``.

    ``references`` may be models or precomputed :class:`FeatureBias` of the same layers (so edge models
    are measured once for many merged models). ``model`` may also be a
    :class:`~vfnb.pfm.PreserveFirst` model: it is measured on the edge models' layers, a preserved layer
    as the mean over its two stems (exactly the edge models', so its ratio is 1; appendix A.8.1).
    """
    if isinstance(references, (nn.Module, FeatureBias)):
        references = [references]
    references = list(references)
    if not references:
        raise ValueError("vf_curve needs at least one reference: the edge models, or the unpruned model")
    bad = [type(r).__name__ for r in references if not isinstance(r, (nn.Module, FeatureBias))]
    if bad:
        raise TypeError(f"references must be models or FeatureBias objects, got {bad[0]}")
    if names is None and hasattr(model, "layer_aliases"):  # measured on the edge models' layers
        r0 = references[0]
        if isinstance(r0, FeatureBias):
            names = r0.names
        else:
            names = execution_order(r0, next(iter(labelled_batches(data, 1, r0)))[0])
    fb = feature_bias(model, data, batch_size=batch_size, names=names)
    refs = [r if isinstance(r, FeatureBias) else feature_bias(r, data, batch_size=batch_size, names=fb.names)
            for r in references]
    ratio = vf_ratio(fb, refs)
    return VFCurve(list(fb.names), fb.relative_depth, ratio, upper_bound(ratio, gamma))


@dataclass
class LogitStats:
    """Per-class output logits over the data (Fig. 3A): ``mean[c]``, ``std[c]`` over x of f(x)_c, and
    ``zero[c]`` = f(0)_c, the input-independent offset."""

    mean: np.ndarray
    std: np.ndarray
    zero: np.ndarray

    @property
    def offset_ratio(self) -> float:
        """‖f(0)‖ / E_c std_x f(x)_c: how much the offset dominates the input-induced spread."""
        return float(np.linalg.norm(self.zero) / np.sqrt(len(self.zero)) / max(float(self.std.mean()), 1e-30))


@torch.no_grad()
def logit_stats(model: nn.Module, data: Any, batch_size: int = 1000) -> LogitStats:
    """Per-class mean and std of the output logits over ``data`` and the logits f(0) of an all-zero input
    (paper Fig. 3A). ``data`` is a VisionData (or anything with ``batches`` and ``len``)."""
    check_finite(model)
    if len(data) < 2:
        raise ValueError("logit_stats needs at least 2 samples")
    was_training = model.training
    model.eval()
    try:
        s = sq = None
        n = 0
        for x, _ in labelled_batches(data, batch_size, model):
            out = model(x)
            if out.dim() != 2:
                raise ValueError(f"expected logits of shape [batch, classes], got {list(out.shape)}")
            out = out.double()
            s = out.sum(0) if s is None else s + out.sum(0)
            sq = (out * out).sum(0) if sq is None else sq + (out * out).sum(0)
            n += len(x)
        zero = model(torch.zeros_like(x[:1]))[0].double()
    finally:
        model.train(was_training)
    mean = s / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt()
    return LogitStats(mean.cpu().numpy(), std.cpu().numpy(), zero.cpu().numpy())


def bn_stats(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Running mean and running std √running_var of every BatchNorm layer, in definition order
    (paper Fig. 3C: before vs after RESET)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BN_TYPES):
            if m.running_mean is None:
                raise ValueError(f"BatchNorm {name!r} tracks no running statistics")
            out[name] = (m.running_mean.detach().cpu().numpy().copy(),
                         m.running_var.detach().clamp_min(0).sqrt().cpu().numpy())
    if not out:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layers")
    return out


@torch.no_grad()
def activation_gap(model: nn.Module, reference: nn.Module, data: Any, n_samples: int | None = 500,
                   layers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per layer, how far ``model``'s activations are from ``reference``'s on the same inputs (non-local merging
    paper, Fig. 3): the relative ℓ2 distance E‖a_m − a_r‖ / E‖a_r‖ and the variance ratio Σ_c Var(a_m) / Σ_c Var(a_r)
    (variances over samples and positions, summed over channels). The activations are what each layer hands on:
    the input of the next layer (for a VGG, after ReLU and pooling), for every layer but the last, by default.
    ``reference`` must be in ``model``'s basis (an aligned expert)."""
    check_same_architecture(reference, model)
    check_finite(model)
    check_finite(reference, "reference")
    s = structure_of(reference)
    chosen = list(s.layers[:-1]) if layers is None else list(layers)
    after = {n: s.layers[s.layers.index(n) + 1] for n in chosen if n in s.layers and n != s.layers[-1]}
    bad = [n for n in chosen if n not in after]
    if bad:
        raise ValueError(f"{bad} are not layers followed by another layer; choose among {list(s.layers[:-1])}")
    x = inputs(data, n_samples)
    names = [f"{after[n]}:input" for n in chosen]
    am, ar = layer_outputs(model, x, names), layer_outputs(reference, x, names)
    rows = []
    for depth, (n, key) in enumerate(zip(chosen, names), start=1):
        m, r = am[key].double().flatten(1), ar[key].double().flatten(1)
        dist = float((m - r).norm(dim=1).mean() / r.norm(dim=1).mean().clamp_min(1e-30))
        a, b = am[key].double(), ar[key].double()
        if a.dim() > 2:  # channels on axis 1: samples and positions are the observations
            a, b = a.transpose(0, 1).flatten(1), b.transpose(0, 1).flatten(1)
        else:
            a, b = a.T, b.T
        ratio = float(a.var(dim=1, unbiased=False).sum() / b.var(dim=1, unbiased=False).sum().clamp_min(1e-30))
        rows.append({"layer": n, "depth": s.layers.index(n) + 1, "distance": dist, "variance ratio": ratio})
    return rows
