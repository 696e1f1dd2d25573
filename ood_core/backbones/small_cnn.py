"""The quickstart's small conv net."""
from __future__ import annotations

from torch import Tensor, nn

from .common import Backbone, check_size, kaiming_init


class SmallCNN(Backbone):
    """A small conv net for the quickstart (digits at 16x16 trains in seconds on a CPU).

    ``conv1/bn1/relu1`` (32 w) -> ``conv2/bn2/relu2`` (64 w) -> ``pool`` (max 2x2) ->
    ``conv3/bn3/relu3`` (128 w) -> ``gap`` (global average pool) -> ``head`` (linear),
    with 3x3 convolutions (padding 1, no bias: batch norm follows) and width multiplier w.
    Works for any input size >= 2 (the global pool removes the spatial dimensions).
    """

    stages = ("relu1", "relu2", "relu3")

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c1, c2, c3 = (max(1, int(round(c * width))) for c in (32, 64, 128))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu3 = nn.ReLU()
        self._finish(num_classes, c3)
        kaiming_init(self, zero_linear_bias=False)  # the head keeps nn.Linear's default init

    def feature_maps(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.relu3(self.bn3(self.conv3(x)))


def small_cnn(*, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> SmallCNN:
    """Build :class:`SmallCNN`; ``width`` multiplies the channel counts (32, 64, 128)."""
    check_size("small_cnn", image_size, 2)
    if not width > 0:
        raise ValueError(f"small_cnn: width must be positive, got {width}")
    return SmallCNN(num_classes, in_channels, float(width))
