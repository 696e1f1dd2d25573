"""Building blocks of the data-set registry: input format, registry entry, conversion to the ID
format, split helpers, lazy data sets, the data root and the "data set missing" error.

Pixels are produced in ``[0, 1]`` and converted by :func:`to_format` to the ID input format:
channels (gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``),
size (bilinear, antialiased when shrinking) and ``(x - mean) / std``.

Large sets are *lazy*: :class:`ArrayImageDataset` keeps the raw ``uint8`` pixels (CIFAR, SVHN,
MNIST...) and converts on access, a whole batch at a time through ``__getitems__`` (which
:class:`torch.utils.data.DataLoader` uses); :class:`FileImageDataset` keeps file paths and decodes
one image per access (Textures, Places365, TinyImageNet, image folders).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ood_core.errors import UserCausedError

SPLITS: Tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: Tuple[float, float, float] = (0.6, 0.15, 0.25)
#: ITU-R BT.601 luma weights for RGB -> grayscale
LUMA_601: Tuple[float, float, float] = (0.299, 0.587, 0.114)
#: environment variable naming the default data root
DATA_ENV = "OOD_SWEEP_DATA"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# The errors below are user-caused (ood_core.errors.UserCausedError: one line, exit 2 from the command line).
# Each can also be built from its message alone, as torch's DataLoader rebuilds an error raised in a worker
# process (``cls(message)``), and pickles its own arguments, as Ray ships an error raised in a task.


class DataMissingError(UserCausedError, FileNotFoundError):
    """A data set is not on disk (and cannot be fetched). ``str(exc)`` is one line naming the data
    set, the path that was searched and how to provide it."""

    def __init__(self, dataset: str, searched: Any = None, hint: Optional[str] = None):
        self.dataset, self.searched, self.hint = dataset, None if searched is None else str(searched), hint
        if searched is None and hint is None:  # the message alone
            self._message = str(dataset)
        else:
            self._message = f"data set {dataset!r} not found (searched {self.searched}); {hint}"
        super().__init__(self._message)

    def __str__(self) -> str:
        return self._message

    def __reduce__(self):
        return (type(self), (self.dataset, self.searched, self.hint))


class DatasetParamError(UserCausedError, ValueError):
    """A data-set parameter has a value the data set cannot use; ``param`` names it (``classes``), so
    the orchestrator can name the field (``data.id.params.classes: ...``)."""

    def __init__(self, param: str, message: Optional[str] = None):
        if message is None:  # the message alone
            param, message = None, param
        self.param = param
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.param, str(self)))


class DataFileError(UserCausedError, ValueError):
    """A data file is there but is not what its data set needs (damaged, another format); the message
    names the file."""


class ImageReadError(UserCausedError, OSError):
    """An image file cannot be decoded (damaged, not an image, too large); the message names the file."""

    def __init__(self, path: Any, reason: Optional[str] = None):
        self.path, self.reason = str(path), reason
        self._message = self.path if reason is None else f"cannot read image {self.path}: {reason}"
        super().__init__(self._message)

    def __str__(self) -> str:  # OSError would format (errno, strerror) pairs
        return self._message

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


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

    ``default_format`` is the natural input format for a backbone trained on this set (None for
    sets that are only used as OOD data). ``num_classes`` is the static class count of a labelled
    set (None when it depends on the files, e.g. an image folder). ``check(*, split, fetch, **params)``
    raises :class:`DataMissingError` when the files are missing (fetching them first when the set
    is ``downloadable``, ``download=True`` and ``fetch``); None for sets that need no files.
    ``split_params`` name the parameters that decide which images fall in which split: a set used
    both as OOD validation and OOD test data is only guaranteed disjoint when they agree.
    Bump ``version`` when the builder's output changes (cache keys use it).
    """

    name: str
    build: Callable[..., Dataset]
    labelled: bool
    description: str
    default_format: Optional[InputFormat] = None
    version: int = 1
    num_classes: Optional[int] = None
    check: Optional[Callable[..., None]] = None
    downloadable: bool = False
    split_params: Tuple[str, ...] = ()


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


def tensor_dataset(x01: torch.Tensor, y: torch.Tensor, fmt: InputFormat) -> TensorDataset:
    return TensorDataset(to_format(x01, fmt), y.to(torch.int64))


# ---------------------------------------------------------------------------------------
# splitting helpers


def rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent random stream ``stream`` for ``seed`` (numpy SeedSequence spawn keys)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(s) for s in stream)))


def check_fractions(name: str, fractions: Sequence[float]) -> Tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise DatasetParamError("fractions", f"dataset {name!r}: fractions must be three numbers, got {fractions!r}") from None
    if len(fr) != 3 or any(not (0 <= f <= 1) for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise DatasetParamError("fractions", f"dataset {name!r}: fractions (train, val, test) must be three numbers "
                         f"in [0, 1] summing to 1, got {list(fractions)}")
    return fr  # type: ignore[return-value]


def split_bounds(n: int, fractions: Tuple[float, float, float]) -> Tuple[int, int]:
    """Cut points of ``n`` shuffled items: [0, a) train, [a, b) val, [b, n) test."""
    a = int(round(fractions[0] * n))
    b = min(n, a + int(round(fractions[1] * n)))
    return a, b


def take_split(perm: np.ndarray, split: str, fractions: Tuple[float, float, float]) -> np.ndarray:
    a, b = split_bounds(len(perm), fractions)
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}[split]


def check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"dataset {name!r}: unknown split {split!r}; expected one of {SPLITS}")


def check_count(name: str, key: str, value: Any, *, allow_none: bool = False, minimum: int = 0) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or int(value) != value \
            or value < minimum:
        raise DatasetParamError(key, f"dataset {name!r}: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def stratified_holdout(labels: np.ndarray, size: int, seed: int, stream: int) -> np.ndarray:
    """Boolean mask choosing ``size`` items, stratified by ``labels`` (largest-remainder quotas;
    each class drawn from its own random stream, so the choice for one class does not depend on
    the others). Labels < 0 count as one class."""
    labels = np.asarray(labels)
    n = len(labels)
    mask = np.zeros(n, dtype=bool)
    if size <= 0 or n == 0:
        return mask
    if size >= n:
        mask[:] = True
        return mask
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / n
    quota = np.floor(exact).astype(np.int64)
    rest = size - int(quota.sum())
    if rest:
        order = np.lexsort((classes, -(exact - quota)))  # largest remainder, ties by class
        quota[order[:rest]] += 1
    for c, k in zip(classes, quota):
        members = np.flatnonzero(labels == c)
        pick = rng(seed, stream, 1000 + int(c)).permutation(len(members))[:k]
        mask[members[pick]] = True
    return mask


def subsample(idx: np.ndarray, max_samples: Optional[int], seed: int, stream: int) -> np.ndarray:
    """At most ``max_samples`` of ``idx``: a seeded random subset, kept in the original order."""
    if max_samples is None or len(idx) <= max_samples:
        return idx
    keep = np.sort(rng(seed, stream, 99).permutation(len(idx))[:max_samples])
    return idx[keep]


def check_classes(name: str, classes: Any, num_classes: Optional[int]) -> List[int]:
    """``classes`` as a list of ints: a non-empty list of distinct integers in ``0..num_classes - 1``
    (any non-negative integers when the class count is not known without the files)."""
    upper = f"0..{num_classes - 1}" if num_classes else ">= 0"
    msg = f"dataset {name!r}: classes must be a non-empty list of distinct integers in {upper}, got {classes!r}"
    if not isinstance(classes, (list, tuple)) or not classes:
        raise DatasetParamError("classes", msg)
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in classes):
        raise DatasetParamError("classes", msg)
    cls = [int(c) for c in classes]
    if len(set(cls)) != len(cls) or any(c < 0 or (num_classes and c >= num_classes) for c in cls):
        raise DatasetParamError("classes", msg)
    return cls


def remap_classes(name: str, labels: np.ndarray, classes: Optional[Sequence[int]],
                  num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Positions of items whose label is in ``classes`` and their labels remapped to the position
    in ``classes`` (all items, labels unchanged, when ``classes`` is None)."""
    if classes is None:
        return np.arange(len(labels)), labels.astype(np.int64)
    cls = check_classes(name, classes, num_classes)
    lookup = np.full(num_classes, -1, dtype=np.int64)
    lookup[cls] = np.arange(len(cls))
    new = lookup[labels]
    keep = np.flatnonzero(new >= 0)
    return keep, new[keep]


# ---------------------------------------------------------------------------------------
# data root, downloads


def data_root(root: Optional[str] = None) -> Path:
    """``root`` when given, else ``$OOD_SWEEP_DATA``, else ``~/.ood_sweep/data``."""
    base = root if root else os.environ.get(DATA_ENV) or "~/.ood_sweep/data"
    return Path(os.path.expanduser(str(base))).absolute()


@contextlib.contextmanager
def download_lock(root: Path, name: str) -> Iterator[None]:
    """Exclusive inter-process lock around a download into ``root`` (POSIX ``flock``)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".ood_sweep-{name}.lock", "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def fetch_with(name: str, root: Path, searched: Any, fetch: Callable[[], None],
               present: Callable[[], bool]) -> None:
    """Run ``fetch`` (a torchvision download) under the lock unless ``present()``; turn any
    failure into :class:`DataMissingError`."""
    with download_lock(root, name):
        if present():
            return
        try:
            fetch()
        except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataMissingError(name, searched, f"the download into {root} failed ({reason}); "
                                   "put the files there yourself or retry when online") from exc
    if not present():
        raise DataMissingError(name, searched, f"the download into {root} finished but the files are not there")


def list_images(folder: Path) -> List[Path]:
    """All image files under ``folder`` (recursive, sorted, hidden entries skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames
                   if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(out)


def has_images(folder: Path) -> bool:
    """True when ``folder`` holds at least one image file (stops at the first)."""
    if not folder.is_dir():
        return False
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".") for f in filenames):
            return True
    return False


# ---------------------------------------------------------------------------------------
# lazy data sets


class ArrayImageDataset(Dataset):
    """Images kept as raw ``uint8`` ``(N, C, H, W)`` and converted to ``fmt`` on access.

    ``images`` is the whole source array (shared between splits, never copied); ``indices`` pick
    this set's items and ``labels`` are their (possibly remapped) targets. ``__getitems__``
    converts a whole batch at once (the DataLoader uses it).
    """

    def __init__(self, images: np.ndarray, indices: np.ndarray, labels: np.ndarray, fmt: InputFormat,
                 num_classes: Optional[int], name: str):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
        self.images, self.indices = images, np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.indices):
            raise ValueError(f"{name}: {len(self.indices)} images but {len(self.labels)} labels")
        self.fmt, self.num_classes, self.name = fmt, num_classes, name

    @property
    def targets(self) -> np.ndarray:
        return self.labels

    def __len__(self) -> int:
        return len(self.indices)

    def _convert(self, positions) -> torch.Tensor:
        raw = torch.from_numpy(self.images[self.indices[positions]])
        return to_format(raw.float().div_(255.0), self.fmt)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} items")
        return self._convert([i])[0], torch.tensor(self.labels[i], dtype=torch.int64)

    def __getitems__(self, positions: Sequence[int]):
        x = self._convert(list(positions))
        y = torch.from_numpy(self.labels[list(positions)])
        return list(zip(x.unbind(0), y.unbind(0)))


def _decode(path: Path, size: int) -> np.ndarray:
    """Decode an image to uint8 ``(C, size, size)``: gray stays 1 channel, everything else RGB;
    centre crop to a square, then PIL bilinear (antialiased) resize — torchvision's
    ``Resize(size) + CenterCrop(size)`` for the images OpenOOD feeds a 32x32 network."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            w, h = im.size
            side = min(w, h)
            if w != h:
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side))
            if side != size:
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.array(im, dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # not an OSError; PIL's message does not name the file
        raise ImageReadError(path, f"too large to decode safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as exc:  # damaged / not an image
        raise ImageReadError(path, str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


class FileImageDataset(Dataset):
    """Image files decoded on access (PIL), centre-cropped, resized and converted to ``fmt``."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, fmt: InputFormat,
                 num_classes: Optional[int], name: str):
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{name}: {len(self.paths)} files but {len(self.labels)} labels")
        self.fmt, self.num_classes, self.name = fmt, num_classes, name

    @property
    def targets(self) -> np.ndarray:
        return self.labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        raw = torch.from_numpy(_decode(self.paths[i], self.fmt.image_size))
        x = to_format(raw[None].float().div_(255.0), self.fmt)[0]
        return x, torch.tensor(self.labels[i], dtype=torch.int64)


def builder_params(build: Callable[..., Any]) -> List[str]:
    return [p for p in inspect.signature(build).parameters if p not in ("split", "fmt", "seed")]
