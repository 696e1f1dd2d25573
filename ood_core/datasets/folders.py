"""Sets stored as image files, decoded on access: Textures (DTD), Places365, TinyImageNet, LSUN
(crop / resize), iSUN, and any local image folder.

OOD-only sets (``textures``, ``places365``, ``lsun_crop``, ``lsun_resize``, ``isun``) have a
``test`` split of every image except a ``val`` hold-out of ``val_size`` images (default 0: the
whole set is the test set, as in OpenOOD v1.5). Use the same ``val_size`` for a set's val and
test entries so that they stay disjoint. They have no ``train`` split. Labels are ``-1``.

``tinyimagenet`` (``tiny-imagenet-200``, 200 classes, 64x64): ``train`` = the training folder
less a class-stratified hold-out of ``val_size`` images (default 1,000), which is ``val``;
``test`` = the official validation folder (labels from ``val_annotations.txt``). As an OOD set
this is OpenOOD v1.5's protocol: OOD validation images (from the training folder) are disjoint from
the test images. ``exclude_wnids`` drops classes (e.g. those overlapping CIFAR).

``image_folder``: ``path`` to a folder; ``layout`` ``class`` (one sub-folder per class, labels =
sorted folder names), ``flat`` (all images, unlabelled) or ``auto``. Splits: ``train/``, ``val/``,
``test/`` sub-folders when present; else ``fractions`` (train, val, test) drawn by ``seed``
(stratified by class); else the whole folder is the ``test`` split.

Where the sets are searched (``<root>`` = ``params.root``, else ``$OOD_SWEEP_DATA``, else
``~/.ood_sweep/data``): see ``CANDIDATES``. torchvision downloads Textures (DTD) and Places365
(validation images, 256x256); TinyImageNet, LSUN and iSUN must be put there by hand.
"""
from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import (IMAGE_EXTENSIONS, DataMissingError, DatasetParamError, FileImageDataset, InputFormat, check_count, check_fractions, check_split,
                   data_root, fetch_with, has_images, list_images, rng, stratified_holdout, subsample, take_split)

ROOT_HINT = "(data root: params.root, else $OOD_SWEEP_DATA, else ~/.ood_sweep/data)"

CANDIDATES: Dict[str, Callable[[Path], List[Path]]] = {
    "textures": lambda r: [r / "dtd" / "dtd" / "images", r / "dtd" / "images", r / "textures", r / "Textures"],
    "places365": lambda r: [r / "places365" / "val_256", r / "places365" / "val_large", r / "places365",
                            r / "Places365", r / "places"],
    "lsun_crop": lambda r: [r / "LSUN", r / "lsun_crop", r / "LSUN_crop"],
    "lsun_resize": lambda r: [r / "LSUN_resize", r / "lsun_resize"],
    "isun": lambda r: [r / "iSUN", r / "isun"],
    "tinyimagenet": lambda r: [r / "tiny-imagenet-200", r / "tinyimagenet", r / "tin"],
}

HOW = {
    "textures": "unpack dtd-r1.0.1.tar.gz so that <root>/dtd/images/<class>/*.jpg exist",
    "places365": "unpack val_256.tar (Places365-Standard, small images) into <root>/places365",
    "lsun_crop": "unpack LSUN.tar.gz (the ODIN release of LSUN crops) into the data root (<root>/LSUN)",
    "lsun_resize": "unpack LSUN_resize.tar.gz (the ODIN release) into the data root (<root>/LSUN_resize)",
    "isun": "unpack iSUN.tar.gz (the ODIN release) into the data root (<root>/iSUN)",
    "tinyimagenet": "unzip tiny-imagenet-200.zip into the data root (<root>/tiny-imagenet-200)",
}


def _download_textures(root: Path) -> None:
    import torchvision

    torchvision.datasets.DTD(root=str(root), split="test", download=True)


def _download_places365(root: Path) -> None:
    import torchvision

    torchvision.datasets.Places365(root=str(root / "places365"), split="val", small=True, download=True)


DOWNLOADERS: Dict[str, Callable[[Path], None]] = {"textures": _download_textures, "places365": _download_places365}


def _stream(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _missing(name: str, root: Path, download: bool) -> DataMissingError:
    searched = ", ".join(str(p) for p in CANDIDATES[name](root))
    if name in DOWNLOADERS:
        hint = f"set download: true in its params to fetch it with torchvision, or {HOW[name]} {ROOT_HINT}"
    else:
        hint = ("torchvision cannot download it; " if download else "") + f"{HOW[name]} {ROOT_HINT}"
    return DataMissingError(name, searched, hint)


def _locate_folder(name: str, root: Path) -> Optional[Path]:
    for c in CANDIDATES[name](root):
        if has_images(c):
            return c
    return None


def _require_folder(name: str, root: Path, download: bool, fetch: bool = True) -> Optional[Path]:
    folder = _locate_folder(name, root)
    if folder is not None:
        return folder
    if download and name in DOWNLOADERS:
        if not fetch:
            return None
        fetch_with(name, root, ", ".join(str(p) for p in CANDIDATES[name](root)),
                   lambda: DOWNLOADERS[name](root), lambda: _locate_folder(name, root) is not None)
        return _locate_folder(name, root)
    raise _missing(name, root, download)


@functools.lru_cache(maxsize=16)
def _listing(folder: Path) -> Tuple[Path, ...]:
    return tuple(list_images(folder))


# ---------------------------------------------------------------------------------------
# OOD-only sets


def _ood_params(name: str, split: str, val_size, max_samples) -> None:
    check_split(name, split)
    check_count(name, "val_size", val_size)
    check_count(name, "max_samples", max_samples, allow_none=True, minimum=1)
    if split == "train":
        raise DatasetParamError("split", f"dataset {name!r} is an OOD-only set: it has val and test splits, no train split")
    if split == "val" and int(val_size) == 0:
        raise DatasetParamError("val_size", f"dataset {name!r}: the val split is empty; give val_size > 0 "
                         "(and the same val_size to its test entry)")


def _make_ood(name: str):
    def build(*, split: str, fmt: InputFormat, seed: int, root: Optional[str] = None, download: bool = False,
              val_size: int = 0, max_samples: Optional[int] = None) -> FileImageDataset:
        _ood_params(name, split, val_size, max_samples)
        folder = _require_folder(name, data_root(root), download)
        paths = _listing(folder)
        if int(val_size) >= len(paths):
            raise DatasetParamError("val_size", f"dataset {name!r}: val_size {val_size} leaves no test images "
                                    f"({len(paths)} in {folder})")
        held = stratified_holdout(np.zeros(len(paths), dtype=np.int64), int(val_size), seed, _stream(name))
        idx = subsample(np.flatnonzero(held if split == "val" else ~held), max_samples, seed, _stream(name))
        return FileImageDataset([paths[i] for i in idx], np.full(len(idx), -1), fmt, None, name)

    def check(*, split: str, fetch: bool = True, root: Optional[str] = None, download: bool = False,
              val_size: int = 0, max_samples: Optional[int] = None) -> None:
        _ood_params(name, split, val_size, max_samples)
        _require_folder(name, data_root(root), download, fetch=fetch)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"{name}: image files decoded on access (see :mod:`ood_core.datasets.folders`)."
    return build, check


build_textures, check_textures = _make_ood("textures")
build_places365, check_places365 = _make_ood("places365")
build_lsun_crop, check_lsun_crop = _make_ood("lsun_crop")
build_lsun_resize, check_lsun_resize = _make_ood("lsun_resize")
build_isun, check_isun = _make_ood("isun")


# ---------------------------------------------------------------------------------------
# TinyImageNet


def _tin_folder(root: Path) -> Optional[Path]:
    for c in CANDIDATES["tinyimagenet"](root):
        if (c / "train").is_dir() or (c / "val").is_dir():
            return c
    return None


def _tin_parts(split: str) -> Tuple[str, ...]:
    return ("val",) if split == "test" else ("train",)


def check_tinyimagenet(*, split: str, fetch: bool = True, root: Optional[str] = None, download: bool = False,
                       val_size: int = 1000, exclude_wnids: Optional[Sequence[str]] = None,
                       max_samples: Optional[int] = None) -> None:
    check_split("tinyimagenet", split)
    check_count("tinyimagenet", "val_size", val_size)
    check_count("tinyimagenet", "max_samples", max_samples, allow_none=True, minimum=1)
    r = data_root(root)
    base = _tin_folder(r)
    if base is None or not all(has_images(base / p) for p in _tin_parts(split)):
        raise _missing("tinyimagenet", r, download)


@functools.lru_cache(maxsize=4)
def _tin_index(base: Path, part: str) -> Tuple[Tuple[Path, ...], Tuple[str, ...]]:
    """(paths, wnids) of the training folder (``train/<wnid>/images/*``) or the validation folder
    (``val/images/*`` + ``val_annotations.txt``, or ``val/<wnid>/...``)."""
    folder = base / part
    ann = folder / "val_annotations.txt"
    if part == "val" and ann.is_file():
        wnid_of = {}
        for line in ann.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                wnid_of[fields[0]] = fields[1]
        paths = [p for p in list_images(folder) if p.name in wnid_of]
        return tuple(paths), tuple(wnid_of[p.name] for p in paths)
    paths = list_images(folder)
    return tuple(paths), tuple(p.relative_to(folder).parts[0] for p in paths)


def build_tinyimagenet(*, split: str, fmt: InputFormat, seed: int, root: Optional[str] = None,
                       download: bool = False, val_size: int = 1000, exclude_wnids: Optional[Sequence[str]] = None,
                       max_samples: Optional[int] = None) -> FileImageDataset:
    """TinyImageNet (tiny-imagenet-200): image files decoded on access; labels = position of the
    WordNet id among the sorted kept ids."""
    check_tinyimagenet(split=split, root=root, download=download, val_size=val_size,
                       exclude_wnids=exclude_wnids, max_samples=max_samples)
    base = _tin_folder(data_root(root))
    wnids_file = base / "wnids.txt"
    all_wnids = sorted(set(wnids_file.read_text().split()) if wnids_file.is_file()
                       else set(_tin_index(base, "train")[1]) | set(_tin_index(base, "val")[1]))
    excluded = set(exclude_wnids or ())
    unknown = sorted(excluded - set(all_wnids))
    if unknown:
        raise DatasetParamError("exclude_wnids", f"dataset 'tinyimagenet': exclude_wnids has unknown ids {unknown[:5]}")
    kept = [w for w in all_wnids if w not in excluded]
    pos = {w: i for i, w in enumerate(kept)}
    paths, wnids = _tin_index(base, _tin_parts(split)[0])
    labels = np.array([pos.get(w, -1) for w in wnids], dtype=np.int64)
    idx = np.flatnonzero(labels >= 0)
    if split != "test":
        if split == "val" and int(val_size) == 0:
            raise DatasetParamError("val_size", "dataset 'tinyimagenet': the val split is empty with val_size 0")
        if int(val_size) >= len(idx):
            raise DatasetParamError("val_size", f"dataset 'tinyimagenet': val_size {val_size} leaves no training images "
                             f"({len(idx)} in {base / 'train'})")
        held = stratified_holdout(labels[idx], int(val_size), seed, _stream("tinyimagenet"))
        idx = idx[held if split == "val" else ~held]
    idx = subsample(idx, max_samples, seed, _stream("tinyimagenet"))
    return FileImageDataset([paths[i] for i in idx], labels[idx], fmt, len(kept), "tinyimagenet")


# ---------------------------------------------------------------------------------------
# any local folder


LAYOUTS = ("auto", "class", "flat")


def _split_folders(path: Path) -> Dict[str, Path]:
    return {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}


def _is_class_layout(folder: Path) -> bool:
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    top_images = [f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)]
    return bool(subdirs) and not top_images and any(has_images(d) for d in subdirs)


def _folder_params(path, layout, fractions, max_samples) -> Tuple[Path, Optional[Tuple[float, float, float]]]:
    if not isinstance(path, str) or not path:
        raise DatasetParamError("path", "dataset 'image_folder': params.path must name a local folder of images")
    if layout not in LAYOUTS:
        raise DatasetParamError("layout", f"dataset 'image_folder': layout must be one of {LAYOUTS}, got {layout!r}")
    check_count("image_folder", "max_samples", max_samples, allow_none=True, minimum=1)
    fr = check_fractions("image_folder", fractions) if fractions is not None else None
    return Path(path).expanduser().absolute(), fr


def _source_folder(path: Path, split: str, fr) -> Path:
    folders = _split_folders(path) if fr is None else {}
    if folders:
        if split not in folders:
            raise DataMissingError("image_folder", path / split,
                                   f"the folder has {'/'.join(sorted(folders))} sub-folders but no {split}/")
        return folders[split]
    if fr is None and split != "test":
        raise DatasetParamError("fractions", f"dataset 'image_folder' {path}: no {split} split; add train/ val/ test/ sub-folders "
                         "or give fractions: [train, val, test]")
    return path


def check_image_folder(*, split: str, fetch: bool = True, path: Optional[str] = None, layout: str = "auto",
                       fractions: Optional[Sequence[float]] = None, max_samples: Optional[int] = None) -> None:
    check_split("image_folder", split)
    folder, fr = _folder_params(path, layout, fractions, max_samples)
    hint = ("params.path must name a folder of images: one sub-folder per class, or flat, "
            "optionally inside train/ val/ test/ sub-folders")
    if not folder.is_dir():
        raise DataMissingError("image_folder", folder, hint)
    src = _source_folder(folder, split, fr)
    if not has_images(src):
        raise DataMissingError("image_folder", src, hint)


def folder_classes(path: str, layout: str = "auto") -> Optional[List[str]]:
    """Sorted class names of an image folder (union over its split sub-folders); None when flat."""
    folder = Path(path).expanduser().absolute()
    roots = list(_split_folders(folder).values()) or [folder]
    if layout == "flat" or (layout == "auto" and not any(_is_class_layout(r) for r in roots if r.is_dir())):
        return None
    return sorted({d.name for r in roots if r.is_dir() for d in r.iterdir()
                   if d.is_dir() and not d.name.startswith(".")})


def build_image_folder(*, split: str, fmt: InputFormat, seed: int, path: Optional[str] = None,
                       layout: str = "auto", fractions: Optional[Sequence[float]] = None,
                       max_samples: Optional[int] = None) -> FileImageDataset:
    """Any local folder of images (class-per-folder or flat), as an ID or OOD set."""
    check_image_folder(split=split, path=path, layout=layout, fractions=fractions, max_samples=max_samples)
    folder, fr = _folder_params(path, layout, fractions, max_samples)
    src = _source_folder(folder, split, fr)
    classes = folder_classes(str(folder), layout)
    paths = _listing(src)
    if classes is None:
        labels = np.full(len(paths), -1, dtype=np.int64)
    else:
        pos = {c: i for i, c in enumerate(classes)}
        labels = np.array([pos.get(p.relative_to(src).parts[0], -1) if len(p.relative_to(src).parts) > 1 else -1
                           for p in paths], dtype=np.int64)
    stream = _stream("image_folder")
    if fr is not None:
        chosen = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            chosen.append(take_split(members[rng(seed, stream, 1000 + int(c)).permutation(len(members))], split, fr))
        idx = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    else:
        idx = np.arange(len(paths))
    idx = subsample(idx, max_samples, seed, stream)
    return FileImageDataset([paths[i] for i in idx], labels[idx], fmt,
                            None if classes is None else len(classes), "image_folder")


TINYIMAGENET_FORMAT = InputFormat(3, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
