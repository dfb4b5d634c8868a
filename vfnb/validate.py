"""Validation of what the public functions are given: one home for every check they share.

Each check raises early, with a message that names the problem and the fix. Every public entry point
that merges, normalizes, prunes or diagnoses a model calls these, so the same mistake always gets the
same message.
"""
from __future__ import annotations

import math
import torch
from torch import nn

__all__ = ["UnsupportedOperationError", "check_alpha", "check_module", "check_finite", "check_same_architecture"]


class UnsupportedOperationError(ValueError):
    """The model contains an operation whose effect on a permuted axis (or on the layer structure)
    is not known, so vfnb refuses instead of guessing."""


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or a ``ValueError`` if it is not a number in [0, 1] (θ_α = (1−α)·θ₀ + α·θ₁)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}; α=0 gives model_a and α=1 gives model_b")
    return float(alpha)


def check_module(model: object, name: str = "model") -> nn.Module:
    """``model`` if it is a ``torch.nn.Module``, else a ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_finite(model: nn.Module, name: str = "model") -> nn.Module:
    """``model``, or a ``ValueError`` if a parameter or buffer holds NaN or infinity (a diverged training
    run): merging, normalizing or pruning it would only spread the NaNs."""
    check_module(model, name)
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{name} has non-finite values in {k!r}: its training diverged. Retrain it with a "
                             "lower learning rate or gradient clipping (TrainConfig.grad_clip)")
    return model


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """A ``ValueError`` naming the first difference if the two models cannot be merged (type, layers,
    shapes or floating-point dtypes differ)."""
    check_module(model_a, "model_a")
    check_module(model_b, "model_b")
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
        if sa[k].is_floating_point() and sa[k].dtype != sb[k].dtype:
            raise ValueError(f"dtype mismatch at {k!r}: {sa[k].dtype} vs {sb[k].dtype}; convert both models to one "
                             "dtype first (e.g. model.double() or model.float())")
    ha, hb = attention_layout(model_a), attention_layout(model_b)
    diff = next((k for k in ha if ha[k] != hb.get(k)), None)
    if diff is not None:
        raise ValueError(f"attention {diff!r} differs: (num_heads, batch_first) is {ha[diff]} in model_a and "
                         f"{hb.get(diff)} in model_b; the same weight shapes split into other heads cannot be aligned "
                         "head by head. Build both models with the same number of heads")


def attention_layout(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """``{module name: (num_heads, batch_first)}`` of every ``nn.MultiheadAttention``: what the state dict's
    shapes do not show about an attention's layout."""
    return {name: (m.num_heads, bool(m.batch_first)) for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}
