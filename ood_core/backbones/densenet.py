"""DenseNet-BC-100 (growth 12) for 32x32 inputs (the ODIN / Mahalanobis / LA-OOD backbone).

Huang et al., "Densely Connected Convolutional Networks", CVPR 2017. Depth 100 with bottlenecks
and compression 0.5: a 3x3 stem (24 channels), three dense blocks of 16 bottleneck layers
(``bn1-relu1-conv1`` 1x1 to 48 channels, ``bn2-relu2-conv2`` 3x3 to 12, concatenated) separated
by transitions (``bn1-relu-conv1`` 1x1 halving the channels, 2x2 average pool), a final
``bn1-relu``, global average pool and a linear head: 342-d features, 8x8 maps for 32x32 inputs.
Parameter names follow the public ``DenseNet3`` of the ODIN / Mahalanobis code (its ``fc`` is our
``head``), so those checkpoints load.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import Backbone, check_size, kaiming_init


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        inter = 4 * growth
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], 1)


class DenseBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, growth: int):
        super().__init__()
        self.layer = nn.Sequential(*[Bottleneck(in_planes + i * growth, growth) for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv1(self.relu(self.bn1(x))))


class DenseNet3(Backbone):
    stages = ("block1", "trans1", "block2", "trans2", "block3")

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, growth: int = 12,
                 reduction: float = 0.5, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"densenet: depth must be 6n + 4 (100, 190...), got {depth}")
        n = (depth - 4) // 6
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        for b in (1, 2, 3):
            setattr(self, f"block{b}", DenseBlock(n, planes, growth))
            planes += n * growth
            if b < 3:
                out = int(planes * reduction)
                setattr(self, f"trans{b}", Transition(planes, out))
                planes = out
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self._finish(num_classes, planes, dropout)
        kaiming_init(self)

    def feature_maps(self, x: Tensor) -> Tensor:
        x = self.trans1(self.block1(self.conv1(x)))
        x = self.trans2(self.block2(x))
        return self.relu(self.bn1(self.block3(x)))


def densenet100(*, num_classes: int, in_channels: int, image_size: int, growth: int = 12,
                dropout: float = 0.0) -> DenseNet3:
    """DenseNet-BC-100 (growth ``growth``, 342-d features with the default 12)."""
    check_size("densenet100", image_size, 4)
    return DenseNet3(100, num_classes, in_channels, int(growth), 0.5, float(dropout))
