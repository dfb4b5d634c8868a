"""A small ConvNeXt for MNIST/CIFAR-sized inputs: torchvision's ``ConvNeXt``."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models import ConvNeXt as _ConvNeXt
from torchvision.models.convnext import CNBlockConfig

#: Channels and blocks of the four stages at ``width=1`` (ConvNeXt-T: 96-768 channels, 3-3-9-3 blocks).
DIMS = (32, 64, 128, 256)
DEPTHS = (2, 2, 2, 2)


class ConvNeXt(_ConvNeXt):
    """torchvision's ConvNeXt (depthwise 7×7 conv, LayerNorm, 4× inverted MLP, layer scale) in a small size.

    Four stages of ``DEPTHS`` blocks with ``DIMS`` channels times ``width``, a 2×2 stride-2 downsampling
    between stages. The stem is a 2×2 stride-2 patchify conv taking ``in_channels`` (torchvision's is
    4×4 stride 4 with 3 channels, made for 224×224 images), so a 32×32 input runs at 16, 8, 4 and 2
    pixels; inputs whose side is not a multiple of 16 are zero-padded up to one (MNIST: 28 → 32).
    Stochastic depth is off. ``layer_scale`` initializes the per-channel residual scales: 0.1, the
    value CaiT (Touvron et al. 2021) recommends for networks this shallow, instead of torchvision's
    1e-6, with which an untrained block is almost the identity. State-dict names are torchvision's.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0, input_size: int = 32,
                 layer_scale: float = 0.1) -> None:
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        if not layer_scale > 0:
            raise ValueError(f"convnext: layer_scale must be > 0, got {layer_scale}")
        dims = [max(1, round(c * width)) for c in DIMS]
        setting = [CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n)
                   for i, (d, n) in enumerate(zip(dims, DEPTHS))]
        super().__init__(setting, stochastic_depth_prob=0.0, layer_scale=layer_scale, num_classes=num_classes)
        stride = 2 ** len(DIMS)
        extra = -(-input_size // stride) * stride - input_size
        self.pad = (extra // 2, extra - extra // 2) * 2
        stem = nn.Conv2d(in_channels, dims[0], kernel_size=2, stride=2)
        nn.init.trunc_normal_(stem.weight, std=0.02)  # torchvision's ConvNeXt init
        nn.init.zeros_(stem.bias)
        self.features[0][0] = stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)
