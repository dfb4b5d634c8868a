"""Multi-layer perceptrons, linear or ReLU, with optional residual connections (paper §4, §5.2)."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """An MLP of ``depth`` linear layers: ``in_features -> width -> ... -> num_classes``.

    ``layers.{i}`` are the linear layers (stable names; checkpoints depend on them). With
    ``activation="none"`` the network is linear, as in paper §4 (Eq. 4.1). With ``residual=True``
    every layer whose input and output widths agree adds its input to its output
    (paper §5.2: every layer but the first and the last).
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10, depth: int = 8, width: int = 32,
                 activation: str = "none", residual: bool = False, bias: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp depth must be >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"mlp width must be >= 1, got {width}")
        if activation not in ("none", "relu"):
            raise ValueError(f"mlp activation must be 'none' or 'relu', got {activation!r}")
        dims = [in_features] + [width] * (depth - 1) + [num_classes]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=bias) for i in range(depth))
        self.act = nn.ReLU() if activation == "relu" else nn.Identity()
        self.residual = residual
        self.skip = [residual and dims[i] == dims[i + 1] for i in range(depth)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            y = layer(x)
            if self.skip[i]:
                y = y + x
            x = self.act(y) if i < last else y
        return x
