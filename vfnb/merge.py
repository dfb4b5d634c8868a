"""Linear interpolation of two edge models (paper §3: θ_α = (1−α)·θ₀ + α·θ₁)."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or raise if it is not a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}; α=0 gives model_a and α=1 gives model_b")
    return float(alpha)


def check_finite(model: nn.Module, name: str = "model") -> None:
    """Raise ``ValueError`` if a parameter or buffer of ``model`` holds NaN or infinity (a diverged
    training run): matching or merging it would only spread the NaNs."""
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{name} has non-finite values in {k!r}: its training diverged. Retrain it with a "
                             "lower learning rate or gradient clipping (TrainConfig.grad_clip)")


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise ``ValueError`` naming the first difference if the two models cannot be merged."""
    if type(model_a) is not type(model_b):
        raise ValueError(f"cannot merge a {type(model_a).__name__} with a {type(model_b).__name__}: "
                         "both edge models must have the same architecture")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    missing, extra = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if missing or extra:
        raise ValueError(f"the models have different layers: only in model_a {missing[:5]}, "
                         f"only in model_b {extra[:5]}; build both with the same arguments")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise ValueError(f"shape mismatch at {k!r}: {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}; "
                             "build both edge models with the same width and depth")


@torch.no_grad()
def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """Return a new model with θ = (1−α)·θ_a + α·θ_b; the inputs are left untouched.

    Floating-point buffers (BatchNorm running statistics) are interpolated too; integer buffers
    (``num_batches_tracked``) are taken from ``model_a``. Re-estimate BatchNorm statistics with
    RESET afterwards where needed.
    """
    alpha = check_alpha(alpha)
    check_same_architecture(model_a, model_b)
    merged = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    state = {}
    for k, va in model_a.state_dict().items():
        vb = sb[k].to(va.device)
        state[k] = torch.lerp(va, vb.to(va.dtype), alpha) if va.is_floating_point() else va.clone()
    merged.load_state_dict(state)
    return merged.eval()
