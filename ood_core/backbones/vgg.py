"""VGG16 with batch norm for 32x32 inputs (the LA-OOD backbone).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015; the CIFAR variant (as in the public CIFAR code LA-OOD builds on): 13 3x3 convolutions
with batch norm in five blocks (64, 128, 256, 512, 512 channels), each block ending in a 2x2
max-pool, then a linear head on the 512-d pooled output (1x1 maps for 32x32 inputs).
Module names: ``blockB.convI`` / ``blockB.bnI`` / ``blockB.reluI`` / ``blockB.pool``.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .common import Backbone, check_size, kaiming_init

CONFIG = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(Backbone):
    stages = ("block1", "block2", "block3", "block4", "block5")

    def __init__(self, num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        c_in = in_channels
        for b, widths in enumerate(CONFIG, start=1):
            layers = OrderedDict()
            for i, c in enumerate(widths, start=1):
                layers[f"conv{i}"] = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
                layers[f"bn{i}"] = nn.BatchNorm2d(c)
                layers[f"relu{i}"] = nn.ReLU(inplace=True)
                c_in = c
            layers["pool"] = nn.MaxPool2d(2)
            setattr(self, f"block{b}", nn.Sequential(layers))
        self._finish(num_classes, 512, dropout)
        kaiming_init(self)

    def feature_maps(self, x: Tensor) -> Tensor:
        for b in range(1, 6):
            x = getattr(self, f"block{b}")(x)
        return x


def vgg16(*, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0) -> VGG16:
    """VGG16-BN for 32x32 inputs (five max-pools: image_size >= 32)."""
    check_size("vgg16", image_size, 32)
    return VGG16(num_classes, in_channels, float(dropout))
