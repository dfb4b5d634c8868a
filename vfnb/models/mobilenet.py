"""A small MobileNetV2 for MNIST/CIFAR-sized inputs: torchvision's ``MobileNetV2``."""
from __future__ import annotations

from torch import nn
from torchvision.models import MobileNetV2
from torchvision.ops.misc import Conv2dNormActivation

#: Inverted-residual stages ``[expansion t, channels c, blocks n, stride s]``: torchvision's seven stages
#: (16, 24, 32, 64, 96, 160, 320 channels) with 10 blocks instead of 17.
SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 2, 2], [6, 96, 1, 1], [6, 160, 1, 2],
           [6, 320, 1, 1]]


class MobileNet(MobileNetV2):
    """torchvision's MobileNetV2 (inverted residuals, depthwise convs, BatchNorm, ReLU6) in a small size.

    ``width=1`` is torchvision's ``width_mult=0.5`` (MobileNetV2-0.5) on the shortened :data:`SETTING`;
    channel counts are rounded to multiples of 8 as torchvision does, and the last 1×1 conv keeps its
    1280 channels. The stem conv takes ``in_channels`` with stride 1 instead of 2 (torchvision's
    downsamples 224×224 images by 32; here a 32×32 image is downsampled by 16, to 2×2; MNIST's 28×28
    to 2×2 as well). The classifier keeps torchvision's dropout of 0.2. State-dict names are
    torchvision's.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 input_size: int = 32) -> None:
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        del input_size  # any size works: the network ends in global average pooling
        super().__init__(num_classes=num_classes, width_mult=0.5 * width, inverted_residual_setting=SETTING)
        out = self.features[0][0].out_channels
        stem = Conv2dNormActivation(in_channels, out, stride=1, norm_layer=nn.BatchNorm2d,
                                    activation_layer=nn.ReLU6)
        nn.init.kaiming_normal_(stem[0].weight, mode="fan_out")  # torchvision's MobileNetV2 init
        self.features[0] = stem
