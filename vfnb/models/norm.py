"""Normalization layers shared by the conv nets."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels at each spatial position of an ``[N, C, H, W]`` map.

    ``weight`` and ``bias`` have one entry per channel, so they follow a channel permutation.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (self.num_channels,), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


NORMS = ("none", "bn", "ln")


def make_norm(kind: str, channels: int) -> nn.Module:
    """``bn`` -> BatchNorm2d, ``ln`` -> LayerNorm2d."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return LayerNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
