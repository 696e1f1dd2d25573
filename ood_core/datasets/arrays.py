"""Labelled sets shipped as arrays: CIFAR-10, CIFAR-100, SVHN, MNIST, FashionMNIST.

The files are read in their original on-disk formats (the layouts torchvision downloads to):

=============  ===================================================================================
cifar10        ``<root>/cifar-10-batches-py/data_batch_{1..5}``, ``test_batch`` (pickled dicts)
cifar100       ``<root>/cifar-100-python/train``, ``test`` (pickled dicts, ``fine_labels``)
svhn           ``<root>/svhn/{train,test}_32x32.mat`` (MATLAB v5: ``X`` (32, 32, 3, N), ``y`` 1..10)
mnist          ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (idx)
fashionmnist   ``<root>/FashionMNIST/raw/...`` as MNIST, then Debian's ``dataset-fashion-mnist``
               (``/usr/share/datasets/fashion-mnist``)
=============  ===================================================================================

``download: true`` fetches them with torchvision (its URLs and checksums) into those folders.
The pickles are read with a restricted unpickler that only rebuilds numpy arrays.

Splits follow OpenOOD v1.5 for the CIFAR benchmarks: ``train`` is the whole training file;
``val`` is ``val_size`` images (default 1,000) held out of the *test* file, stratified by class
and drawn by ``seed``; ``test`` is the rest of the test file (CIFAR-10: 50k / 1k / 9k).
``val_size: 0`` gives the whole test file as ``test`` (how OpenOOD uses CIFAR-100 / CIFAR-10 as
near-OOD). ``test_pool: all`` pools training and test files for ``val`` / ``test`` (OpenOOD's
far-OOD MNIST uses all 70,000 images); the ``train`` split is then refused. ``classes`` keeps those
classes, labels remapped to their position in the list; ``max_samples`` draws a seeded subset.
"""
from __future__ import annotations

import functools
import gzip
import importlib
import pickle
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import (ArrayImageDataset, DataFileError, DataMissingError, DatasetParamError, InputFormat, check_count,
                   check_split, data_root, fetch_with, remap_classes, stratified_holdout, subsample)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class _ArraysUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays / dtypes (the content of the CIFAR pickles)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module.startswith("numpy.core.") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = module.replace("numpy.core.", "numpy._core.")  # numpy 2 renamed it (old pickles)
        return getattr(importlib.import_module(module), name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArraysUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataFileError(f"{path} is not a CIFAR batch file: {exc}") from None
    if not isinstance(obj, dict):
        raise DataFileError(f"{path} is not a CIFAR batch file (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar(folder: Path, files: Sequence[str], label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        d = _unpickle(folder / f)
        if "data" not in d or label_key not in d:
            raise DataFileError(f"{folder / f} is not a CIFAR batch file (keys {sorted(d)})")
        images.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _read_svhn(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError / MatReadError / NotImplementedError
        raise DataFileError(f"{path} is not an SVHN .mat file: {exc}") from None
    x = np.ascontiguousarray(np.transpose(np.asarray(mat["X"], dtype=np.uint8), (3, 2, 0, 1)))
    y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    return x, y


def _open_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzipped) as a uint8 array."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataFileError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataFileError(f"{path}: idx header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


# ---------------------------------------------------------------------------------------
# the sets: where they live, how to read and fetch them


class ArraySource:
    """One array data set: candidate folders, the files of each part, reader and downloader."""

    def __init__(self, name: str, num_classes: int, folders: Callable[[Path], List[Path]],
                 files: Dict[str, List[str]], read: Callable[[Path, str], Tuple[np.ndarray, np.ndarray]],
                 download: Optional[Callable[[Path], None]], how: str):
        self.name, self.num_classes, self.folders, self.files = name, num_classes, folders, files
        self.read, self.download, self.how = read, download, how

    def _complete(self, folder: Path, part: str) -> bool:
        return all(self._file(folder, f) is not None for f in self.files[part])

    @staticmethod
    def _file(folder: Path, name: str) -> Optional[Path]:
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
        return None

    def locate(self, root: Path, parts: Sequence[str]) -> Optional[Path]:
        for folder in self.folders(root):
            if all(self._complete(folder, p) for p in parts):
                return folder
        return None

    def searched(self, root: Path) -> str:
        return ", ".join(str(f) for f in self.folders(root))

    def require(self, root: Path, parts: Sequence[str], download: bool, fetch: bool = True) -> Optional[Path]:
        folder = self.locate(root, parts)
        if folder is not None:
            return folder
        if download and self.download is not None:
            if not fetch:
                return None
            fetch_with(self.name, root, self.searched(root), lambda: self.download(root),
                       lambda: self.locate(root, parts) is not None)
            return self.locate(root, parts)
        hint = ("set download: true in its params to fetch it with torchvision, or " if self.download else "") \
            + f"{self.how} (data root: params.root, else $OOD_SWEEP_DATA, else ~/.ood_sweep/data)"
        raise DataMissingError(self.name, self.searched(root), hint)

    @functools.lru_cache(maxsize=6)
    def load(self, folder: Path, part: str) -> Tuple[np.ndarray, np.ndarray]:
        x, y = self.read(folder, part)
        if len(x) != len(y):
            raise DataFileError(f"dataset {self.name!r}: {len(x)} images but {len(y)} labels in {folder} ({part})")
        x.setflags(write=False)
        y.setflags(write=False)
        return x, y


def _mnist_reader(folder: Path, part: str):
    prefix = "train" if part == "train" else "t10k"
    x = read_idx(ArraySource._file(folder, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(ArraySource._file(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return np.ascontiguousarray(x[:, None]), y


def _cifar_download(cls_name: str) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        import torchvision

        getattr(torchvision.datasets, cls_name)(root=str(root), train=True, download=True)
    return run


def _svhn_download(root: Path) -> None:
    import torchvision

    for split in ("train", "test"):
        torchvision.datasets.SVHN(root=str(root / "svhn"), split=split, download=True)


def _mnist_download(cls_name: str) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        import torchvision

        for train in (True, False):
            getattr(torchvision.datasets, cls_name)(root=str(root), train=train, download=True)
    return run


MNIST_FILES = {p: [f"{'train' if p == 'train' else 't10k'}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
               for p in ("train", "test")}

SOURCES: Dict[str, ArraySource] = {
    "cifar10": ArraySource(
        "cifar10", 10, lambda r: [r / "cifar-10-batches-py"],
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        lambda f, p: _read_cifar(f, [f"data_batch_{i}" for i in range(1, 6)] if p == "train" else ["test_batch"],
                                 "labels"),
        _cifar_download("CIFAR10"), "unpack cifar-10-python.tar.gz into the data root"),
    "cifar100": ArraySource(
        "cifar100", 100, lambda r: [r / "cifar-100-python"], {"train": ["train"], "test": ["test"]},
        lambda f, p: _read_cifar(f, [p], "fine_labels"),
        _cifar_download("CIFAR100"), "unpack cifar-100-python.tar.gz into the data root"),
    "svhn": ArraySource(
        "svhn", 10, lambda r: [r / "svhn", r / "SVHN", r], {"train": ["train_32x32.mat"], "test": ["test_32x32.mat"]},
        lambda f, p: _read_svhn(f / f"{p}_32x32.mat"),
        _svhn_download, "put train_32x32.mat and test_32x32.mat (the cropped-digits format) in <root>/svhn"),
    "mnist": ArraySource(
        "mnist", 10, lambda r: [r / "MNIST" / "raw", r / "mnist"], MNIST_FILES, _mnist_reader,
        _mnist_download("MNIST"), "put the four idx files (optionally .gz) in <root>/MNIST/raw"),
    "fashionmnist": ArraySource(
        "fashionmnist", 10,
        lambda r: [r / "FashionMNIST" / "raw", r / "fashion-mnist", DEBIAN_FASHION_MNIST], MNIST_FILES,
        _mnist_reader, _mnist_download("FashionMNIST"),
        "put the four idx files (optionally .gz) in <root>/FashionMNIST/raw, or install Debian's "
        "dataset-fashion-mnist package"),
}


def _parts(split: str, test_pool: str) -> Tuple[str, ...]:
    if split == "train":
        return ("train",)
    return ("train", "test") if test_pool == "all" else ("test",)


def _check_params(name: str, split: str, val_size, test_pool: str, max_samples) -> None:
    check_split(name, split)
    check_count(name, "val_size", val_size)
    check_count(name, "max_samples", max_samples, allow_none=True, minimum=1)
    if test_pool not in ("test", "all"):
        raise DatasetParamError("test_pool", f"dataset {name!r}: test_pool must be 'test' or 'all', got {test_pool!r}")
    if test_pool == "all" and split == "train":
        raise DatasetParamError("test_pool", f"dataset {name!r}: test_pool 'all' pools the training images into val/test; "
                         "the train split is not available then")


def check_array_set(name: str, *, split: str, fetch: bool = True, root: Optional[str] = None,
                    download: bool = False, val_size: int = 1000, test_pool: str = "test",
                    classes=None, max_samples=None) -> None:
    _check_params(name, split, val_size, test_pool, max_samples)
    SOURCES[name].require(data_root(root), _parts(split, test_pool), download, fetch=fetch)


def build_array_set(name: str, *, split: str, fmt: InputFormat, seed: int, root: Optional[str],
                    download: bool, val_size: int, test_pool: str, classes: Optional[Sequence[int]],
                    max_samples: Optional[int]) -> ArrayImageDataset:
    _check_params(name, split, val_size, test_pool, max_samples)
    src = SOURCES[name]
    folder = src.require(data_root(root), _parts(split, test_pool), download)
    stream = zlib.crc32(name.encode()) & 0x7FFFFFFF
    if split == "train":
        images, labels = src.load(folder, "train")
        idx = np.arange(len(labels))
    else:
        if test_pool == "all":
            images, labels = _pooled(src, folder)
        else:
            images, labels = src.load(folder, "test")
        if split == "val" and int(val_size) == 0:
            raise DatasetParamError("val_size", f"dataset {name!r}: the val split is empty with val_size 0")
        if int(val_size) >= len(labels):
            raise DatasetParamError("val_size", f"dataset {name!r}: val_size {val_size} leaves no test images "
                             f"(the pool has {len(labels)}; found in {folder})")
        held = stratified_holdout(labels, int(val_size), seed, stream)
        idx = np.flatnonzero(held if split == "val" else ~held)
    keep, new_labels = remap_classes(name, labels[idx], classes, src.num_classes)
    idx = idx[keep]
    chosen = subsample(np.arange(len(idx)), max_samples, seed, stream)
    num = len(classes) if classes is not None else src.num_classes
    return ArrayImageDataset(images, idx[chosen], new_labels[chosen], fmt, num, name)


@functools.lru_cache(maxsize=2)
def _pooled(src: ArraySource, folder: Path) -> Tuple[np.ndarray, np.ndarray]:
    xa, ya = src.load(folder, "train")
    xb, yb = src.load(folder, "test")
    x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _make(name: str, default_val: int = 1000):
    def build(*, split: str, fmt: InputFormat, seed: int, root: Optional[str] = None, download: bool = False,
              val_size: int = default_val, test_pool: str = "test", classes: Optional[Sequence[int]] = None,
              max_samples: Optional[int] = None) -> ArrayImageDataset:
        return build_array_set(name, split=split, fmt=fmt, seed=seed, root=root, download=download,
                               val_size=val_size, test_pool=test_pool, classes=classes, max_samples=max_samples)

    def check(*, split: str, fetch: bool = True, root: Optional[str] = None, download: bool = False,
              val_size: int = default_val, test_pool: str = "test", classes=None, max_samples=None) -> None:
        check_array_set(name, split=split, fetch=fetch, root=root, download=download, val_size=val_size,
                        test_pool=test_pool, classes=classes, max_samples=max_samples)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"{name}: lazy uint8 images converted on access (see :mod:`ood_core.datasets.arrays`)."
    return build, check


build_cifar10, check_cifar10 = _make("cifar10")
build_cifar100, check_cifar100 = _make("cifar100")
build_svhn, check_svhn = _make("svhn")
build_mnist, check_mnist = _make("mnist")
build_fashionmnist, check_fashionmnist = _make("fashionmnist")

# normalisation constants: OpenOOD v1.5 (CIFAR), the usual published values (SVHN, MNIST, FashionMNIST)
CIFAR10_FORMAT = InputFormat(3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_FORMAT = InputFormat(3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_FORMAT = InputFormat(3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
MNIST_FORMAT = InputFormat(1, 28, (0.1307,), (0.3081,))
FASHIONMNIST_FORMAT = InputFormat(1, 28, (0.2860,), (0.3530,))
