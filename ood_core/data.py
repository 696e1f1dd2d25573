"""Data sets for ood-sweep, returned as torch ``TensorDataset`` of ``(x, y)``.

``x`` is float32 ``(C, H, W)`` already in the *ID input format* of the backbone
(:class:`InputFormat`: channel count, square image size, per-channel mean / std), ``y`` is
int64 (``-1`` for unlabelled sets). Every builder produces pixels in ``[0, 1]`` and then
calls :func:`to_format`, which converts channels (gray -> RGB by repetition, RGB -> gray by
ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``), resizes to ``fmt.image_size`` (bilinear,
antialiased when downsampling) and normalises ``(x - mean) / std``.

Data sets are registered in :data:`DATASETS` as :class:`DatasetEntry`; a builder has the
keyword-only signature ``build(*, split, fmt, seed, **params)`` (the orchestrator checks
YAML parameters against ``inspect.signature(build)``). Splits are ``"train"``, ``"val"``,
``"test"``; for a given ``seed`` they are deterministic and pairwise disjoint.

Quickstart sets (offline, shipped with scikit-learn):

* ``digits``: the 1,797 8x8 UCI digits, stratified per class into train/val/test by
  ``fractions``; optional ``classes`` filter with labels remapped to their position in
  ``classes`` (each class is split with its own random stream, so the split of a class does
  not depend on which other classes are selected: ``classes=[0..4]`` as ID and
  ``classes=[5..9]`` as near-OOD never share an image).
* ``gaussian_noise`` (N(mean 0.5, std 0.25) clipped to [0, 1]) and ``uniform_noise``
  (U[0, 1]): ``n`` images per split, each split from its own random stream.
* ``sklearn_photos``: non-overlapping ``patch`` x ``patch`` tiles of the two sample photos
  (china.jpg, flower.jpg), shuffled by ``seed`` and split by ``fractions``.

Real data sets (CIFAR, SVHN, ...) are added by registering further entries with
:func:`register`.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

SPLITS: Tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: Tuple[float, float, float] = (0.6, 0.15, 0.25)
#: ITU-R BT.601 luma weights for RGB -> grayscale
LUMA_601: Tuple[float, float, float] = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class InputFormat:
    """What the backbone expects: ``channels`` (1 or 3), square ``image_size``, and the
    per-channel ``mean`` / ``std`` used for ``(x - mean) / std`` on pixels in [0, 1]."""

    channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __post_init__(self) -> None:
        # accept lists (from YAML / JSON) but store tuples so the format stays hashable
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.channels not in (1, 3):
            raise ValueError(f"InputFormat.channels must be 1 or 3, got {self.channels}")
        if int(self.image_size) != self.image_size or self.image_size < 1:
            raise ValueError(f"InputFormat.image_size must be a positive integer, got {self.image_size}")
        object.__setattr__(self, "channels", int(self.channels))
        object.__setattr__(self, "image_size", int(self.image_size))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"InputFormat.mean/std need one value per channel ({self.channels}), "
                f"got mean={self.mean}, std={self.std}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise ValueError(f"InputFormat.std must be positive, got {self.std}")

    def to_dict(self) -> Dict[str, Any]:
        return {"channels": self.channels, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set. ``build(*, split, fmt, seed, **params) -> Dataset``.

    ``default_format`` is the natural input format for a backbone trained on this set
    (None for sets that are only used as OOD data). Bump ``version`` when the builder's
    output changes, so cache keys built from :func:`dataset_fingerprint` change too.
    """

    name: str
    build: Callable[..., Dataset]
    labelled: bool
    description: str
    default_format: Optional[InputFormat] = None
    version: int = 1


DATASETS: Dict[str, DatasetEntry] = {}


def register(entry: DatasetEntry) -> DatasetEntry:
    """Add ``entry`` to :data:`DATASETS` (a name may be registered once)."""
    if entry.name in DATASETS:
        raise ValueError(f"dataset {entry.name!r} is already registered")
    DATASETS[entry.name] = entry
    return entry


def _entry(name: str) -> DatasetEntry:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known data sets: {', '.join(sorted(DATASETS))}") from None


def _bind(entry: DatasetEntry, split: str, fmt: InputFormat, seed: int,
          params: Dict[str, Any]) -> Dict[str, Any]:
    """Check split / fmt / params against the builder; return all params with defaults."""
    if split not in SPLITS:
        raise ValueError(f"dataset {entry.name!r}: unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(fmt, InputFormat):
        raise TypeError(f"dataset {entry.name!r}: fmt must be an InputFormat, got {type(fmt).__name__}")
    sig = inspect.signature(entry.build)
    allowed = [p for p in sig.parameters if p not in ("split", "fmt", "seed")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"dataset {entry.name!r}: unknown parameter(s) {unknown}; "
                         f"allowed: {allowed or 'none'}")
    bound = sig.bind(split=split, fmt=fmt, seed=int(seed), **params)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in ("split", "fmt", "seed")}


def load_dataset(name: str, *, split: str, fmt: InputFormat, seed: int, **params: Any) -> Dataset:
    """Build data set ``name`` (split ``split``) in input format ``fmt``.

    Raises ``KeyError`` for an unknown name and ``ValueError`` for a bad split, an unknown
    parameter or an invalid parameter value; the messages name the data set.
    """
    entry = _entry(name)
    _bind(entry, split, fmt, seed, params)
    return entry.build(split=split, fmt=fmt, seed=int(seed), **params)


def _jsonable(v: Any) -> Any:
    if isinstance(v, InputFormat):
        return v.to_dict()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def dataset_fingerprint(name: str, split: str, fmt: InputFormat, seed: int, **params: Any) -> Dict[str, Any]:
    """JSON-able description of exactly what :func:`load_dataset` would return (defaults
    filled in, so explicit defaults and omitted ones give the same cache key)."""
    entry = _entry(name)
    full = _bind(entry, split, fmt, seed, params)
    return {"dataset": name, "version": entry.version, "split": split, "seed": int(seed),
            "format": fmt.to_dict(), "params": _jsonable(full)}


# ---------------------------------------------------------------------------------------
# conversion to the ID input format


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` to ``size`` x ``size`` (antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < x.shape[-2] or size < x.shape[-1]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """RGB ``(N, 3, H, W)`` -> luma ``(N, 1, H, W)`` with the ITU-R 601 weights."""
    w = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def to_format(x: torch.Tensor, fmt: InputFormat) -> torch.Tensor:
    """Convert pixels in [0, 1], ``(N, C, H, W)`` with C in {1, 3}, to ``fmt``: channels,
    then size, then ``(x - mean) / std``. Returns contiguous float32."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1|3, H, W), got shape {tuple(x.shape)}")
    x = x.float()
    if x.shape[1] == 1 and fmt.channels == 3:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 3 and fmt.channels == 1:
        x = to_gray(x)
    x = resize(x, fmt.image_size)
    mean = torch.tensor(fmt.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(fmt.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _tensor_dataset(x01: torch.Tensor, y: torch.Tensor, fmt: InputFormat) -> TensorDataset:
    return TensorDataset(to_format(x01, fmt), y.to(torch.int64))


# ---------------------------------------------------------------------------------------
# splitting helpers


def _check_fractions(name: str, fractions: Sequence[float]) -> Tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"dataset {name!r}: fractions must be three numbers, got {fractions!r}") from None
    if len(fr) != 3 or any(not (0 <= f <= 1) for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"dataset {name!r}: fractions (train, val, test) must be three numbers "
                         f"in [0, 1] summing to 1, got {list(fractions)}")
    return fr  # type: ignore[return-value]


def _split_bounds(n: int, fractions: Tuple[float, float, float]) -> Tuple[int, int]:
    """Cut points of ``n`` shuffled items: [0, a) train, [a, b) val, [b, n) test."""
    a = int(round(fractions[0] * n))
    b = min(n, a + int(round(fractions[1] * n)))
    return a, b


def _take_split(perm: np.ndarray, split: str, fractions: Tuple[float, float, float]) -> np.ndarray:
    a, b = _split_bounds(len(perm), fractions)
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}[split]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent random stream ``stream`` for ``seed`` (numpy SeedSequence spawn keys)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(stream)))


# ---------------------------------------------------------------------------------------
# quickstart sets (scikit-learn)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    images.setflags(write=False)
    target = d.target.astype(np.int64)
    target.setflags(write=False)
    return images, target


def build_digits(*, split: str, fmt: InputFormat, seed: int,
                 classes: Optional[Sequence[int]] = None,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS) -> TensorDataset:
    """scikit-learn digits (8x8, 10 classes), stratified split; labels = position in ``classes``."""
    fr = _check_fractions("digits", fractions)
    if classes is None:
        classes = list(range(10))
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes) or any(c < 0 or c > 9 for c in classes):
        raise ValueError(f"dataset 'digits': classes must be distinct integers in 0..9, got {classes}")
    images, target = _digits_raw()
    idx, labels = [], []
    for pos, c in enumerate(classes):
        members = np.flatnonzero(target == c)
        chosen = _take_split(members[_rng(seed, 0, c).permutation(len(members))], split, fr)
        idx.append(np.sort(chosen))
        labels.append(np.full(len(chosen), pos, dtype=np.int64))
    order = np.concatenate(idx)
    x = torch.from_numpy(images[order].copy())
    return _tensor_dataset(x, torch.from_numpy(np.concatenate(labels)), fmt)


def _noise(kind: int, split: str, fmt: InputFormat, seed: int, n: int) -> TensorDataset:
    if int(n) != n or n < 1:
        raise ValueError(f"noise data sets: n must be a positive integer, got {n}")
    rng = _rng(seed, 1, kind, SPLITS.index(split))  # disjoint stream per (kind, split)
    shape = (int(n), fmt.channels, fmt.image_size, fmt.image_size)
    if kind == 0:
        x = np.clip(rng.normal(0.5, 0.25, size=shape), 0.0, 1.0)
    else:
        x = rng.uniform(0.0, 1.0, size=shape)
    return _tensor_dataset(torch.from_numpy(x.astype(np.float32)), torch.full((int(n),), -1), fmt)


def build_gaussian_noise(*, split: str, fmt: InputFormat, seed: int, n: int = 500) -> TensorDataset:
    """``n`` images of i.i.d. N(mean 0.5, std 0.25) pixels clipped to [0, 1], unlabelled."""
    return _noise(0, split, fmt, seed, n)


def build_uniform_noise(*, split: str, fmt: InputFormat, seed: int, n: int = 500) -> TensorDataset:
    """``n`` images of i.i.d. U[0, 1] pixels, unlabelled."""
    return _noise(1, split, fmt, seed, n)


@functools.lru_cache(maxsize=4)
def _photo_tiles(patch: int) -> np.ndarray:
    """All non-overlapping ``patch`` tiles (row-major, photo by photo), uint8 (N, 3, p, p)."""
    from sklearn.datasets import load_sample_images

    tiles = []
    for img in load_sample_images().images:  # (427, 640, 3) uint8 each
        h, w = img.shape[0] // patch, img.shape[1] // patch
        t = img[: h * patch, : w * patch].reshape(h, patch, w, patch, 3)
        tiles.append(t.transpose(0, 2, 4, 1, 3).reshape(h * w, 3, patch, patch))
    out = np.concatenate(tiles)
    out.setflags(write=False)
    return out


def build_sklearn_photos(*, split: str, fmt: InputFormat, seed: int, patch: int = 32,
                         fractions: Sequence[float] = DEFAULT_FRACTIONS) -> TensorDataset:
    """Non-overlapping ``patch`` tiles of scikit-learn's two sample photos, unlabelled."""
    fr = _check_fractions("sklearn_photos", fractions)
    if int(patch) != patch or not 2 <= patch <= 427:
        raise ValueError(f"dataset 'sklearn_photos': patch must be an integer in 2..427, got {patch}")
    tiles = _photo_tiles(int(patch))
    chosen = _take_split(_rng(seed, 2).permutation(len(tiles)), split, fr)
    x = torch.from_numpy(tiles[chosen].astype(np.float32) / 255.0)
    return _tensor_dataset(x, torch.full((len(chosen),), -1), fmt)


# mean / std of all 1,797 digits after /16 and bilinear upsampling 8x8 -> 16x16 (the
# `resize` above), computed once with torch in float64: mean 0.30526, std 0.31895.
DIGITS_FORMAT = InputFormat(channels=1, image_size=16, mean=(0.3053,), std=(0.3189,))

register(DatasetEntry("digits", build_digits, labelled=True,
                      description="scikit-learn 8x8 handwritten digits (1,797 images, 10 classes)",
                      default_format=DIGITS_FORMAT))
register(DatasetEntry("gaussian_noise", build_gaussian_noise, labelled=False,
                      description="i.i.d. Gaussian pixel noise, mean 0.5, std 0.25, clipped to [0, 1]"))
register(DatasetEntry("uniform_noise", build_uniform_noise, labelled=False,
                      description="i.i.d. uniform pixel noise in [0, 1]"))
register(DatasetEntry("sklearn_photos", build_sklearn_photos, labelled=False,
                      description="non-overlapping tiles of scikit-learn's two sample photos"))
