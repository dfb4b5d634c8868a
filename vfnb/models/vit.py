"""A small Vision Transformer for MNIST/CIFAR-sized inputs: torchvision's ``VisionTransformer``."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models import VisionTransformer


class ViT(VisionTransformer):
    """torchvision's ViT (pre-norm encoder, class token, learned position embedding) in a small size.

    At ``width=1``: patches of 4×4, hidden size 96 with 3 heads of 32, MLP size 192 (twice the hidden
    size), ``depth`` 6 encoder blocks: a 32×32 image is 64 patches plus the class token. ``width``
    scales the hidden and MLP sizes (the hidden size stays a multiple of ``num_heads``).

    Differences from torchvision's own constructor: the patch embedding ``conv_proj`` takes
    ``in_channels`` (torchvision fixes 3); an input whose side is not a multiple of ``patch_size`` is
    zero-padded up to one; and the head is initialized with small random weights instead of zeros, so
    that an untrained model is not the constant zero function (which would make any test of a
    function-preserving transformation on it vacuous). State-dict names are torchvision's.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0, input_size: int = 32,
                 depth: int = 6, num_heads: int = 3, patch_size: int = 4) -> None:
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        for arg, v in (("depth", depth), ("num_heads", num_heads), ("patch_size", patch_size),
                       ("input_size", input_size), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"vit: {arg} must be an integer >= 1, got {v!r}")
        hidden = num_heads * max(1, round(96 * width / num_heads))
        image_size = -(-input_size // patch_size) * patch_size
        super().__init__(image_size=image_size, patch_size=patch_size, num_layers=depth, num_heads=num_heads,
                         hidden_dim=hidden, mlp_dim=2 * hidden, num_classes=num_classes)
        extra = image_size - input_size
        self.pad = (extra // 2, extra - extra // 2) * 2  # (left, right, top, bottom)
        self.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (in_channels * patch_size ** 2)))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.trunc_normal_(self.heads.head.weight, std=0.02)

    def stages(self) -> list[str]:
        """The patch embedding, then every encoder block (module names): the units Table 5's PFM_l/L
        counts in, with ``L = depth + 1`` (the paper's ViT of 7 blocks is PFM_l/8)."""
        return ["conv_proj", *(f"encoder.layers.{n}" for n, _ in self.encoder.layers.named_children())]

    def stream_points(self) -> list[str]:
        """Where the residual stream can be read, one point per stage (:meth:`stages`): its input to
        each block's first LayerNorm (after the patch embedding and the blocks before it), then its
        input to the final LayerNorm. Names for :func:`vfnb.diagnose.feature_bias` (``"<module>:input"``)."""
        blocks = [f"encoder.layers.{n}" for n, _ in self.encoder.layers.named_children()]
        return [f"{b}.ln_1:input" for b in blocks] + ["encoder.ln:input"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)
