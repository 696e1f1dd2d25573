"""Backbone classifiers.

Every model built by :func:`build_model` exposes

* ``features(x) -> (N, D)``: the penultimate representation (input of the classifier),
* ``head``: the ``nn.Linear`` classifier, so ``forward(x) == head(features(x))``,
* ``num_classes`` and ``feature_dim`` (= D) attributes.

Submodules have stable attribute names (``conv1``, ``bn1``, ``relu1``, ...) because forward
hooks (:mod:`ood_core.hooks`) address layers by their dotted module path.

:data:`ARCHITECTURES` maps an architecture name to a builder with the keyword-only
signature ``builder(*, num_classes, in_channels, image_size, **arch_params)``; the
orchestrator validates YAML ``arch_params`` against ``inspect.signature(builder)``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """A small conv net for the quickstart (digits at 16x16 trains in seconds on a CPU).

    ``conv1/bn1/relu1`` (32 w) -> ``conv2/bn2/relu2`` (64 w) -> ``pool`` (max 2x2) ->
    ``conv3/bn3/relu3`` (128 w) -> ``gap`` (global average pool) -> ``head`` (linear),
    with 3x3 convolutions (padding 1, no bias: batch norm follows) and width multiplier w.
    Works for any input size >= 2 (the global pool removes the spatial dimensions).
    """

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
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c3, num_classes)
        self.num_classes = int(num_classes)
        self.feature_dim = c3
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return torch.flatten(self.gap(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def small_cnn(*, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> SmallCNN:
    """Build :class:`SmallCNN`; ``width`` multiplies the channel counts (32, 64, 128)."""
    if image_size < 2:
        raise ValueError(f"small_cnn needs image_size >= 2 (it max-pools once), got {image_size}")
    if not width > 0:
        raise ValueError(f"small_cnn: width must be positive, got {width}")
    return SmallCNN(num_classes, in_channels, float(width))


ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
}


def architecture_params(arch: str) -> Dict[str, Any]:
    """The optional parameters of ``arch`` and their defaults (for config validation / docs)."""
    builder = _builder(arch)
    return {name: p.default for name, p in inspect.signature(builder).parameters.items()
            if name not in ("num_classes", "in_channels", "image_size")}


def _builder(arch: str) -> Callable[..., nn.Module]:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None


def build_model(arch: str, *, num_classes: int, in_channels: int, image_size: int,
                seed: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """Build architecture ``arch`` for ``num_classes`` classes and inputs of shape
    ``(in_channels, image_size, image_size)``; ``kwargs`` are the architecture's own
    parameters (e.g. ``width``). With ``seed``, the initial weights are drawn from a
    generator seeded with it (the global RNG state is left untouched).

    Raises ``KeyError`` for an unknown architecture, ``ValueError`` for unknown or invalid
    parameters.
    """
    builder = _builder(arch)
    allowed = architecture_params(arch)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"architecture {arch!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed) or 'none'}")
    if int(num_classes) < 1 or int(in_channels) < 1:
        raise ValueError(f"architecture {arch!r}: need num_classes >= 1 and in_channels >= 1, "
                         f"got {num_classes}, {in_channels}")
    args = dict(num_classes=int(num_classes), in_channels=int(in_channels), image_size=int(image_size), **kwargs)
    if seed is None:
        return builder(**args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return builder(**args)
