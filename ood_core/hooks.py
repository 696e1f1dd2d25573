"""Read intermediate representations of a network with forward hooks and stream them to Parquet.

A :class:`LayerSpec` names what to read and how to reduce it per sample:

* ``LayerSpec("logits")``: the model output; ``LayerSpec("penultimate")``: the input of ``model.head``
  (a forward pre-hook), i.e. ``model.features(x)``;
* ``LayerSpec(name, module="layer1.0.conv1", reduction=...)``: the raw output of a submodule, captured by
  a forward hook the moment the module returns, so a later in-place op (``ReLU(inplace=True)``) does not
  alter it: with ``bn1`` this is the pre-ReLU activation.

Reductions (computed in torch on the model's device, then moved to float32 CPU numpy):

=========================  ==========================================================================
``none``                   the output as it is, ``(N, C, H, W)`` (stored flattened, shape kept in metadata)
``avgpool``                mean over the positions, ``(N, C)``: over the spatial dimensions ``(2, 3, ...)``
                           of channels-first maps, over the tokens of a token sequence, over ``H, W``
                           of channels-last maps (the layout the model declares, below); 2-D outputs pass
                           through
``max``                    max over the positions (as ``avgpool``), ``(N, C)``; 2-D outputs pass through
``energy``                 ``-logsumexp`` over the flattened raw output, ``(N,)``: the per-layer score of
                           Guglielmo & Masana, "Leveraging Intermediate Representations for Better OOD
                           Detection" (CVWW 2025): ``E(x) = -log sum_j exp(a_j(x))`` over every unit ``j``
                           of the layer
``flatten``                the output flattened, ``(N, C*H*W)``
``tokens_mean``            a token sequence ``(N, S, D)`` -> ``(N, D)``: ``(1/S) sum_s t[:, s]``, every
                           token, the class token included (ViT blocks; ValueError for another shape)
``cls_token``              a token sequence ``(N, S, D)`` -> ``(N, D)``: ``t[:, 0]``, the class token of a
                           ViT (Dosovitskiy et al., ICLR 2021), which its classifier reads
``channels_last_avgpool``  channels-last maps ``(N, H, W, C)`` (or ``(N, ..., C)``) -> ``(N, C)``: mean
                           over every dimension between the first and the last (Swin blocks, the
                           channels-last internals of ConvNeXt blocks)
=========================  ==========================================================================

Token sequences and channels-last maps: a transformer block's output is ``(N, S, D)`` (ViT) or ``(N, H, W, C)``
(Swin), which a channel reduction over the dimensions ``>= 2`` would misread (it would average each token over its
channels). A model declares such outputs with ``model.output_layout(module) -> "tokens" | "channels_last" | None``
(:class:`~ood_core.backbones.common.Backbone`; the ``torchvision:`` / ``timm:`` backbones of
:mod:`ood_core.backbones.by_name` read it from one probe forward pass), and ``avgpool`` / ``max`` then pool over
the positions of that layout: ``avgpool`` of a ViT block is ``tokens_mean``, of a Swin block
``channels_last_avgpool``. So the default ``LayerSpec(stage, stage)`` of every stage (``preset: blocks``) is one
``D``-vector per sample for CNNs and transformers alike. For a model that declares nothing (all the CNNs of
:mod:`ood_core.models`) ``avgpool`` / ``max`` are what they always were: columns and numbers do not change. The
layout is recorded in the column's Parquet metadata (``layout``). ``tokens_mean``, ``cls_token`` and
``channels_last_avgpool`` say the layout themselves and work on any model.

Column names (:attr:`LayerSpec.column`): ``name`` for the default reduction ``avgpool``, otherwise
``f"{name}.{reduction}"`` (``"logits"``, ``"penultimate"``, ``"layer1.0.bn1.energy"``), so one layer can be
read with several reductions in the same file.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import Tensor, nn

from .feature_store import FeatureWriter
from .storage import PathLike, resolve

__all__ = ["LayerSpec", "REDUCTIONS", "LAYOUTS", "DEFAULT_HOOK_TYPES", "reduce_output", "output_layout", "hookable_layers",
           "energy_layer_specs", "extract_features", "capture_batch"]

REDUCTIONS = ("none", "avgpool", "max", "energy", "flatten", "tokens_mean", "cls_token", "channels_last_avgpool")
LAYOUTS = ("tokens", "channels_last")
LOGITS = "logits"
PENULTIMATE = "penultimate"
DEFAULT_REDUCTION = "avgpool"
DEFAULT_HOOK_TYPES: Tuple[Type[nn.Module], ...] = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


@dataclass(frozen=True)
class LayerSpec:
    """What to read from the network: ``name`` (column stem), ``module`` (dotted path) and ``reduction``.

    ``name`` ``"logits"`` / ``"penultimate"`` take ``module=None``; any other name needs ``module``.
    """

    name: str
    module: Optional[str] = None
    reduction: str = DEFAULT_REDUCTION

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("LayerSpec.name must be a non-empty string")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"LayerSpec {self.name!r}: unknown reduction {self.reduction!r}; choose from {REDUCTIONS}")
        if self.name in (LOGITS, PENULTIMATE):
            if self.module is not None:
                raise ValueError(f"LayerSpec {self.name!r} reads the model itself; module must be None")
        elif not self.module:
            raise ValueError(f"LayerSpec {self.name!r} needs a module path (e.g. 'layer1.0.conv1')")

    @property
    def column(self) -> str:
        """Parquet column name: ``name`` for ``avgpool``, else ``"{name}.{reduction}"``."""
        return self.name if self.reduction == DEFAULT_REDUCTION else f"{self.name}.{self.reduction}"


def _position_dims(t: Tensor, layout: Optional[str]) -> Tuple[int, ...]:
    """The dimensions of ``t`` that index positions (pixels or tokens) in ``layout``."""
    if layout is None:
        return tuple(range(2, t.ndim))
    if layout == "tokens":
        if t.ndim != 3:
            raise ValueError(f"a token sequence (N, S, D) was expected, got shape {tuple(t.shape)}")
        return (1,)
    if layout == "channels_last":
        return tuple(range(1, t.ndim - 1))
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS} or None")


def reduce_output(t: Tensor, reduction: str, layout: Optional[str] = None) -> Tensor:
    """Apply ``reduction`` to a batch ``t`` of shape ``(N, ...)`` whose layout is ``layout`` (None: channels
    first; ``"tokens"``; ``"channels_last"``); see the module docstring."""
    if reduction == "none":
        return t
    if reduction in ("avgpool", "max"):
        if t.ndim <= 2:
            return t
        dims = _position_dims(t, layout)
        return t.mean(dim=dims) if reduction == "avgpool" else t.amax(dim=dims)
    if reduction in ("tokens_mean", "cls_token"):
        if t.ndim != 3:
            raise ValueError(f"reduction {reduction!r} reads a token sequence (N, S, D), got shape {tuple(t.shape)}: "
                             "use avgpool for (N, C, H, W) maps, channels_last_avgpool for (N, H, W, C)")
        return t.mean(dim=1) if reduction == "tokens_mean" else t[:, 0]
    if reduction == "channels_last_avgpool":
        if t.ndim < 3:
            raise ValueError(f"reduction 'channels_last_avgpool' reads (N, H, W, C) maps, got shape {tuple(t.shape)}")
        return t.mean(dim=tuple(range(1, t.ndim - 1)))
    flat = t.reshape(t.shape[0], -1)
    if reduction == "flatten":
        return flat
    if reduction == "energy":
        return -torch.logsumexp(flat.float(), dim=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def output_layout(model: nn.Module, module: str) -> Optional[str]:
    """The layout of ``module``'s output as ``model`` declares it (``model.output_layout``), None if it does not."""
    declare = getattr(model, "output_layout", None)
    return declare(module) if callable(declare) else None


def _capture(r: Tensor, src: Tensor) -> Tensor:
    """Detach ``r`` into a float32 CPU tensor that later in-place ops on ``src`` cannot change.

    On CUDA the copy is asynchronous (pinned memory); it is enqueued now, so it precedes any later
    in-place kernel on the same stream, and the caller synchronises before reading it.
    """
    r = r.detach()
    if r.dtype != torch.float32:
        r = r.float()
    if r.device.type == "cpu":
        if r.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            r = r.clone()
        return r.contiguous()
    return r.contiguous().to("cpu", non_blocking=True)


def _first_tensor(out: Any, where: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"{where} returned {type(out).__name__}, not a tensor; it cannot be hooked")


def _get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        known = [n for n, _ in model.named_modules() if n][:40]
        raise ValueError(f"model {type(model).__name__} has no module {path!r}; modules include {known}") from None


def hookable_layers(model: nn.Module, types: Tuple[Type[nn.Module], ...] = DEFAULT_HOOK_TYPES,
                    example_input: Optional[Tensor] = None) -> List[str]:
    """Names of the submodules of the given ``types``, in network order.

    With ``example_input`` the order is the execution order, found by a forward pass with hooks on
    every candidate (modules that never run are left out; a module called twice counts once, at
    its first call). Without it the order is registration order (``named_modules``), which equals
    execution order for the ``ood_core.models`` networks and torchvision ResNets/VGGs.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    if example_input is None:
        return [n for n, _ in candidates]
    order: "OrderedDict[str, None]" = OrderedDict()
    handles = []
    for name, module in candidates:
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: order.setdefault(name, None)))
    was_training = model.training
    try:
        model.eval()
        device = next((p.device for p in model.parameters()), example_input.device)
        with torch.inference_mode():
            model(example_input.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return list(order)


def energy_layer_specs(model: nn.Module, types: Tuple[Type[nn.Module], ...] = DEFAULT_HOOK_TYPES,
                       example_input: Optional[Tensor] = None) -> List[LayerSpec]:
    """One ``energy`` :class:`LayerSpec` per hookable layer, in network order (the LIR per-layer scores)."""
    return [LayerSpec(n, n, "energy") for n in hookable_layers(model, types, example_input)]


class _Hooks:
    """Registers the hooks for ``layers`` on ``model``; ``captured`` fills up during each forward pass."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerSpec]):
        self.captured: Dict[str, Tensor] = {}
        self.handles = []
        self.logit_specs = [s for s in layers if s.name == LOGITS]
        by_module: "OrderedDict[str, List[LayerSpec]]" = OrderedDict()
        pen = [s for s in layers if s.name == PENULTIMATE]
        for s in layers:
            if s.module is not None:
                by_module.setdefault(s.module, []).append(s)
        modules = {path: _get_module(model, path) for path in by_module}
        if pen:
            head = getattr(model, "head", None)
            if not isinstance(head, nn.Module):
                raise ValueError(f"'penultimate' needs model.head (the classifier); {type(model).__name__} has none")
        layouts = {path: output_layout(model, path) for path in by_module}
        try:
            for path, specs in by_module.items():
                self.handles.append(modules[path].register_forward_hook(self._make_hook(specs, path, layouts[path])))
            if pen:
                self.handles.append(model.head.register_forward_pre_hook(self._make_pre_hook(pen)))
        except BaseException:
            self.remove()
            raise

    def _store(self, specs: Sequence[LayerSpec], t: Tensor, layout: Optional[str] = None, where: str = "") -> None:
        for s in specs:
            if s.column not in self.captured:  # first call of a module reused within one forward wins
                try:
                    r = reduce_output(t, s.reduction, layout)
                except ValueError as exc:
                    raise ValueError(f"{where or s.name}: {exc}") from None
                self.captured[s.column] = _capture(r, t)

    def _make_hook(self, specs, path, layout):
        def hook(module, inputs, output):
            self._store(specs, _first_tensor(output, f"module {path!r}"), layout, f"module {path!r}")
        return hook

    def _make_pre_hook(self, specs):
        def pre_hook(module, args):
            self._store(specs, _first_tensor(args, "model.head input"))
        return pre_hook

    def finish(self, output: Any) -> Dict[str, Tensor]:
        if self.logit_specs:
            self._store(self.logit_specs, _first_tensor(output, "model forward"))
        out, self.captured = self.captured, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _check_layers(layers: Iterable[LayerSpec]) -> List[LayerSpec]:
    layers = list(layers)
    if not layers:
        raise ValueError("no layers to extract")
    cols = [s.column for s in layers]
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise ValueError(f"duplicate feature columns {dup}: give the LayerSpecs distinct names or reductions")
    bad = [c for c in cols if c in ("index", "label")]
    if bad:
        raise ValueError(f"column names {bad} are reserved")
    return layers


@torch.inference_mode()
def capture_batch(model: nn.Module, x: Tensor, layers: Sequence[LayerSpec]) -> Dict[str, Tensor]:
    """Run one batch through ``model`` (eval mode not forced) and return ``{column: float32 CPU tensor}``."""
    hooks = _Hooks(model, _check_layers(layers))
    try:
        out = hooks.finish(model(x))
    finally:
        hooks.remove()
    if x.device.type == "cuda":
        torch.cuda.current_stream(x.device).synchronize()
    return out


def column_widths(model: nn.Module, layers: Sequence[LayerSpec], input_shape: Tuple[int, ...]) -> Dict[str, int]:
    """Width of every extracted column (1 for a scalar reduction) from one forward pass of two blank
    inputs of ``input_shape`` ``(channels, height, width)``; ``"feature_maps"`` is the channel count of
    ``model.feature_maps`` where the model has it. What a sweep's plan checks detectors against before
    any training."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(2, *input_shape)
        out = capture_batch(model, x, layers)
        widths = {column: int(t.shape[1]) if t.ndim > 1 else 1 for column, t in out.items()}
        if hasattr(model, "feature_maps"):
            with torch.inference_mode():
                widths["feature_maps"] = int(model.feature_maps(x).shape[1])
    finally:
        model.train(was_training)
    return widths


def _split_batch(batch: Any) -> Tuple[Tensor, Any]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"loader must yield tensors or (x, y) pairs, got {type(batch).__name__}")


def _progress_callback(progress) -> Optional[Callable[[int], Any]]:
    if progress is None:
        return None
    if hasattr(progress, "update"):
        return progress.update
    if callable(progress):
        return progress
    raise TypeError("progress must be a callable(n) or an object with update(n) (e.g. tqdm)")


def extract_features(model: nn.Module, loader: Iterable, layers: Sequence[LayerSpec], uri: PathLike, *,
                     metadata: Optional[Mapping[str, str]] = None, device: Union[str, torch.device, None] = None,
                     progress=None, amp: bool = False, writer_options: Optional[Mapping[str, Any]] = None,
                     index_start: int = 0) -> Dict[str, Any]:
    """Run ``model`` over ``loader`` and write the ``layers`` of every sample to the Parquet file ``uri``.

    ``loader`` yields ``(x, y)`` (or ``x`` alone: labels are then ``-1``); the ``index`` column is the
    running sample position in loader order, from ``index_start`` (a shard of a data set: the position of its
    first sample, so that :func:`~ood_core.feature_store.merge_feature_files` joins the shards). The model is moved to ``device`` (default: where its
    parameters are) and run in eval mode under ``torch.inference_mode`` (its training flag is restored
    afterwards); inputs are copied with ``non_blocking=True``; ``amp=True`` enables float16 autocast on
    CUDA (ignored elsewhere; captured values are float32 either way). Batches are streamed to a
    :class:`~ood_core.feature_store.FeatureWriter` whose background thread encodes batch *k* while
    batch *k+1* runs; on CUDA the device-to-host copies are asynchronous and the writer thread waits on
    a CUDA event. ``metadata`` goes into the schema metadata (``ood_sweep.`` prefix added) with
    ``layers`` (JSON). Hooks are removed afterwards, also on error, and a failed run leaves no file.

    ``progress``: a callable ``f(n)`` or a tqdm-like object, called with each batch's sample count.
    Returns ``{"n", "batches", "seconds", "samples_per_s", "columns", "uri", "bytes"}``.
    """
    layers = _check_layers(layers)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    tick = _progress_callback(progress)
    meta = dict(metadata or {})
    meta["layers"] = json.dumps([dict(asdict(s), column=s.column) for s in layers])
    meta.setdefault("model_class", type(model).__name__)
    column_meta = {s.column: {"layer": s.module or s.name, "reduction": s.reduction, "name": s.name} for s in layers}
    for s in layers:
        layout = output_layout(model, s.module) if s.module else None
        if layout is not None:
            column_meta[s.column]["layout"] = layout
    use_cuda = device.type == "cuda"
    autocast = (torch.autocast(device_type="cuda", dtype=torch.float16) if (amp and use_cuda)
                else contextlib.nullcontext())
    was_training = model.training
    model.to(device)
    model.eval()
    hooks = _Hooks(model, layers)
    n = batches = 0
    first = int(index_start)
    start = time.perf_counter()
    try:
        with FeatureWriter(uri, meta, column_meta, **dict(writer_options or {})) as writer, torch.inference_mode():
            for batch in loader:
                x, y = _split_batch(batch)
                bs = int(x.shape[0])
                x = x.to(device, non_blocking=True)
                with autocast:
                    out = model(x)
                cols = hooks.finish(out)
                if len(cols) != len(layers):
                    missing = [s.column for s in layers if s.column not in cols]
                    raise RuntimeError(f"no output captured for {missing}: the module did not run in forward()")
                ready = None
                if use_cuda:
                    event = torch.cuda.Event()
                    event.record()
                    ready = event.synchronize
                labels = (np.full(bs, -1, dtype=np.int64) if y is None
                          else torch.as_tensor(y).reshape(-1).cpu().numpy().astype(np.int64, copy=False))
                writer.write(np.arange(first + n, first + n + bs, dtype=np.int64), labels,
                             {s.column: cols[s.column].numpy() for s in layers}, ready=ready)
                n += bs
                batches += 1
                if tick is not None:
                    tick(bs)
    finally:
        hooks.remove()
        model.train(was_training)
    seconds = time.perf_counter() - start
    fs, path = resolve(uri)
    return {"n": n, "batches": batches, "seconds": seconds, "samples_per_s": n / seconds if seconds > 0 else float("inf"),
            "columns": [s.column for s in layers], "uri": str(uri), "bytes": fs.get_file_info(path).size}


LAYER_PRESETS = ("penultimate", "blocks", "all")


def select_layers(model: nn.Module, *, preset: Optional[str] = None, types: Optional[Sequence[str]] = None,
                  pattern: Optional[str] = None, example_input: Optional[Tensor] = None) -> List[str]:
    """Module names chosen by a preset, by module type names, or by a glob pattern, in network order.

    * ``preset="all"``: every Conv2d / BatchNorm2d / Linear layer (the layers Guglielmo & Masana, CVWW 2025, analyse);
    * ``preset="blocks"``: the model's main stages (``model.stages`` when it declares them, else the
      top-level children that contain a convolution);
    * ``preset="penultimate"``: the module whose output the classifier head reads (``model.stages[-1]``);
    * ``types=["Conv2d", ...]``: modules whose class name is listed;
    * ``pattern="layer*.conv1"``: modules whose dotted name matches the glob (:mod:`fnmatch`).
    """
    import fnmatch

    if preset is not None:
        if preset not in LAYER_PRESETS:
            raise ValueError(f"unknown layer preset {preset!r}; choose from {LAYER_PRESETS}")
        if preset == "all":
            return hookable_layers(model, DEFAULT_HOOK_TYPES, example_input)
        stages = list(getattr(model, "stages", None) or [])
        if not stages:
            stages = [n for n, m in model.named_children()
                      if any(isinstance(s, nn.Conv2d) for s in m.modules())]
        return stages[-1:] if preset == "penultimate" else stages
    names = [n for n, m in model.named_modules() if n]
    modules = dict(model.named_modules())
    if types is not None:
        wanted = set(types)
        names = [n for n in names if type(modules[n]).__name__ in wanted]
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names
