"""Model zoo architectures: ``build_model(name, **kw)``."""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from .mlp import MLP
from .norm import LayerNorm2d, make_norm
from .resnet import ResNet20
from .vgg import CONFIGS as VGG_CONFIGS, VGG

MODELS = ("mlp", *VGG_CONFIGS, "resnet20", "vit", "convnext", "mobilenet")

#: The torchvision-based entries: ``name -> (module, class)``, imported on first use (torchvision.models
#: takes over a second to import, which every ``import vfnb`` would otherwise pay).
_LAZY: dict[str, tuple[str, str]] = {"vit": (".vit", "ViT"), "convnext": (".convnext", "ConvNeXt"),
                                     "mobilenet": (".mobilenet", "MobileNet")}


def _lazy_class(name: str) -> type[nn.Module]:
    module, cls = _LAZY[name]
    return getattr(importlib.import_module(module, __name__), cls)


def __getattr__(attr: str) -> Any:  # ``from vfnb.models import ViT`` imports torchvision only then
    for name, (_, cls) in _LAZY.items():
        if attr == cls:
            return _lazy_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def build_model(name: str, **kw: Any) -> nn.Module:
    """Build an architecture by name.

    - ``"mlp"``: ``in_features, num_classes, depth, width, activation ('none'|'relu'), residual, bias``
    - ``"vgg11|13|16|19"``: ``in_channels, num_classes, norm ('none'|'bn'|'ln'), width, input_size, init``
    - ``"resnet20"``: ``in_channels, num_classes, norm ('bn'|'ln'), width, input_size, init``
      (``init``: 'kaiming_normal' or 'uniform', appendix A.4; VGG defaults to the first, ResNet20 to the second)
    - ``"vit"``: ``in_channels, num_classes, width, input_size, depth, num_heads, patch_size``
      (torchvision's ``VisionTransformer``; width 1: hidden size 96, 6 blocks, 4×4 patches)
    - ``"convnext"``: ``in_channels, num_classes, width, input_size, layer_scale``
      (torchvision's ``ConvNeXt``; width 1: 32-64-128-256 channels, 2 blocks per stage)
    - ``"mobilenet"``: ``in_channels, num_classes, width, input_size``
      (torchvision's ``MobileNetV2``; width 1: its ``width_mult`` 0.5, 10 inverted-residual blocks)

    For the conv nets and the transformer, ``width`` multiplies the channel counts. The three
    torchvision-based models are sized so that a forward and backward pass of 128 CIFAR images takes
    well under a second on two CPU cores; their state-dict names are torchvision's.

    Unknown keyword arguments raise ``TypeError`` naming the allowed ones.
    """
    if name == "mlp":
        cls, fixed = MLP, {}
    elif name in VGG_CONFIGS:
        cls, fixed = VGG, {"name": name}
    elif name == "resnet20":
        cls, fixed = ResNet20, {}
    elif name in _LAZY:
        cls, fixed = _lazy_class(name), {}
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


__all__ = ["build_model", "device_of", "MODELS", "MLP", "VGG", "ResNet20", "ViT", "ConvNeXt", "MobileNet",
           "LayerNorm2d", "make_norm"]
