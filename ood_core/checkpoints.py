"""Backbone checkpoints: one file holding the ``state_dict`` and a JSON-like ``meta`` dict.

The file is ``torch.save({"format": "ood-sweep-checkpoint", "version": 1, "state_dict": ...,
"meta": ...})`` written atomically through :func:`ood_core.storage.atomic_output` (local
path or any ``pyarrow.fs`` URI). :func:`save_checkpoint` returns the sha256 of the bytes
written, which callers record (content addressing, cache keys) and pass back to
:func:`load_checkpoint` to verify the file. Loading uses ``torch.load(weights_only=True)``
so a checkpoint cannot run code. Every problem a user can cause (missing file, corrupt or
foreign file, hash mismatch, checkpoint of another architecture) raises
:class:`CheckpointError` with a message naming the file.

:func:`load_user_checkpoint` loads a checkpoint a user brings (ours, or a plain ``state_dict``
as OpenOOD, torchvision and most training scripts save it, possibly wrapped in
``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"net": ...}``, with ``module.`` prefixes from
``DataParallel`` and ``fc.`` / ``linear.`` / ``classifier.`` naming the classifier, and the prefixes a model
declares in its ``checkpoint_aliases``, e.g. a ``torchvision:`` / ``timm:`` backbone's ``classifier.3.`` -> ``head.``)
into a built model, strictly, and returns the file's sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ood_core import storage
from ood_core.errors import UserCausedError

FORMAT = "ood-sweep-checkpoint"
VERSION = 1


class CheckpointError(UserCausedError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the model."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cpu_state(model: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def checkpoint_bytes(model: Union[nn.Module, Mapping[str, torch.Tensor]], meta: Dict[str, Any]) -> bytes:
    """The exact bytes :func:`save_checkpoint` writes (deterministic for equal inputs)."""
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint meta must be JSON-like (dict of str, numbers, lists, dicts): {exc}") from None
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "state_dict": _cpu_state(model), "meta": dict(meta)}, buf)
    return buf.getvalue()


def save_checkpoint(uri: str, model: Union[nn.Module, Mapping[str, torch.Tensor]], meta: Dict[str, Any], *,
                    record_hash: bool = False) -> str:
    """Write ``model``'s state dict (on CPU) and ``meta`` to ``uri`` atomically; return the
    sha256 hex digest of the file's bytes. With ``record_hash`` the digest is also recorded in
    ``<uri>.sha256`` (a cached checkpoint, checked on reuse by :func:`ood_core.storage.verify_cached`)."""
    data = checkpoint_bytes(model, meta)
    with storage.atomic_output(uri, record_hash=record_hash) as out:
        out.write(data)
    return sha256_bytes(data)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")


def _torch_load(data: bytes, uri: str) -> Any:
    """``torch.load(weights_only=True)`` of ``data``; every failure becomes a one-line :class:`CheckpointError`.

    torch refuses a pickled Python object with ``pickle.UnpicklingError`` ("Weights only load failed ...";
    torch >= 2.6) whose text names the refused ``GLOBAL module.Name`` ("Unsupported global: GLOBAL
    __main__.Net was not an allowed global", or "Trying to load unsupported GLOBAL posix.system whose
    module posix is blocked"); the wording changes between releases, so the type, the "weights only"
    phrase and the ``GLOBAL`` name are what is matched, never a whole sentence.
    """
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every way a file can fail to load is the user's file
        text = _ANSI.sub("", str(exc))
        refused = _GLOBAL.search(text)
        if isinstance(exc, pickle.UnpicklingError) and refused and (
                "weights only" in text.lower() or "weights_only" in text or "WeightsUnpickler" in text):
            raise CheckpointError(
                f"checkpoint {uri} holds a pickled Python object ({refused.group(1)}), which weights-only "
                "loading refuses: save model.state_dict() (tensors only) instead") from exc
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        detail = next((l for l in lines if l.startswith("Unsupported") or "load key" in l or "zip" in l.lower()),
                      lines[0] if lines else "")
        raise CheckpointError(f"checkpoint {uri} is corrupt or not a weights-only torch file: "
                              f"{type(exc).__name__}: {detail[:200]}") from exc


def _read(uri: str) -> bytes:
    try:
        if not storage.exists(uri):
            raise CheckpointError(f"checkpoint not found: {uri}")
        fs, path = storage.resolve(uri)
        with fs.open_input_stream(path) as f:
            return f.readall()
    except CheckpointError:
        raise
    except Exception as exc:  # pyarrow raises OSError / ArrowException subclasses
        raise CheckpointError(f"cannot read checkpoint {uri}: {exc}") from exc


def load_checkpoint(uri: str, expected_sha256: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; return ``(state_dict, meta)``
    with all tensors on CPU. With ``expected_sha256`` the file's bytes must hash to it."""
    data = _read(uri)
    if expected_sha256 is not None:
        actual = sha256_bytes(data)
        if actual != expected_sha256.lower():
            raise CheckpointError(f"checkpoint {uri} has sha256 {actual}, expected {expected_sha256} "
                                  "(the file changed since it was recorded)")
    payload = _torch_load(data, uri)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{uri} is not an ood-sweep checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {uri} has format version {payload.get('version')}, "
                              f"this ood-sweep reads version {VERSION}")
    state, meta = payload.get("state_dict"), payload.get("meta")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()) \
            or not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {uri} is malformed (state_dict / meta missing)")
    return state, meta


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly; raise :class:`CheckpointError` listing
    missing / unexpected keys and shape mismatches (``source`` names the file in messages)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__} "
                              f"(wrong architecture or parameters?): " + "; ".join(parts))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {exc}") from exc
    return model


# ---------------------------------------------------------------------------------------
# checkpoints users bring

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state", "weights")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_HEAD_ALIASES = ("fc.", "linear.", "classifier.", "heads.head.")  # heads.head: torchvision's ViT
#: other foreign module names -> ours: torchvision's Swin ``features`` is ``body`` in ood_core (``features`` is a method)
_MODULE_ALIASES = (("features.", "body."),)


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items())


def _unwrap(payload: Any, uri: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        state, meta = payload.get("state_dict"), payload.get("meta")
        if not _tensor_dict(state) or not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {uri} is malformed (state_dict / meta missing)")
        return state, meta
    if _tensor_dict(payload):
        return payload, {}
    if isinstance(payload, dict):
        for key in _WRAPPER_KEYS:
            if _tensor_dict(payload.get(key)):
                return payload[key], {}
    raise CheckpointError(f"{uri} holds no state dict (expected a dict of tensors, or one under "
                          f"{', '.join(_WRAPPER_KEYS)})")


def _rename(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
            model_aliases: Tuple[Tuple[str, str], ...] = ()) -> Dict[str, torch.Tensor]:
    """Map foreign key names onto the model's: strip DataParallel / compile prefixes, name the
    classifier ``head`` (``fc`` / ``linear`` / ``classifier`` / torchvision ViT's ``heads.head``), map
    :data:`_MODULE_ALIASES` and the model's own ``model_aliases`` (its ``checkpoint_aliases``: ``(theirs, ours)``
    prefixes, e.g. ``("classifier.3.", "head.")`` of a ``torchvision:`` / ``timm:`` backbone), fill missing
    batch-norm ``num_batches_tracked`` counters. A key is only renamed when its own name is not the model's and
    the new name is, so a checkpoint that does not fit still fails with the keys that differ."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed and k not in own:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        if k not in own:
            for theirs, mine in model_aliases:
                if k.startswith(theirs) and mine + k[len(theirs):] in own:
                    k = mine + k[len(theirs):]
                    break
        if k not in own:
            for alias in _HEAD_ALIASES:
                if k.startswith(alias) and "head." + k[len(alias):] in own:
                    k = "head." + k[len(alias):]
                    break
        if k not in own:
            for theirs, mine in _MODULE_ALIASES:
                if k.startswith(theirs) and mine + k[len(theirs):] in own:
                    k = mine + k[len(theirs):]
                    break
        out[k] = value
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in out:
            out[k] = torch.zeros_like(v)
    return out


def load_user_checkpoint(uri: str, model: nn.Module, *, arch: Optional[str] = None,
                         expected_sha256: Optional[str] = None) -> Dict[str, Any]:
    """Load the checkpoint at ``uri`` (a path or URI) into ``model`` strictly.

    Accepts our format and plain state dicts (see the module docstring); reads with
    ``torch.load(weights_only=True)``. With ``arch``, an ood-sweep checkpoint of another
    architecture is refused. Returns ``{"sha256", "format": "ood-sweep" | "state_dict", "meta"}``.
    Raises :class:`CheckpointError` for a missing, unreadable, corrupt, pickled-object or
    mismatched (architecture, class count) checkpoint, or a sha256 other than ``expected_sha256``.
    """
    data = _read(uri)
    sha = sha256_bytes(data)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise CheckpointError(f"checkpoint {uri} has sha256 {sha}, expected {expected_sha256}")
    payload = _torch_load(data, uri)
    state, meta = _unwrap(payload, uri)
    fmt = "ood-sweep" if meta or (isinstance(payload, dict) and payload.get("format") == FORMAT) else "state_dict"
    if arch is not None and meta.get("arch") not in (None, arch):
        raise CheckpointError(f"checkpoint {uri} is an ood-sweep checkpoint of {meta.get('arch')!r}, "
                              f"not of {arch!r}")
    aliases = tuple(getattr(model, "checkpoint_aliases", ()))
    load_into(model, _rename(state, model.state_dict(), aliases), source=f"checkpoint {uri}")
    return {"sha256": sha, "format": fmt, "meta": meta}


# ---------------------------------------------------------------------------------------
# the classifier head, for head-based detectors

_HEAD_NAMES = ("head", "fc", "linear", "classifier")


def load_head(uri: str, expected_sha256: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The final linear layer ``(w (C, D), b (C,))`` of the checkpoint at ``uri`` (path or URI), on CPU in float32.

    What ReAct, ViM, DICE, ASH, SCALE and the other head-based detectors take as ``head=``:
    ``ReAct(head=load_head(path))``.
    Only the state dict is read (weights-only loading, no model built): ``head.weight`` / ``head.bias`` of an
    ood-sweep checkpoint, or ``fc.`` / ``linear.`` / ``classifier.`` of a plain state dict (``module.`` prefixes
    stripped, as :func:`load_user_checkpoint` does). A bias-free head gives zeros for ``b``. Raises
    :class:`CheckpointError` (one line naming the file) for a missing or corrupt file, a sha256 other than
    ``expected_sha256``, no such layer, or a head whose class count differs from the ``num_classes`` the
    checkpoint's meta records.
    """
    data = _read(uri)
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256.lower():
        raise CheckpointError(f"checkpoint {uri} has sha256 {sha256_bytes(data)}, expected {expected_sha256}")
    state, meta = _unwrap(_torch_load(data, uri), uri)
    plain = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        plain[key] = value
    name = next((n for n in _HEAD_NAMES if f"{n}.weight" in plain), None)
    if name is None:
        raise CheckpointError(f"checkpoint {uri} has no classifier head (none of "
                              f"{', '.join(n + '.weight' for n in _HEAD_NAMES)}); pass head=(w, b) yourself")
    w = plain[f"{name}.weight"]
    if w.ndim != 2:
        raise CheckpointError(f"checkpoint {uri}: {name}.weight has shape {tuple(w.shape)}, not (classes, features) "
                              "of a linear layer")
    b = plain.get(f"{name}.bias")
    if b is None:
        b = torch.zeros(w.shape[0])
    if tuple(b.shape) != (w.shape[0],):
        raise CheckpointError(f"checkpoint {uri}: {name}.bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
    classes = meta.get("num_classes")
    if isinstance(classes, int) and classes != w.shape[0]:
        raise CheckpointError(f"checkpoint {uri}: its head has {w.shape[0]} classes, its meta says {classes}")
    return w.detach().float().clone(), b.detach().float().clone()
