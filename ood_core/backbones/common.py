"""The contract every backbone follows (:class:`Backbone`).

* ``feature_maps(x) -> (N, C, H, W)``: the last feature maps before global pooling (the split point
  of activation shaping: ReAct / ASH / SCALE / RankFeat act here or on their pooled version);
* ``pool_head(maps) -> logits``: global average pool, (dropout in training), ``head``;
* ``features(x) -> (N, D)``: the pooled maps, i.e. the penultimate representation = the input of
  ``head`` (what the ``penultimate`` forward pre-hook sees);
* ``head``: the ``nn.Linear`` classifier (``weight`` ``(num_classes, D)``, ``bias``);
* ``forward(x) == pool_head(feature_maps(x)) == head(features(x))`` in eval mode;
* ``num_classes``, ``feature_dim`` (= D) and ``stages``: the dotted names of the main blocks in
  network order (e.g. ``layer1`` ... ``layer4``), for multi-layer detectors and hooks. Every
  convolution / batch norm has a stable dotted name too (``layer2.0.bn1``), in network order;
* ``output_layout(module)``: ``"tokens"`` where a module's output is a token sequence ``(N, S, D)``,
  ``"channels_last"`` where it is ``(N, H, W, C)``, None for channels first (the default; see :mod:`ood_core.hooks`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


class Backbone(nn.Module):
    num_classes: int
    feature_dim: int
    stages: Tuple[str, ...] = ()

    def _finish(self, num_classes: int, feature_dim: int, dropout: float = 0.0) -> None:
        """Add ``gap``, ``dropout`` and ``head`` (in that order, after the body) and the attributes."""
        if not 0 <= dropout < 1:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)

    def feature_maps(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_layout(self, module: str) -> Optional[str]:
        """The layout of ``module``'s output when it is not channels first: ``"tokens"`` / ``"channels_last"``."""
        return None

    def pool_features(self, maps: Tensor) -> Tensor:
        """Global average pool of the feature maps, ``(N, C, H, W) -> (N, C)``."""
        return torch.flatten(self.gap(maps), 1)

    def features(self, x: Tensor) -> Tensor:
        return self.pool_features(self.feature_maps(x))

    def pool_head(self, maps: Tensor) -> Tensor:
        return self.head(self.dropout(self.pool_features(maps)))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_head(self.feature_maps(x))


def kaiming_init(model: nn.Module, zero_linear_bias: bool = True) -> None:
    """He-normal convolutions (fan_out, ReLU), unit / zero batch norms, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None and zero_linear_bias:
            nn.init.zeros_(m.bias)


def check_size(arch: str, image_size: int, minimum: int) -> None:
    if int(image_size) < minimum:
        raise ValueError(f"{arch} needs image_size >= {minimum}, got {image_size}")
