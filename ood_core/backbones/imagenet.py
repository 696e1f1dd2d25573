"""torchvision's ImageNet ResNet18 / ResNet50, optionally with their pretrained weights.

``weights: imagenet`` loads torchvision's ImageNet-1k weights (``IMAGENET1K_V1``; ResNet50 also
accepts ``imagenet_v2`` for ``IMAGENET1K_V2``) from torch hub's cache
(``$TORCH_HOME/hub/checkpoints``), downloading them when they are missing; without network a
missing file is a :class:`WeightsMissingError` naming the file to put there. The classifier is
kept for 1,000 classes and replaced by a new linear head otherwise (fine-tuning); for one input
channel the pretrained first convolution is summed over RGB. Inputs are resized (bilinear) to
``input_size`` inside the model (default 224 with pretrained weights, none otherwise), so the data
can stay at the ID set's size. Module names are torchvision's (``layer3.1.bn2``, ``layer1.0.downsample.0``;
its ``fc`` is our ``head``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import Backbone, check_size

WEIGHTS = {  # (arch, user value) -> torchvision enum member name
    ("resnet18_imagenet", "imagenet"): "IMAGENET1K_V1",
    ("resnet50_imagenet", "imagenet"): "IMAGENET1K_V1",
    ("resnet50_imagenet", "imagenet_v2"): "IMAGENET1K_V2",
}


class WeightsMissingError(FileNotFoundError):
    """Pretrained weights are not cached and cannot be downloaded."""


def _weights_enum(arch: str, weights: str):
    import torchvision.models as tvm

    key = (arch, str(weights).lower())
    if key not in WEIGHTS:
        allowed = sorted(v for a, v in WEIGHTS if a == arch)
        raise ValueError(f"{arch}: weights must be null or one of {allowed}, got {weights!r}")
    enum = tvm.ResNet18_Weights if arch.startswith("resnet18") else tvm.ResNet50_Weights
    return getattr(enum, WEIGHTS[key])


def weights_path(arch: str, weights: str) -> str:
    """Where torch hub caches the weights file of ``(arch, weights)``."""
    url = _weights_enum(arch, weights).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def load_pretrained_state(arch: str, weights: str, *, fetch: bool = True) -> Optional[dict]:
    """The torchvision state dict (downloaded into the hub cache if needed and ``fetch``); with
    ``fetch=False`` only checks the cache and returns None."""
    member = _weights_enum(arch, weights)
    path = weights_path(arch, weights)
    if not fetch:
        if not os.path.isfile(path):
            raise WeightsMissingError(f"{arch}: pretrained weights {weights!r} not cached at {path}; run with "
                                      f"network access once or download {member.url} to that path")
        return None
    try:
        return torch.hub.load_state_dict_from_url(member.url, progress=False, map_location="cpu", weights_only=True)
    except Exception as exc:  # URLError, OSError, unpickling errors
        if os.path.isfile(path):
            raise WeightsMissingError(f"{arch}: cached weights {path} are unreadable ({exc}); delete the file "
                                      "and retry") from exc
        raise WeightsMissingError(f"{arch}: pretrained weights {weights!r} not cached at {path} and the download "
                                  f"failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                  f"download {member.url} to that path") from exc


class TorchvisionResNet(Backbone):
    stages = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, arch: str, num_classes: int, in_channels: int, weights: Optional[str],
                 input_size: Optional[int], dropout: float):
        super().__init__()
        import torchvision.models as tvm

        net = (tvm.resnet18 if arch.startswith("resnet18") else tvm.resnet50)(weights=None)
        state = load_pretrained_state(arch, weights) if weights else None
        if state is not None:
            net.load_state_dict(state)
        self.input_size = input_size
        self.conv1 = net.conv1
        if in_channels != 3:
            conv = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            if state is not None and in_channels == 1:
                with torch.no_grad():
                    conv.weight.copy_(net.conv1.weight.sum(dim=1, keepdim=True))
            self.conv1 = conv
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        dim = net.fc.in_features
        self._finish(num_classes, dim, dropout)
        if state is not None and num_classes == net.fc.out_features:
            self.head = net.fc

    def feature_maps(self, x: Tensor) -> Tensor:
        if self.input_size and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _build(arch: str, num_classes: int, in_channels: int, image_size: int, weights: Optional[str],
           input_size: Optional[int], dropout: float) -> TorchvisionResNet:
    check_size(arch, image_size, 8)
    if weights is not None:
        _weights_enum(arch, weights)  # validates the value before anything is loaded
    if input_size is None and weights:
        input_size = 224
    if input_size is not None and int(input_size) < 32:
        raise ValueError(f"{arch}: input_size must be >= 32, got {input_size}")
    return TorchvisionResNet(arch, num_classes, in_channels, weights, None if input_size is None else int(input_size),
                             float(dropout))


def resnet18_imagenet(*, num_classes: int, in_channels: int, image_size: int, weights: Optional[str] = None,
                      input_size: Optional[int] = None, dropout: float = 0.0) -> TorchvisionResNet:
    """torchvision's ResNet18 (7x7 stem + max-pool, 512-d features); ``weights: imagenet`` for the
    pretrained ImageNet weights; inputs resized to ``input_size`` (default 224 when pretrained)."""
    return _build("resnet18_imagenet", num_classes, in_channels, image_size, weights, input_size, dropout)


def resnet50_imagenet(*, num_classes: int, in_channels: int, image_size: int, weights: Optional[str] = None,
                      input_size: Optional[int] = None, dropout: float = 0.0) -> TorchvisionResNet:
    """torchvision's ResNet50 (2048-d features); ``weights: imagenet`` (V1) or ``imagenet_v2``."""
    return _build("resnet50_imagenet", num_classes, in_channels, image_size, weights, input_size, dropout)
