"""Model zoo architectures: ``build_model(name, **kw)``."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .mlp import MLP
from .norm import LayerNorm2d, make_norm
from .resnet import ResNet20
from .vgg import CONFIGS as VGG_CONFIGS, VGG

MODELS = ("mlp", *VGG_CONFIGS, "resnet20")


def build_model(name: str, **kw: Any) -> nn.Module:
    """Build an architecture by name.

    - ``"mlp"``: ``in_features, num_classes, depth, width, activation ('none'|'relu'), residual, bias``
    - ``"vgg11|13|16|19"``: ``in_channels, num_classes, norm ('none'|'bn'|'ln'), width, input_size``
    - ``"resnet20"``: ``in_channels, num_classes, norm ('bn'|'ln'), width, input_size``

    Unknown keyword arguments raise ``TypeError`` naming the allowed ones.
    """
    if name == "mlp":
        cls, fixed = MLP, {}
    elif name in VGG_CONFIGS:
        cls, fixed = VGG, {"name": name}
    elif name == "resnet20":
        cls, fixed = ResNet20, {}
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "name")]
    bad = sorted(set(kw) - set(allowed))
    if bad:
        raise TypeError(f"{name}: unknown argument(s) {', '.join(bad)}; allowed: {', '.join(allowed)}")
    return cls(**fixed, **kw)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a parameter-free module)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


__all__ = ["build_model", "device_of", "MODELS", "MLP", "VGG", "ResNet20", "LayerNorm2d", "make_norm"]
