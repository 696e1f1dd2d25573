"""torchvision architectures with torchvision's parameter names, for checkpoints trained elsewhere (OpenOOD v1.5).

* ``resnet18_224x224``: OpenOOD's ImageNet-200 network (its ``ResNet18_224x224`` subclasses torchvision's ResNet18:
  7x7 stem + max-pool, ``layerK.0.downsample``, ``fc``); no resizing inside the model (OpenOOD feeds 224 x 224).
* ``vit_b_16``: torchvision's ViT-B/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021), 768-d
  class token after the final layer norm; inputs must be 224 x 224 (its position embedding).
* ``swin_t``: torchvision's Swin-T (Liu et al., "Swin Transformer", ICCV 2021), 768-d pooled features.

OpenOOD v1.5 evaluates ImageNet-1K with torchvision's pretrained ResNet-50 (V1), ViT-B/16 and Swin-T: give the
weights file torchvision publishes as the backbone's ``checkpoint`` (a plain state dict with torchvision's keys;
``fc`` / ``heads.head`` / ``head`` name the classifier, our ``head``) and it loads strictly with
:func:`ood_core.checkpoints.load_user_checkpoint`. ResNet-50 is ``resnet50_imagenet`` with ``weights: null``.

Every module keeps torchvision's dotted name (``encoder.layers.encoder_layer_11``, ``layer4.1.bn2``), so any of
them can be hooked, except Swin-T's ``features`` (the name of our ``features()`` method), which is ``body`` here
(``body.5.1.attn``); its checkpoint keys are mapped. ``feature_maps`` follows :class:`~ood_core.backbones.common.Backbone`: Swin-T's last maps in
``(N, C, H, W)`` (its ``permute`` module's output); ViT's class token as ``(N, 768, 1, 1)`` (module ``token``),
so global pooling of the maps is the identity and ``forward == head(features)``. ``output_layout`` declares the
block outputs' layouts (ViT: token sequences; Swin: channels-last maps), so ``avgpool`` / ``max`` of a hooked
block pool over its tokens / positions (:mod:`ood_core.hooks`) and ``cls_token`` reads ViT's class token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .common import Backbone, check_size
from .imagenet import TorchvisionResNet


def resnet18_224x224(*, num_classes: int, in_channels: int, image_size: int,
                     dropout: float = 0.0) -> TorchvisionResNet:
    """OpenOOD's ``ResNet18_224x224`` (torchvision ResNet18 keys); 224 x 224 inputs, no resizing in the model."""
    check_size("resnet18_224x224", image_size, 32)
    return TorchvisionResNet("resnet18_224x224", num_classes, in_channels, None, None, float(dropout))


class ClassToken(nn.Module):
    """The class token of a ViT's token sequence ``(N, S, D)`` as ``(N, D, 1, 1)`` maps."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0][:, :, None, None]


class TorchvisionViT(Backbone):
    stages = ("token",)

    def __init__(self, num_classes: int, dropout: float):
        super().__init__()
        import torchvision.models as tvm

        net = tvm.vit_b_16(weights=None)
        self.patch_size, self.hidden_dim, self.image_size = net.patch_size, net.hidden_dim, net.image_size
        self.class_token, self.conv_proj, self.encoder = net.class_token, net.conv_proj, net.encoder
        self.token = ClassToken()
        self._finish(num_classes, net.hidden_dim, dropout)

    def feature_maps(self, x: Tensor) -> Tensor:
        n, _c, h, w = x.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"vit_b_16 needs {self.image_size}x{self.image_size} inputs, got {h}x{w}")
        p = self.patch_size
        x = self.conv_proj(x).reshape(n, self.hidden_dim, (h // p) * (w // p)).permute(0, 2, 1)
        x = self.encoder(torch.cat([self.class_token.expand(n, -1, -1), x], dim=1))
        return self.token(x)

    def output_layout(self, module: str) -> Optional[str]:
        """Everything inside ``encoder`` outputs token sequences ``(N, 1 + patches, 768)``."""
        return "tokens" if module == "encoder" or module.startswith("encoder.") else None


def vit_b_16(*, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0) -> TorchvisionViT:
    """torchvision's ViT-B/16 (768-d class token); RGB 224 x 224 inputs."""
    if int(in_channels) != 3 or int(image_size) != 224:
        raise ValueError(f"vit_b_16 needs RGB 224x224 inputs (in_channels 3, image_size 224), got "
                         f"{in_channels} channels, {image_size} px")
    return TorchvisionViT(num_classes, float(dropout))


class TorchvisionSwin(Backbone):
    stages = ("permute",)

    def __init__(self, num_classes: int, dropout: float):
        super().__init__()
        import torchvision.models as tvm

        net = tvm.swin_t(weights=None)
        # torchvision's ``features`` would shadow Backbone.features(): the stages are ``body`` here, and
        # load_user_checkpoint maps the file's ``features.*`` keys onto ``body.*``
        self.body, self.norm, self.permute = net.features, net.norm, net.permute
        self._finish(num_classes, net.head.in_features, dropout)

    def feature_maps(self, x: Tensor) -> Tensor:
        return self.permute(self.norm(self.body(x)))

    def output_layout(self, module: str) -> Optional[str]:
        """Swin works channels last ``(N, H, W, C)``: every module of ``body`` after the patch embedding's
        convolution (``body.0.0``), and ``norm``; ``permute`` turns the maps back to ``(N, C, H, W)``."""
        if module == "norm" or (module.startswith("body") and module != "body.0.0"
                                and not module.startswith("body.0.0.")):
            return "channels_last"
        return None


def swin_t(*, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0) -> TorchvisionSwin:
    """torchvision's Swin-T (768-d pooled features); RGB inputs, 224 x 224 as trained."""
    if int(in_channels) != 3:
        raise ValueError(f"swin_t needs RGB inputs (in_channels 3), got {in_channels}")
    check_size("swin_t", image_size, 32)
    return TorchvisionSwin(num_classes, float(dropout))
