"""Any torchvision or timm image classifier as a backbone, by name: ``arch: "torchvision:<name>"`` or ``"timm:<name>"``.

``torchvision:<name>`` is any classification model of ``torchvision.models.list_models(module=torchvision.models)``
(``torchvision:resnet50``, ``torchvision:vit_b_16``, ``torchvision:convnext_tiny`` ...), ``timm:<name>`` any name of
``timm.list_models()`` (Wightman, "PyTorch Image Models", https://github.com/huggingface/pytorch-image-models;
an optional dependency: ``pip install 'ood-sweep[timm]'``). The network is built with ``weights=None`` /
``pretrained=False``: nothing is downloaded, the weights come from the backbone's ``checkpoint`` file
(:func:`ood_core.checkpoints.load_user_checkpoint`: ``weights_only=True``, sha256 recorded, a file that does not fit
names the keys that differ). ``num_classes`` and ``in_channels`` are applied (timm: ``in_chans``; torchvision: the
first convolution is rebuilt for the channel count, its kernel adapted as timm's ``adapt_input_conv`` does: summed
over RGB for one channel, otherwise repeated cyclically and scaled by ``sqrt(3 / in_channels)`` so that a
fan-in-scaled initialisation keeps its variance). Where the architecture takes an image size (torchvision's ViT
``image_size``, MaxViT ``input_size``; timm models whose pretrained config says ``fixed_input_size``: ``img_size``),
it is built for the data's ``image_size`` (the position embedding then has that many patches); one forward pass of a
``(1, in_channels, image_size, image_size)`` input at build time refuses a size the network cannot take, so a sweep
stops at planning, before any training. Any other ``params`` of the backbone go to the library's constructor
(``drop_path_rate``, ``dropout`` ...), never ``weights`` / ``pretrained``.

How the network maps onto :class:`~ood_core.backbones.common.Backbone`:

* ``head`` is the network's classifier, its last ``nn.Linear`` (torchvision: ``fc``, ``classifier.3``, ``heads.head``,
  ``head`` ...; timm: ``get_classifier()``); a state dict's ``<classifier>.*`` keys load as ``head.*``.
* ``features(x)``: the classifier's input, i.e. the network's own forward with the classifier replaced by the
  identity (for timm that is ``forward_head(forward_features(x), pre_logits=True)``); ``forward(x) = head(features(x))``.
* ``feature_maps(x)``: where the features are the global average of some ``(N, D, H, W)`` maps (the input of the
  last ``AdaptiveAvgPool2d``, e.g. a ResNet's ``layer4`` output, Swin's ``permute`` output), those maps; otherwise
  (ViT, ConvNeXt's norm after pooling, MobileNetV3's MLP after pooling) the features as ``(N, D, 1, 1)``. Checked by
  the build probe, so ``pool_head(feature_maps(x)) == forward(x)`` always.
* every module keeps its dotted name (``layer4.1.bn2``, ``blocks.3.attn``, ``encoder.layers.encoder_layer_5``), so
  any of them can be hooked, except top-level modules whose name is an attribute of the backbone: ``features`` is
  ``body`` (as for ``swin_t``), and ``head`` (a classifier block that is not itself the linear layer, as in timm's
  ConvNeXt), ``stages`` and the other method names get a trailing ``_`` (``stages_.2``, ``head_.norm``); the state
  dict keys are mapped the same way (:attr:`ByNameBackbone.checkpoint_aliases`).
* ``stages``: timm's ``feature_info`` modules; for torchvision the main blocks of each family (``layer1``..``layer4``,
  ViT's encoder layers, the children of ``features``, RegNet's ``trunk_output`` blocks ...).
* :meth:`ByNameBackbone.output_layout` tells :mod:`ood_core.hooks` which modules give token sequences ``(N, S, D)``
  (ViT blocks) or channels-last maps ``(N, H, W, C)`` (Swin blocks, ConvNeXt block internals): read from the build
  probe's output shapes (3-D: tokens; 4-D ``(N, a, a, c)`` with ``a != c``: channels-last, as the input is square),
  so ``avgpool`` pools over the positions of every layout.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .common import Backbone

LIBRARIES = ("torchvision", "timm")
#: torchvision classification models that have no linear classifier (SqueezeNet ends in a 1x1 convolution)
_NO_LINEAR_HEAD = ("squeezenet1_0", "squeezenet1_1")
#: constructor arguments a backbone's ``params`` may not set: they are the tool's (sizes) or would download weights
_FORBIDDEN = ("weights", "pretrained", "num_classes", "in_chans", "in_channels", "img_size", "image_size",
              "input_size", "checkpoint_path", "cache_dir", "features_only", "progress")
#: tolerance of the build probe's check that the pooled maps are the features
_POOL_RTOL, _POOL_ATOL = 1e-4, 1e-5
#: what the network's forward finds in its classifier's place
_IDENTITY = nn.Identity()


def split_arch(arch: str) -> Optional[Tuple[str, str]]:
    """``("torchvision", "resnet18")`` for ``"torchvision:resnet18"``; None for an architecture of the registry."""
    library, sep, name = str(arch).partition(":")
    return (library, name) if sep and library in LIBRARIES else None


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm architectures need the optional dependency timm: pip install 'ood-sweep[timm]' "
                         "(or pip install timm)") from None
    return timm


@functools.lru_cache(maxsize=None)
def known_names(library: str) -> Tuple[str, ...]:
    """The model names of ``library`` that can be backbones."""
    if library == "torchvision":
        import torchvision.models as tvm

        return tuple(n for n in tvm.list_models(module=tvm) if n not in _NO_LINEAR_HEAD)
    if library == "timm":
        return tuple(_timm().list_models())
    raise ValueError(f"unknown model library {library!r}; use one of {', '.join(LIBRARIES)}")


def close_matches(name: str, names: Sequence[str], n: int = 5) -> List[str]:
    """Up to ``n`` names like ``name`` (:func:`difflib.get_close_matches`, then those containing it)."""
    found = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    found += [m for m in names if name and name.lower() in m.lower() and m not in found]
    return found[:n]


def check_name(arch: str) -> Tuple[str, str]:
    """``(library, name)`` of a by-name architecture; ValueError (with close matches) when the library has no
    such classification model."""
    parsed = split_arch(arch)
    if parsed is None:
        raise ValueError(f"{arch!r} is not of the form torchvision:<name> or timm:<name>")
    library, name = parsed
    if library == "torchvision" and name in _NO_LINEAR_HEAD:
        raise ValueError(f"{arch}: its classifier is a 1x1 convolution, not a linear layer; it cannot be a backbone")
    if library == "timm" and name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ValueError(f"{arch}: only timm's built-in architectures (timm.list_models()); weights come from the "
                         "backbone's checkpoint file")
    names = known_names(library)
    base = name.split(".", 1)[0] if library == "timm" else name  # timm names may carry a pretrained tag
    if base not in names:
        near = close_matches(base, names)
        hint = f"; close matches: {', '.join(near)}" if near else ""
        listing = ("torchvision.models.list_models(module=torchvision.models)" if library == "torchvision"
                   else "timm.list_models()")
        raise ValueError(f"unknown {library} architecture {name!r}{hint} (see {listing})")
    return library, name


# ---------------------------------------------------------------------------------------
# building the library's network


def _constructor_error(arch: str, exc: BaseException, in_channels: int, image_size: int,
                       params: Dict[str, Any]) -> ValueError:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    given = f" and params {params}" if params else ""
    return ValueError(f"{arch} cannot be built for {in_channels}x{image_size}x{image_size} inputs{given}: {text[:300]}")


def _check_params(arch: str, params: Dict[str, Any]) -> None:
    bad = sorted(k for k in params if k in _FORBIDDEN or k.startswith("pretrained"))
    if bad:
        raise ValueError(f"{arch}: params {bad} are set by the tool (sizes) or would download weights; give "
                         "trained weights as the backbone's checkpoint file")


def _adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """An RGB kernel ``(O, 3, k, k)`` for ``in_channels`` inputs: summed over RGB for one channel (timm's
    ``adapt_input_conv``), else repeated cyclically and scaled by ``sqrt(3 / in_channels)``."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * math.sqrt(weight.shape[1] / in_channels)


def _set_module(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def _replace_input_conv(arch: str, net: nn.Module, in_channels: int) -> None:
    name, conv = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise ValueError(f"{arch}: cannot adapt its first convolution to {in_channels} input channels")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(_adapt_input_conv(conv.weight, in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_module(net, name, new)


def _torchvision_net(arch: str, name: str, num_classes: int, in_channels: int, image_size: int,
                     params: Dict[str, Any]) -> nn.Module:
    import torchvision.models as tvm

    builder = tvm.get_model_builder(name)
    kwargs = dict(params)
    cls = inspect.signature(builder).return_annotation
    accepted = inspect.signature(cls.__init__).parameters if inspect.isclass(cls) else {}
    if "image_size" in accepted:  # ViT: position embedding for the data's size
        kwargs["image_size"] = image_size
    elif "input_size" in accepted:  # MaxViT
        kwargs["input_size"] = (image_size, image_size)
    if "aux_logits" in accepted:  # GoogLeNet / Inception v3: one output in training too
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    try:
        net = builder(weights=None, num_classes=num_classes, **kwargs)
    except Exception as exc:  # noqa: BLE001 - TypeError (a param), AssertionError (a size) ...: the user's values
        raise _constructor_error(arch, exc, in_channels, image_size, params) from None
    if in_channels != 3:
        _replace_input_conv(arch, net, in_channels)
    return net


def _timm_net(arch: str, name: str, num_classes: int, in_channels: int, image_size: int,
              params: Dict[str, Any]) -> nn.Module:
    timm = _timm()
    kwargs = dict(params, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    cfg = timm.models.get_pretrained_cfg(name.split(".", 1)[0])
    fixed = bool(getattr(cfg, "fixed_input_size", False))
    try:
        if fixed:
            try:
                return timm.create_model(name, img_size=image_size, **kwargs)
            except TypeError as exc:  # fixed size, but no img_size argument: the build probe checks the size
                if "img_size" not in str(exc):
                    raise
        return timm.create_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - see _torchvision_net
        raise _constructor_error(arch, exc, in_channels, image_size, params) from None


def _classifier_path(arch: str, library: str, net: nn.Module, num_classes: int) -> str:
    """Dotted name of the final linear classifier."""
    if library == "timm":
        clf = net.get_classifier()
        if not isinstance(clf, nn.Linear):
            raise ValueError(f"{arch}: its classifier is {type(clf).__name__}, not one linear layer; it cannot be "
                             "a backbone")
        path = next(n for n, m in net.named_modules() if m is clf)
    else:
        path = next((n for n, m in reversed(list(net.named_modules())) if isinstance(m, nn.Linear)), None)
        if path is None:
            raise ValueError(f"{arch}: has no linear classifier; it cannot be a backbone")
        clf = net.get_submodule(path)
    if clf.out_features != num_classes:
        raise ValueError(f"{arch}: its last linear layer {path!r} has {clf.out_features} outputs, not the "
                         f"{num_classes} classes; it cannot be a backbone")
    return path


def _torchvision_stages(net: nn.Module) -> List[str]:
    """The main blocks of a torchvision classifier, original names, in network order."""
    children = dict(net.named_children())

    def kids(prefix: str, module: nn.Module) -> List[str]:  # the children that hold parameters
        return [f"{prefix}.{n}" for n, m in module.named_children() if any(True for _ in m.parameters())]

    if all(f"layer{i}" in children for i in range(1, 5)):  # ResNet, ResNeXt, Wide ResNet
        return [f"layer{i}" for i in range(1, 5)]
    if "encoder" in children and hasattr(children["encoder"], "layers"):  # ViT
        return kids("encoder.layers", children["encoder"].layers)
    for trunk in ("trunk_output", "blocks", "layers"):  # RegNet, MaxViT, MNASNet
        if trunk in children:
            return kids(trunk, children[trunk])
    if "stage2" in children:  # ShuffleNetV2
        return [n for n in ("stage2", "stage3", "stage4", "conv5") if n in children]
    if "features" in children:  # VGG / AlexNet: each block ends in a max-pool; others: the blocks themselves
        feats = children["features"]
        if all(not any(True for _ in m.children()) for m in feats.children()):
            return [f"features.{n}" for n, m in feats.named_children() if isinstance(m, nn.MaxPool2d)]
        return kids("features", feats)
    inception = [n for n, m in children.items() if type(m).__name__.startswith("Inception")]
    if inception:  # GoogLeNet, Inception v3
        return inception
    return [n for n, m in children.items() if any(True for _ in m.parameters())]


# ---------------------------------------------------------------------------------------
# the backbone


class ByNameBackbone(Backbone):
    """A torchvision / timm classifier under the :class:`Backbone` contract (see the module docstring).

    The network's top-level children, direct parameters and buffers are this module's own (under the names
    above); its ``forward`` runs on a light proxy that sees them under their original names, so moving, copying or
    replacing submodules of the backbone is what the network's forward then uses.
    """

    def __init__(self, arch: str, library: str, net: nn.Module, num_classes: int, in_channels: int,
                 image_size: int):
        super().__init__()
        self.arch = arch
        clf_path = _classifier_path(arch, library, net, num_classes)
        classifier = net.get_submodule(clf_path)
        placeholder = nn.Identity()
        _set_module(net, clf_path, placeholder)
        stages = ([f["module"] for f in getattr(net, "feature_info", None) or [] if "module" in f]
                  if library == "timm" else _torchvision_stages(net))

        reserved = set(dir(type(self))) | {"arch", "num_classes", "feature_dim", "head"}
        self._names: List[Tuple[str, Optional[str]]] = []  # (network's name, ours or None for the placeholder)
        aliases = [(f"{clf_path}.", "head.")] if clf_path != "head" else []
        for theirs, child in net.named_children():
            if child is placeholder:
                self._names.append((theirs, None))
                continue
            ours = theirs if theirs not in reserved else ("body" if theirs == "features" else f"{theirs}_")
            if ours != theirs:
                aliases.append((f"{theirs}.", f"{ours}."))
            self.add_module(ours, child)
            self._names.append((theirs, ours))
        for key, param in net._parameters.items():
            self.register_parameter(key, param)
        for key, buf in net._buffers.items():
            self.register_buffer(key, buf, persistent=key not in net._non_persistent_buffers_set)
        self._net_class = type(net)
        self._net_attrs = {k: v for k, v in net.__dict__.items()
                           if k not in ("_modules", "_parameters", "_buffers", "training")}
        #: (prefix in the library's state dict, prefix here): what load_user_checkpoint maps
        self.checkpoint_aliases: Tuple[Tuple[str, str], ...] = tuple(aliases)
        self.head = classifier
        self.num_classes, self.feature_dim = int(num_classes), int(classifier.in_features)
        self.stages = tuple(self._our_path(s) for s in stages)
        self._layouts: Dict[str, str] = {}
        self._pool: Optional[str] = None
        self._probe(in_channels, image_size)

    def _our_path(self, path: str) -> str:
        """The name here of the network's module ``path`` (its first component may be renamed)."""
        top, sep, rest = path.partition(".")
        return dict((t, o) for t, o in self._names if o is not None).get(top, top) + sep + rest

    def _run_network(self, x: Tensor) -> Tensor:
        """The library's ``forward`` on a proxy holding this module's children, parameters and buffers under the
        network's names (the classifier is the identity there): the classifier's input."""
        proxy = self._net_class.__new__(self._net_class)
        state = proxy.__dict__
        state.update(self._net_attrs)
        state["_parameters"], state["_buffers"], state["training"] = self._parameters, self._buffers, self.training
        state["_modules"] = {theirs: (self._modules[ours] if ours is not None else _IDENTITY)
                             for theirs, ours in self._names}
        return self._net_class.forward(proxy, x)

    def features(self, x: Tensor) -> Tensor:
        return self._run_network(x)

    def feature_maps(self, x: Tensor) -> Tensor:
        if self._pool is None:
            return self.features(x)[:, :, None, None]
        captured = []
        handle = self.get_submodule(self._pool).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            self._run_network(x)
        finally:
            handle.remove()
        return captured[-1]

    def pool_features(self, maps: Tensor) -> Tensor:
        return maps.mean(dim=(2, 3))

    def pool_head(self, maps: Tensor) -> Tensor:
        return self.head(self.pool_features(maps))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def output_layout(self, module: str) -> Optional[str]:
        """``"tokens"`` (``(N, S, D)``), ``"channels_last"`` (``(N, H, W, C)``) or None (channels first)."""
        return self._layouts.get(module)

    def _probe(self, in_channels: int, image_size: int) -> None:
        """One forward pass of a ``(1, in_channels, image_size, image_size)`` input (own generator, eval mode):
        refuses a size the network cannot take, checks the features' width, records each module's output layout
        and finds the pooling whose input maps average to the features."""
        x = torch.randn(1, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
        shapes: Dict[str, Tuple[int, ...]] = {}
        pooled: List[Tuple[str, Tensor]] = []
        handles = []

        def record(name):
            def hook(module, args, out):
                t = out if isinstance(out, Tensor) else (out[0] if isinstance(out, (tuple, list)) and out and
                                                         isinstance(out[0], Tensor) else None)
                if t is not None and name not in shapes:
                    shapes[name] = tuple(t.shape)
            return hook

        def record_pool(name):
            def hook(module, args):
                if isinstance(args[0], Tensor) and args[0].ndim == 4:
                    pooled.append((name, args[0]))
            return hook

        was_training = self.training
        try:
            for name, module in self.named_modules():
                if name and name != "head":
                    handles.append(module.register_forward_hook(record(name)))
                if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
                    handles.append(module.register_forward_pre_hook(record_pool(name)))
            self.eval()
            with torch.no_grad():
                feats = self.features(x)
        except Exception as exc:  # noqa: BLE001 - a size the network cannot take is the user's setting
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{self.arch} cannot take {in_channels}x{image_size}x{image_size} inputs "
                             f"(image_size / in_channels): {text[:200]}") from None
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        if not isinstance(feats, Tensor) or tuple(feats.shape) != (1, self.feature_dim):
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(f"{self.arch}: the input of its classifier has shape {shape}, not "
                             f"(N, {self.feature_dim}); it cannot be a backbone")
        self._layouts = {n: layout for n, s in shapes.items() if (layout := shape_layout(s)) is not None}
        seen = set()
        for name, maps in reversed(pooled):  # the last call of each pooling module, the last module first
            if name in seen:
                continue
            seen.add(name)
            if maps.shape[1] == self.feature_dim and torch.allclose(maps.mean(dim=(2, 3)), feats,
                                                                    rtol=_POOL_RTOL, atol=_POOL_ATOL):
                self._pool = name
                break


def shape_layout(shape: Tuple[int, ...]) -> Optional[str]:
    """The layout of an output of shape ``shape`` for a square input: ``"tokens"`` for ``(N, S, D)``,
    ``"channels_last"`` for ``(N, a, a, c)`` with ``a != c``, None (channels first, or undecidable) otherwise."""
    if len(shape) == 3:
        return "tokens"
    if len(shape) == 4 and shape[1] == shape[2] != shape[3]:
        return "channels_last"
    return None


def build_by_name(arch: str, *, num_classes: int, in_channels: int, image_size: int, **params: Any) -> ByNameBackbone:
    """The backbone ``arch`` (``"torchvision:<name>"`` / ``"timm:<name>"``), untrained, for ``num_classes`` classes
    and ``(in_channels, image_size, image_size)`` inputs; ``params`` go to the library's constructor."""
    library, name = check_name(arch)
    _check_params(arch, params)
    make = _timm_net if library == "timm" else _torchvision_net
    net = make(arch, name, int(num_classes), int(in_channels), int(image_size), params)
    return ByNameBackbone(arch, library, net, int(num_classes), int(in_channels), int(image_size))
