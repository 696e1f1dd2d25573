"""ResNet18 / ResNet34 for small (32x32) inputs, as in OpenOOD v1.5 (``ResNet18_32x32``).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, with the CIFAR stem: one
3x3 convolution (stride 1, 64 channels), no max-pool; four stages of basic blocks (64, 128, 256,
512 channels; stride 2 from the second stage on), global average pool, linear head: 512-d
features, 4x4 feature maps for 32x32 inputs.

Parameter names follow OpenOOD's implementation (``conv1``, ``bn1``, ``layerK.i.conv1``,
``layerK.i.shortcut.0`` ...; its ``fc`` is our ``head``), so its checkpoints load with
:func:`ood_core.checkpoints.load_user_checkpoint`.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .common import Backbone, check_size, kaiming_init


class BasicBlock(nn.Module):
    """``conv1/bn1/relu1 -> conv2/bn2`` plus the ``shortcut`` (1x1 conv + bn when the shape
    changes), then ``relu2``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(Backbone):
    stages = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, blocks: Sequence[int], num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        for k, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            layers = []
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=1 if (k == 1 or i > 0) else 2))
                in_planes = planes
            setattr(self, f"layer{k}", nn.Sequential(*layers))
        self._finish(num_classes, 512, dropout)
        kaiming_init(self)

    def feature_maps(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet18(*, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0) -> ResNetCifar:
    """ResNet18 for 32x32 inputs (3x3 stem, no max-pool, 512-d features); ``dropout`` before the head
    (training only)."""
    check_size("resnet18", image_size, 8)
    return ResNetCifar((2, 2, 2, 2), num_classes, in_channels, float(dropout))


def resnet34(*, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0) -> ResNetCifar:
    """ResNet34 for 32x32 inputs (blocks 3, 4, 6, 3; the LA-OOD backbone)."""
    check_size("resnet34", image_size, 8)
    return ResNetCifar((3, 4, 6, 3), num_classes, in_channels, float(dropout))
