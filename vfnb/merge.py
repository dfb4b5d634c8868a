"""Interpolation of two edge models (paper §3: θ_α = (1−α)·θ₀ + α·θ₁), with the paper's bias
calibration (§5.3) as an option of the same function.

This is the one place where models' parameters are mixed: plain merging, bias calibration,
Preserve-First Merging's tail and partial zipping's trunk all call :func:`interpolate`; :func:`average` is its
N-model form (multi-task merging, :mod:`vfnb.multimerge`).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .structure import BN_TYPES, structure_of
from .validate import check_alpha, check_finite, check_same_architecture

__all__ = ["interpolate", "calibrate_bias", "bias_coefficients", "average"]


def bias_coefficients(alpha: float, layer: int) -> tuple[float, float]:
    """Bias calibration's weights ((1−α)^l, α^l) for the bias of the l-th merged layer (paper §5.3):
    the scale of a product of l interpolated weight matrices."""
    return (1 - alpha) ** layer, alpha ** layer


@torch.no_grad()
def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float, *, bias_calibration: bool = False,
                offset: int = 0) -> nn.Module:
    """A new model with θ = (1−α)·θ_a + α·θ_b (paper §3); the inputs are left untouched.

    Floating-point buffers (BatchNorm running statistics) are interpolated too; integer buffers
    (``num_batches_tracked``) are taken from ``model_a``. Re-estimate BatchNorm statistics with RESET
    afterwards where needed.

    ``bias_calibration=True`` is the paper's bias calibration (§5.3): weights stay linear in α, and the
    bias of a conv/linear layer at depth ``d`` (:attr:`vfnb.structure.Structure.depth`, 1-based) becomes
    (1−α)^j·b_a + α^j·b_b with ``j = d − offset``; layers at depth ``≤ offset`` keep the linear bias (PFM
    calibrates from the first *merged* layer). BatchNorm models are refused: their running statistics
    belong to the un-calibrated layers. ``model_b`` must already be aligned to ``model_a``.
    """
    alpha = check_alpha(alpha)
    check_same_architecture(model_a, model_b)
    check_finite(model_a, "model_a")
    check_finite(model_b, "model_b")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an integer >= 0 (the number of preserved layers), got {offset!r}")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    state = {}
    for k, va in sa.items():
        vb = sb[k].to(va.device)
        state[k] = torch.lerp(va, vb.to(va.dtype), alpha) if va.is_floating_point() else va.clone()
    if bias_calibration:
        if any(isinstance(m, BN_TYPES) for m in model_a.modules()):
            raise ValueError("bias calibration refuses models with BatchNorm: their running statistics belong to the "
                             "un-calibrated layers, so after rescaling the biases they would be meaningless (and BN "
                             "re-centres each channel anyway); use reset_bn_stats (RESET) for BatchNorm models")
        for name, d in structure_of(model_a).depth.items():
            key = f"{name}.bias"
            if d > offset and key in state:
                ca, cb = bias_coefficients(alpha, d - offset)
                state[key] = ca * sa[key] + cb * sb[key].to(sa[key])
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(state)
    return merged.eval()


def calibrate_bias(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """Bias calibration (paper §5.3): :func:`interpolate` with ``bias_calibration=True``, i.e. the bias of
    layer l becomes (1−α)^l·b_a + α^l·b_b while every other parameter interpolates linearly."""
    return interpolate(model_a, model_b, alpha, bias_calibration=True)


@torch.no_grad()
def average(models, weights=None) -> nn.Module:
    """θ = Σ_i w_i·θ_i over ``models`` of one architecture (already aligned), with ``weights`` normalized to sum 1
    (default: equal): :func:`interpolate` for N models. Integer buffers come from the first model."""
    models = list(models)
    if not models:
        raise ValueError("average needs at least one model")
    for i, m in enumerate(models):
        check_same_architecture(models[0], m)
        check_finite(m, f"models[{i}]")
    w = [1.0] * len(models) if weights is None else [float(v) for v in weights]
    if len(w) != len(models):
        raise ValueError(f"got {len(w)} weights for {len(models)} models; pass one weight per model")
    if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite numbers >= 0, not all zero; got {w}")
    total = sum(w)
    states = [m.state_dict() for m in models]
    state = {}
    for k, v0 in states[0].items():
        if v0.is_floating_point():
            state[k] = sum((wi / total) * st[k].to(v0) for wi, st in zip(w, states))
        else:
            state[k] = v0.clone()
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(state)
    return merged.eval()
