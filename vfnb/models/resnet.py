"""ResNet20 for CIFAR-sized inputs (He et al. 2016), with BatchNorm or LayerNorm."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .init import check_init
from .norm import make_norm


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual; a 1×1 conv shortcut (with norm) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), make_norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet20: a stem conv, three stages of three blocks (16w, 32w, 64w channels), a linear head.

    Twenty conv/linear layers, not counting the shortcut convs. MNIST inputs are padded to 32×32.
    ``init``: ``"uniform"`` (PyTorch's default Kaiming-uniform; the default) or ``"kaiming_normal"``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, norm: str = "bn", width: float = 1.0,
                 input_size: int = 32, init: str = "uniform") -> None:
        super().__init__()
        check_init(init)
        if norm not in ("bn", "ln"):
            raise ValueError(f"resnet20 norm must be 'bn' or 'ln', got {norm!r}")
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        self.pad = max(0, (32 - input_size) // 2)
        w = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, w[0])
        blocks = []
        cin = w[0]
        for stage, cout in enumerate(w):
            for b in range(3):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1, norm))
                cin = cout
        self.layer1 = nn.Sequential(*blocks[0:3])
        self.layer2 = nn.Sequential(*blocks[3:6])
        self.layer3 = nn.Sequential(*blocks[6:9])
        self.linear = nn.Linear(cin, num_classes)
        if init == "kaiming_normal":  # appendix A.4, Figure 9; the default keeps PyTorch's Kaiming-uniform
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.linear(torch.flatten(x, 1))
