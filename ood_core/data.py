"""Data sets for ood-sweep: the registry.

Every set is a torch ``Dataset`` of ``(x, y)``: ``x`` float32 ``(C, H, W)`` already in the *ID
input format* of the backbone (:class:`InputFormat`: channel count, square image size, per-channel
mean / std), ``y`` int64 (``-1`` for unlabelled sets). Builders produce pixels in ``[0, 1]`` and
convert them with :func:`to_format`: channels (gray -> RGB by repetition, RGB -> gray by ITU-R 601
luma), size (bilinear, antialiased when shrinking; image files are centre-cropped to a square
first) and ``(x - mean) / std`` — so OOD images always reach the network as the ID images do.

Data sets are registered in :data:`DATASETS` as :class:`DatasetEntry`; a builder has the
keyword-only signature ``build(*, split, fmt, seed, **params)`` (the orchestrator checks YAML
parameters against ``inspect.signature(build)``). Splits are ``"train"``, ``"val"``, ``"test"``;
for a given ``seed`` (and the same split parameters) they are deterministic and pairwise disjoint.

=================  ========================================================================
quickstart         ``digits``, ``gaussian_noise``, ``uniform_noise``, ``sklearn_photos``
                   (scikit-learn, offline; small ``TensorDataset``)
arrays             ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashionmnist``
                   (:mod:`ood_core.datasets.arrays`; lazy uint8, OpenOOD v1.5 splits)
image files        ``textures``, ``places365``, ``tinyimagenet``, ``lsun_crop``, ``lsun_resize``,
                   ``isun``, ``image_folder`` (:mod:`ood_core.datasets.folders`; decoded on access)
OpenOOD lists      ``openood_cifar10``, ``openood_cifar100``, ``openood_imagenet200``, ``openood_imagenet1k``
                   (:mod:`ood_core.datasets.openood`; OpenOOD v1.5's image lists, ``set`` picks one)
=================  ========================================================================

Real sets take ``root`` (default ``$OOD_SWEEP_DATA``, else ``~/.ood_sweep/data``),
``download=False`` (torchvision fetches CIFAR, SVHN, MNIST, FashionMNIST, Textures, Places365)
and ``max_samples`` (a subset drawn with ``seed``). :func:`check_available` tells, without
loading, whether a set is on disk (fetching it when ``download`` is set) and otherwise raises
:class:`DataMissingError` with one line naming the set, the searched path and how to provide it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ood_core.datasets import arrays, folders, openood
from ood_core.datasets.base import (DEFAULT_FRACTIONS, LUMA_601, SPLITS, ArrayImageDataset, DataMissingError,
                                    DatasetEntry, FileImageDataset, InputFormat, data_root, resize, to_format,
                                    to_gray)
from ood_core.datasets.base import check_fractions as _check_fractions  # noqa: F401 (kept for old callers)
from ood_core.datasets.base import rng as _rng  # noqa: F401
from ood_core.datasets.base import split_bounds as _split_bounds  # noqa: F401
from ood_core.datasets.base import take_split as _take_split  # noqa: F401
from ood_core.datasets.base import tensor_dataset as _tensor_dataset  # noqa: F401
from ood_core.datasets.sklearn_sets import (DIGITS_FORMAT, build_digits, build_gaussian_noise,
                                            build_sklearn_photos, build_uniform_noise)
from ood_core.datasets.sklearn_sets import digits_raw as _digits_raw  # noqa: F401
from ood_core.datasets.sklearn_sets import photo_tiles as _photo_tiles  # noqa: F401

__all__ = ["InputFormat", "DatasetEntry", "DATASETS", "DataMissingError", "register", "load_dataset",
           "check_available", "num_classes", "dataset_fingerprint", "to_format", "resize", "to_gray",
           "data_root", "SPLITS", "ArrayImageDataset", "FileImageDataset", "AsOutliers"]

DATASETS: Dict[str, DatasetEntry] = {}


class AsOutliers(Dataset):
    """``data`` with every label read as -1: OOD samples in a loader (pytorch-ood's convention), e.g. auxiliary
    outliers after the ID training data, or OOD validation data after the ID validation data."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i][0], torch.tensor(-1)

    def __getitems__(self, positions):
        items = self.data.__getitems__(positions) if hasattr(self.data, "__getitems__") else \
            [self.data[i] for i in positions]
        return [(x, torch.tensor(-1)) for x, _ in items]


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
    import inspect

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

    Raises ``KeyError`` for an unknown name, ``ValueError`` for a bad split, an unknown parameter
    or an invalid parameter value (the messages name the data set), and :class:`DataMissingError`
    when the files are not there (after a download attempt with ``download=True``).
    """
    entry = _entry(name)
    _bind(entry, split, fmt, seed, params)
    return entry.build(split=split, fmt=fmt, seed=int(seed), **params)


def check_available(name: str, *, split: str, fetch: bool = True, **params: Any) -> None:
    """Raise :class:`DataMissingError` unless data set ``name`` (split ``split``) can be loaded.

    Cheap: it looks for the files, it does not read them. When they are missing and the set is
    downloadable with ``download: true`` in ``params``, it downloads them first if ``fetch`` (the
    pre-flight of a sweep); with ``fetch=False`` such a set passes (it will be fetched later).
    Also raises ``KeyError`` / ``ValueError`` for an unknown set, split or parameter.
    """
    entry = _entry(name)
    _bind(entry, split, InputFormat(1, 1, (0.0,), (1.0,)), 0, params)
    if entry.check is not None:
        entry.check(split=split, fetch=fetch, **params)


def num_classes(name: str, **params: Any) -> Optional[int]:
    """Number of classes of labelled set ``name`` with ``params``, without loading it: the length
    of ``classes`` when given, a class-per-folder ``image_folder``'s folder count (listed), else
    the entry's static ``num_classes`` (None for unlabelled sets)."""
    entry = _entry(name)
    if params.get("classes") is not None:
        return len(params["classes"])
    if name == "image_folder" and params.get("path"):
        classes = folders.folder_classes(params["path"], params.get("layout", "auto"))
        return None if classes is None else len(classes)
    if name == "tinyimagenet" and params.get("exclude_wnids"):
        return entry.num_classes - len(set(params["exclude_wnids"]))
    return entry.num_classes


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
# the registry

register(DatasetEntry("digits", build_digits, labelled=True,
                      description="scikit-learn 8x8 handwritten digits (1,797 images, 10 classes)",
                      default_format=DIGITS_FORMAT, num_classes=10, split_params=("fractions",)))
register(DatasetEntry("gaussian_noise", build_gaussian_noise, labelled=False,
                      description="i.i.d. Gaussian pixel noise, mean 0.5, std 0.25, clipped to [0, 1]"))
register(DatasetEntry("uniform_noise", build_uniform_noise, labelled=False,
                      description="i.i.d. uniform pixel noise in [0, 1]"))
register(DatasetEntry("sklearn_photos", build_sklearn_photos, labelled=False,
                      description="non-overlapping tiles of scikit-learn's two sample photos",
                      split_params=("patch", "fractions")))

_ARRAY_SPLIT = ("val_size", "test_pool")
for _name, _build, _check, _fmt, _desc in (
    ("cifar10", arrays.build_cifar10, arrays.check_cifar10, arrays.CIFAR10_FORMAT,
     "CIFAR-10 (32x32 RGB, 10 classes; train 50k / val 1k / test 9k as OpenOOD v1.5)"),
    ("cifar100", arrays.build_cifar100, arrays.check_cifar100, arrays.CIFAR100_FORMAT,
     "CIFAR-100 (32x32 RGB, 100 classes; train 50k / val 1k / test 9k as OpenOOD v1.5)"),
    ("svhn", arrays.build_svhn, arrays.check_svhn, arrays.SVHN_FORMAT,
     "SVHN cropped digits (32x32 RGB, 10 classes; train 73,257 / test 26,032)"),
    ("mnist", arrays.build_mnist, arrays.check_mnist, arrays.MNIST_FORMAT,
     "MNIST handwritten digits (28x28 gray, 10 classes; train 60k / test 10k)"),
    ("fashionmnist", arrays.build_fashionmnist, arrays.check_fashionmnist, arrays.FASHIONMNIST_FORMAT,
     "Fashion-MNIST (28x28 gray, 10 classes; train 60k / test 10k; Debian's files used when installed)"),
):
    register(DatasetEntry(_name, _build, labelled=True, description=_desc, default_format=_fmt,
                          num_classes=arrays.SOURCES[_name].num_classes, check=_check, downloadable=True,
                          split_params=_ARRAY_SPLIT))

for _name, _build, _check, _desc in (
    ("textures", folders.build_textures, folders.check_textures,
     "Describable Textures (DTD), 5,640 images, OOD only"),
    ("places365", folders.build_places365, folders.check_places365,
     "Places365-Standard validation images (256x256), OOD only"),
    ("lsun_crop", folders.build_lsun_crop, folders.check_lsun_crop, "LSUN crops (ODIN release), OOD only"),
    ("lsun_resize", folders.build_lsun_resize, folders.check_lsun_resize,
     "LSUN resized (ODIN release), OOD only"),
    ("isun", folders.build_isun, folders.check_isun, "iSUN (ODIN release), OOD only"),
):
    register(DatasetEntry(_name, _build, labelled=False, description=_desc, check=_check,
                          downloadable=_name in folders.DOWNLOADERS, split_params=("val_size",)))

register(DatasetEntry("tinyimagenet", folders.build_tinyimagenet, labelled=True,
                      description="TinyImageNet (tiny-imagenet-200, 64x64, 200 classes); OOD val from its "
                                  "training images, test = its validation images",
                      default_format=folders.TINYIMAGENET_FORMAT, num_classes=200,
                      check=folders.check_tinyimagenet, split_params=("val_size", "exclude_wnids")))
register(DatasetEntry("image_folder", folders.build_image_folder, labelled=True,
                      description="any local folder of images: one sub-folder per class, or flat (unlabelled)",
                      check=folders.check_image_folder, split_params=("fractions", "layout")))

for _bench, (_build, _check) in openood.BUILDERS.items():
    _b = openood.CATALOGUE[_bench]
    register(DatasetEntry(openood.dataset_name(_bench), _build, labelled=True,
                          description=f"OpenOOD v1.5 {_bench} image lists (benchmark_imglist/{_b.folder}/); "
                                      f"set: {', '.join(_b.sets)}",
                          default_format=_b.fmt, num_classes=_b.num_classes, check=_check, split_params=("set",)))
