"""Wide ResNet WRN-40-2 for 32x32 inputs (the Outlier Exposure / energy-fine-tuning backbone).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: a 3x3 stem (16 channels) and three
groups of 6 pre-activation basic blocks (32, 64, 128 channels for width 2; stride 2 from the
second group), final ``bn1-relu``, global average pool, linear head: 128-d features, 8x8 maps for
32x32 inputs. Parameter names follow the public Outlier Exposure code (``blockK.layer.i.bn1``,
``convShortcut``; its ``fc`` is our ``head``).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import Backbone, check_size, kaiming_init


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal else self.convShortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasic(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1, drop_rate) for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(Backbone):
    stages = ("block1", "block2", "block3")

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"wrn: depth must be 6n + 4 (16, 28, 40...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self._finish(num_classes, widths[3])
        kaiming_init(self)

    def feature_maps(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))


def wrn40_2(*, num_classes: int, in_channels: int, image_size: int, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-2 (128-d features); ``drop_rate`` is the dropout inside the blocks (0.3 in OE)."""
    check_size("wrn40_2", image_size, 4)
    if not 0 <= drop_rate < 1:
        raise ValueError(f"wrn40_2: drop_rate must be in [0, 1), got {drop_rate}")
    return WideResNet(40, 2, num_classes, in_channels, float(drop_rate))
