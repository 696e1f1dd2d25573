"""Backbone classifiers: the registry.

Every model built by :func:`build_model` follows :class:`ood_core.backbones.common.Backbone`:

* ``features(x) -> (N, D)``: the penultimate representation (input of the classifier),
* ``head``: the ``nn.Linear`` classifier, so ``forward(x) == head(features(x))`` (eval mode),
* ``feature_maps(x) -> (N, C, H, W)`` (the maps before global pooling: the split point of
  activation shaping) and ``pool_head(maps) -> logits``, with ``forward(x) == pool_head(feature_maps(x))``,
* ``num_classes``, ``feature_dim`` (= D) and ``stages`` (dotted names of the main blocks in
  network order).

Submodules have stable attribute names (``conv1``, ``bn1``, ``layer2.0.bn1`` ...) because forward
hooks (:mod:`ood_core.hooks`) address layers by their dotted module path.

=====================  ===========================================================================
``small_cnn``          the quickstart's conv net (128-d)
``resnet18``           ResNet18 for 32x32 inputs: 3x3 stem, no max-pool, 512-d (the default; OpenOOD v1.5)
``resnet18_32x32``     the same network under OpenOOD's name: its ``best.ckpt`` files load as they are
``resnet18_224x224``   OpenOOD's ImageNet-200 ResNet18 (torchvision keys, 224x224 inputs, no resizing)
``vit_b_16``           torchvision's ViT-B/16 (768-d class token; weights file as the checkpoint)
``swin_t``             torchvision's Swin-T (768-d; weights file as the checkpoint)
``resnet34``           ResNet34 for 32x32 inputs (LA-OOD), 512-d
``vgg16``              VGG16-BN for 32x32 inputs (LA-OOD), 512-d
``densenet100``        DenseNet-BC-100, growth 12 (ODIN / Mahalanobis / LA-OOD), 342-d
``wrn40_2``            WideResNet-40-2 (Outlier Exposure), 128-d
``resnet18_imagenet``  torchvision's ResNet18, ``weights: imagenet`` for pretrained, inputs resized
``resnet50_imagenet``  torchvision's ResNet50 (2048-d), ``weights: imagenet`` / ``imagenet_v2``
``torchvision:<name>`` any classification model of ``torchvision.models.list_models(module=torchvision.models)``
``timm:<name>``        any ``timm.list_models()`` name (optional dependency ``timm``)
=====================  ===========================================================================

The last two (:mod:`ood_core.backbones.by_name`) are built untrained (weights from the backbone's ``checkpoint``),
their classifier is ``head``, every module keeps its dotted name, and their ``params`` go to the library's
constructor; :func:`check_architecture` validates a name (close matches for a typo).

:data:`ARCHITECTURES` maps an architecture name to a builder with the keyword-only signature
``builder(*, num_classes, in_channels, image_size, **arch_params)``; the orchestrator validates
YAML ``arch_params`` against ``inspect.signature(builder)``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ood_core.backbones.by_name import build_by_name, check_name, close_matches, known_names, split_arch
from ood_core.backbones.common import Backbone
from ood_core.backbones.densenet import densenet100
from ood_core.backbones.imagenet import (WeightsMissingError, load_pretrained_state, resnet18_imagenet,
                                         resnet50_imagenet)
from ood_core.backbones.resnet_cifar import resnet18, resnet34
from ood_core.backbones.small_cnn import SmallCNN, small_cnn
from ood_core.backbones.torchvision_nets import resnet18_224x224, swin_t, vit_b_16
from ood_core.backbones.vgg import vgg16
from ood_core.backbones.wrn import wrn40_2

__all__ = ["ARCHITECTURES", "Backbone", "SmallCNN", "WeightsMissingError", "architecture_params", "build_model",
           "check_architecture", "check_weights_available", "DEFAULT_ARCH"]

DEFAULT_ARCH = "resnet18"

ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg16": vgg16,
    "densenet100": densenet100,
    "wrn40_2": wrn40_2,
    "resnet18_imagenet": resnet18_imagenet,
    "resnet50_imagenet": resnet50_imagenet,
    # OpenOOD v1.5's networks (Zhang et al. 2023): its checkpoints and torchvision's weights files load as they are
    "resnet18_32x32": resnet18,
    "resnet18_224x224": resnet18_224x224,
    "vit_b_16": vit_b_16,
    "swin_t": swin_t,
}


def check_architecture(arch: str) -> None:
    """Raise ``ValueError`` (one line, with close matches) unless ``arch`` is in :data:`ARCHITECTURES` or is a
    ``torchvision:<name>`` / ``timm:<name>`` the library has (config validation, before any compute)."""
    if split_arch(arch) is not None:
        check_name(arch)
        return
    if arch in ARCHITECTURES:
        return
    hints = [f"close matches: {', '.join(near)}"] if (near := close_matches(arch, sorted(ARCHITECTURES))) else []
    if ":" in arch:
        hints.append("a library prefix is torchvision: or timm:")
    elif arch in known_names("torchvision"):
        hints.append(f"did you mean torchvision:{arch}?")
    hints.append(f"known: {', '.join(sorted(ARCHITECTURES))}, torchvision:<name>, timm:<name>")
    raise ValueError(f"unknown architecture {arch!r}; " + "; ".join(hints))


def architecture_params(arch: str) -> Dict[str, Any]:
    """The optional parameters of ``arch`` and their defaults (for config validation / docs); ``{}`` for a
    ``torchvision:`` / ``timm:`` architecture, whose ``params`` go to the library's constructor as they are."""
    if split_arch(arch) is not None:
        return {}
    builder = _builder(arch)
    return {name: p.default for name, p in inspect.signature(builder).parameters.items()
            if name not in ("num_classes", "in_channels", "image_size")}


def _builder(arch: str) -> Callable[..., nn.Module]:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None


def check_weights_available(arch: str, *, fetch: bool = False, **params: Any) -> None:
    """Raise :class:`WeightsMissingError` when ``arch`` with ``params`` asks for pretrained weights
    (``weights: imagenet``) that are not in torch hub's cache; with ``fetch`` download them first.
    A no-op for architectures trained from scratch."""
    weights = params.get("weights")
    if weights and "weights" in architecture_params(arch):
        load_pretrained_state(arch, weights, fetch=fetch)


def build_model(arch: str, *, num_classes: int, in_channels: int, image_size: int,
                seed: Optional[int] = None, load_weights: bool = True, **kwargs: Any) -> nn.Module:
    """Build architecture ``arch`` for ``num_classes`` classes and inputs of shape
    ``(in_channels, image_size, image_size)``; ``kwargs`` are the architecture's own
    parameters (e.g. ``width``, ``dropout``, ``weights="imagenet"``). With ``seed``, the initial
    weights are drawn from a generator seeded with it (the global RNG state is left untouched).
    ``load_weights=False`` builds the same architecture without loading pretrained weights (for
    config validation: no download).

    ``arch`` ``"torchvision:<name>"`` / ``"timm:<name>"``: any model of that library by name
    (:func:`ood_core.backbones.by_name.build_by_name`; ``kwargs`` go to its constructor).

    Raises ``KeyError`` for an unknown architecture of the registry, ``ValueError`` for an unknown
    ``torchvision:`` / ``timm:`` name and for unknown or invalid parameters, :class:`WeightsMissingError` when
    pretrained weights cannot be had.
    """
    if int(num_classes) < 1 or int(in_channels) < 1:
        raise ValueError(f"architecture {arch!r}: need num_classes >= 1 and in_channels >= 1, "
                         f"got {num_classes}, {in_channels}")
    if split_arch(arch) is not None:
        builder: Callable[..., nn.Module] = functools.partial(build_by_name, arch)
        return _seeded(builder, seed, num_classes=int(num_classes), in_channels=int(in_channels),
                       image_size=int(image_size), **kwargs)
    builder = _builder(arch)
    allowed = architecture_params(arch)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"architecture {arch!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed) or 'none'}")
    if not load_weights and kwargs.get("weights"):
        from ood_core.backbones.imagenet import _weights_enum

        _weights_enum(arch, kwargs["weights"])  # still validate the value
        kwargs = dict(kwargs, weights=None, input_size=kwargs.get("input_size") or 224)
    return _seeded(builder, seed, num_classes=int(num_classes), in_channels=int(in_channels),
                   image_size=int(image_size), **kwargs)


def _seeded(builder: Callable[..., nn.Module], seed: Optional[int], **args: Any) -> nn.Module:
    """``builder(**args)``, its initial weights drawn from a generator seeded with ``seed`` (global RNG untouched)."""
    if seed is None:
        return builder(**args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return builder(**args)
