"""OpenOOD v1.5's benchmarks as they are on disk: image lists over its image folders.

OpenOOD (Zhang, Yang, Wang et al., "OpenOOD v1.5: Enhanced Benchmark for Out-of-Distribution Detection", 2023)
ships each benchmark as text lists, ``<data root>/benchmark_imglist/<benchmark>/<list>.txt``, one
``<relative path> <label>`` line per image, the path relative to ``<data root>/images_classic/`` (CIFAR, TinyImageNet,
MNIST, SVHN, Textures, Places365) or ``<data root>/images_largescale/`` (ImageNet, SSB-hard, NINCO, iNaturalist,
OpenImage-O, ImageNet-V2/-C/-R/-ES). Its download script (``scripts/download/download.py --contents datasets
--datasets <benchmark> --save_dir <root>``) or its evaluation API (``data_setup(<root>, <id name>)``) put them there.

Registered sets (one per benchmark): ``openood_cifar10``, ``openood_cifar100``, ``openood_imagenet200``,
``openood_imagenet1k``. The parameter ``set`` picks a list from :data:`CATALOGUE` (OpenOOD's ``DATA_INFO`` of
``openood/evaluation_api/datasets.py``):

* ``set: id`` (default): the ID lists, ``split`` train / val / test;
* an OOD set (``tin``, ``ssb_hard``...): ``split: test`` is its near- or far-OOD test list; the one OOD validation
  set of the benchmark (``tin`` for CIFAR, ``openimage_o`` for ImageNet) also has ``split: val``;
* a covariate-shifted ID set (``cifar10c``, ``imagenet_v2``, ``imagenet_c``, ``imagenet_r``, ``imagenet_es``):
  ``split: test``, with the ID labels of the list.

OOD sets read every label as -1. Preprocessing is OpenOOD's test-time one (``evaluation_api/preprocessor.py``,
``TestStandardPreProcessor``): convert to RGB, resize the shorter side to ``pre_size`` (PIL bilinear), centre crop
``image_size``, scale to [0, 1], ``(x - mean) / std``. ``pre_size`` defaults to the benchmark's ratio (32 -> 32 for
CIFAR, 224 -> 256 for ImageNet); ImageNet-C images are only normalized (OpenOOD's ``ImageNetCPreProcessor``: they
are stored at 224 x 224). Truncated image files are read as OpenOOD reads them (``LOAD_TRUNCATED_IMAGES``).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import (DataFileError, DataMissingError, DatasetParamError, ImageReadError, InputFormat, check_count,
                   check_split, data_root, subsample, to_gray)

LISTS = "benchmark_imglist"
CLASSIC, LARGE = "images_classic/", "images_largescale/"

#: OpenOOD's test-time normalization (``evaluation_api/preprocessor.py`` default_preprocessing_dict)
CIFAR10_FORMAT = InputFormat(3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_FORMAT = InputFormat(3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
IMAGENET_FORMAT = InputFormat(3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Benchmark:
    """One OpenOOD v1.5 benchmark: its list folder, class count, input format and resize size, and its lists.

    ``sets`` maps a set name to ``(role, {split: (image folder, list file)})``; role is ``id``, ``near``,
    ``far`` or ``csid``; ``ood_val`` names the set whose ``val`` split is the benchmark's OOD validation set."""

    name: str
    folder: str
    download_name: str
    num_classes: int
    fmt: InputFormat
    pre_size: int
    sets: Dict[str, Tuple[str, Dict[str, Tuple[str, str]]]]
    ood_val: str

    def sets_of(self, role: str) -> List[str]:
        """Names of the sets with ``role`` (``near``, ``far``, ``csid``), in OpenOOD's order."""
        return [s for s, (r, _) in self.sets.items() if r == role]


def _bench(name: str, folder: str, download_name: str, num_classes: int, fmt: InputFormat, pre_size: int,
           ood_val: str, near: List[str], far: List[str], csid: List[str], large: bool) -> Benchmark:
    def img_dir(s: str) -> str:
        return LARGE if large and s != "textures" else CLASSIC  # ImageNet's Textures lie in images_classic/

    def lst(stem: str) -> str:
        return f"{LISTS}/{folder}/{stem}.txt"

    sets: Dict[str, Tuple[str, Dict[str, Tuple[str, str]]]] = {
        "id": ("id", {sp: (img_dir("id"), lst(f"{sp}_{folder}")) for sp in ("train", "val", "test")})}
    for role, names in (("near", near), ("far", far)):
        for s in names:
            sets[s] = (role, {"test": (img_dir(s), lst(f"test_{s}"))})
    sets[ood_val][1]["val"] = (img_dir(ood_val), lst(f"val_{ood_val}"))
    for s, stem in csid:
        sets[s] = ("csid", {"test": (img_dir(s), lst(stem))})
    return Benchmark(name, folder, download_name, num_classes, fmt, pre_size, sets, ood_val)


#: OpenOOD v1.5's DATA_INFO (``openood/evaluation_api/datasets.py``), benchmark name -> its lists
CATALOGUE: Dict[str, Benchmark] = {
    "cifar10": _bench("cifar10", "cifar10", "cifar-10", 10, CIFAR10_FORMAT, 32, "tin", ["cifar100", "tin"],
                      ["mnist", "svhn", "texture", "places365"],
                      # DATA_INFO also lists cinic10 (val_cinic10.txt) but not among its csid "datasets"
                      [("cifar10c", "test_cifar10c"), ("cinic10", "val_cinic10")], large=False),
    "cifar100": _bench("cifar100", "cifar100", "cifar-100", 100, CIFAR100_FORMAT, 32, "tin", ["cifar10", "tin"],
                       ["mnist", "svhn", "texture", "places365"], [], large=False),
    "imagenet200": _bench("imagenet200", "imagenet200", "imagenet-200", 200, IMAGENET_FORMAT, 256, "openimage_o",
                          ["ssb_hard", "ninco"], ["inaturalist", "textures", "openimage_o"],
                          [("imagenet_v2", "test_imagenet200_v2"), ("imagenet_c", "test_imagenet200_c"),
                           ("imagenet_r", "test_imagenet200_r")], large=True),
    "imagenet1k": _bench("imagenet1k", "imagenet", "imagenet-1k", 1000, IMAGENET_FORMAT, 256, "openimage_o",
                         ["ssb_hard", "ninco"], ["inaturalist", "textures", "openimage_o"],
                         [("imagenet_v2", "test_imagenet_v2"), ("imagenet_c", "test_imagenet_c"),
                          ("imagenet_r", "test_imagenet_r"), ("imagenet_es", "test_imagenet_es")], large=True),
}
#: sets OpenOOD's evaluation API uses in its csid protocol (cinic10 is in DATA_INFO but not used)
CSID_USED = {"cifar10": ("cifar10c",), "cifar100": (),
             "imagenet200": ("imagenet_v2", "imagenet_c", "imagenet_r"),
             "imagenet1k": ("imagenet_v2", "imagenet_c", "imagenet_r", "imagenet_es")}
NOT_RESIZED = ("imagenet_c",)  # OpenOOD's ImageNetCPreProcessor: ToTensor + Normalize only


def dataset_name(benchmark: str) -> str:
    """The registry name of ``benchmark`` (``cifar10`` -> ``openood_cifar10``)."""
    return f"openood_{benchmark}"


def _where(bench: Benchmark, name: str, set_: str, split: str) -> Tuple[str, str]:
    if not isinstance(set_, str) or set_ not in bench.sets:
        raise DatasetParamError("set", f"dataset {name!r}: set must be one of {sorted(bench.sets)}, got {set_!r}")
    role, splits = bench.sets[set_]
    if split not in splits:
        extra = (f"; the OOD validation set of this benchmark is set {bench.ood_val!r}, split val"
                 if split == "val" else "")
        raise DatasetParamError("split", f"dataset {name!r}: set {set_!r} has split(s) {sorted(splits)}, "
                                f"not {split!r}{extra}")
    return splits[split]


def _how(bench: Benchmark, root: Path, what: str) -> str:
    return (f"OpenOOD's scripts/download/download.py --contents datasets --datasets {bench.download_name} "
            f"--save_dir {root} (or its evaluation API's data_setup({str(root)!r}, "
            f"{'imagenet' if bench.name == 'imagenet1k' else bench.name!r})) puts {what} there "
            "(data root: params.root, else $OOD_SWEEP_DATA, else ~/.ood_sweep/data)")


def _first_entry(list_file: Path) -> Optional[str]:
    with open(list_file, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                return line.rstrip("\n").split(" ", 1)[0]
    return None


def _check_files(name: str, bench: Benchmark, root: Path, img_dir: str, list_rel: str) -> Tuple[Path, Path]:
    """``(list file, image folder)``; :class:`DataMissingError` naming what is missing and who puts it there.
    Cheap: reads the list's first line only and looks for that image and its data-set folder."""
    list_file, folder = root / list_rel, root / img_dir
    if not list_file.is_file():
        raise DataMissingError(name, list_file, _how(bench, root, f"the lists ({LISTS}/)"))
    first = _first_entry(list_file)
    if first is None:
        raise DataFileError(f"dataset {name!r}: image list {list_file} is empty")
    top = first.split("/", 1)[0]
    if not (folder / top).is_dir():
        raise DataMissingError(name, folder / top, _how(bench, root, f"the images of {top!r} ({img_dir}{top}/)"))
    if not (folder / first).is_file():
        raise DataMissingError(name, folder / first, f"the first image of {list_file} is not there; "
                               + _how(bench, root, f"the images of {top!r} ({img_dir}{top}/)"))
    return list_file, folder


@functools.lru_cache(maxsize=32)
def _read_list(list_file: str, mtime_ns: int) -> Tuple[Tuple[str, ...], np.ndarray]:
    """Relative paths and labels of an OpenOOD list (OpenOOD's parsing: first space separates the path; a dict
    after it means label 0)."""
    paths: List[str] = []
    labels: List[int] = []
    with open(list_file, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            tokens = line.split(" ", 1)
            if len(tokens) != 2:
                raise DataFileError(f"image list {list_file} line {n}: expected '<path> <label>', got {line!r}")
            if tokens[0].startswith("/"):
                raise DataFileError(f"image list {list_file} line {n}: absolute path {tokens[0]!r} "
                                    "(paths are relative to the image folder)")
            try:
                label = int(tokens[1])
            except ValueError:
                try:
                    extra = ast.literal_eval(tokens[1])
                except (ValueError, SyntaxError):
                    extra = None
                if not isinstance(extra, dict):
                    raise DataFileError(f"image list {list_file} line {n}: label {tokens[1]!r} is not an "
                                        "integer") from None
                label = 0
            paths.append(tokens[0])
            labels.append(label)
    return tuple(paths), np.asarray(labels, dtype=np.int64)


@contextlib.contextmanager
def _truncated_ok():
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def openood_transform(image, fmt: InputFormat, pre_size: Optional[int], path: str = "image") -> torch.Tensor:
    """OpenOOD's test-time preprocessing of a PIL image -> float32 ``(fmt.channels, S, S)``.

    ``Convert('RGB')``, ``Resize(pre_size)`` (shorter side to ``pre_size``, the longer to
    ``int(pre_size * long / short)``, PIL bilinear), ``CenterCrop(S)`` (offsets ``round((H - S) / 2)``),
    ``ToTensor`` (/255), ``Normalize(mean, std)``. ``pre_size=None``: no resize or crop (ImageNet-C); the image
    must then be ``S x S``. One channel formats take the ITU-R 601 luma of the RGB image.
    """
    from PIL import Image

    img = image.convert("RGB")
    size = fmt.image_size
    if pre_size is not None:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short != pre_size:
            new_short, new_long = pre_size, int(pre_size * long / short)
            img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BILINEAR)
        w, h = img.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    elif img.size != (size, size):
        raise DataFileError(f"image {path} is {img.size[0]}x{img.size[1]}; OpenOOD feeds this set unresized, "
                            f"so it must be {size}x{size}")
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    if fmt.channels == 1:
        x = to_gray(x[None])[0]
    mean = torch.tensor(fmt.mean).view(-1, 1, 1)
    std = torch.tensor(fmt.std).view(-1, 1, 1)
    return ((x - mean) / std).contiguous()


class ImageListDataset(Dataset):
    """Images named by an OpenOOD list, decoded on access with :func:`openood_transform`."""

    def __init__(self, folder: Path, paths, labels: np.ndarray, fmt: InputFormat, pre_size: Optional[int],
                 num_classes: int, name: str):
        self.folder, self.paths = Path(folder), paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.fmt, self.pre_size, self.num_classes, self.name = fmt, pre_size, num_classes, name

    @property
    def targets(self) -> np.ndarray:
        return self.labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        path = os.path.join(self.folder, self.paths[i])
        try:
            with _truncated_ok(), Image.open(path) as im:
                x = openood_transform(im, self.fmt, self.pre_size, path)
        except FileNotFoundError as exc:
            raise DataMissingError(self.name, path, "an image the list names is not there; re-run OpenOOD's "
                                   "download script for its data set") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            if isinstance(exc, DataFileError):
                raise
            raise ImageReadError(path, str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc
        return x, torch.tensor(self.labels[i], dtype=torch.int64)


def _pre_size(name: str, bench: Benchmark, fmt: InputFormat, pre_size) -> int:
    if pre_size is None:
        return int(round(fmt.image_size * bench.pre_size / bench.fmt.image_size))
    value = check_count(name, "pre_size", pre_size, minimum=1)
    if value < fmt.image_size:
        raise DatasetParamError("pre_size", f"dataset {name!r}: pre_size {value} is smaller than the crop "
                                f"{fmt.image_size}")
    return value


def _make(bench_name: str):
    bench = CATALOGUE[bench_name]
    name = dataset_name(bench_name)

    def check(*, split: str, fetch: bool = True, root: Optional[str] = None, set: str = "id",
              pre_size: Optional[int] = None, max_samples: Optional[int] = None) -> None:
        check_split(name, split)
        check_count(name, "max_samples", max_samples, allow_none=True, minimum=1)
        if pre_size is not None:
            check_count(name, "pre_size", pre_size, minimum=1)
        img_dir, list_rel = _where(bench, name, set, split)
        _check_files(f"{name}:{set}", bench, data_root(root), img_dir, list_rel)

    def build(*, split: str, fmt: InputFormat, seed: int, root: Optional[str] = None, set: str = "id",
              pre_size: Optional[int] = None, max_samples: Optional[int] = None) -> ImageListDataset:
        check(split=split, root=root, set=set, pre_size=pre_size, max_samples=max_samples)
        img_dir, list_rel = _where(bench, name, set, split)
        list_file, folder = _check_files(f"{name}:{set}", bench, data_root(root), img_dir, list_rel)
        paths, labels = _read_list(str(list_file), list_file.stat().st_mtime_ns)
        role = bench.sets[set][0]
        if role in ("near", "far") or (set == bench.ood_val and split == "val"):
            labels = np.full(len(paths), -1, dtype=np.int64)
        idx = subsample(np.arange(len(paths)), max_samples, seed, 0x0F00D)
        if len(idx) < len(paths):
            paths, labels = tuple(paths[i] for i in idx), labels[idx]
        resize_to = None if set in NOT_RESIZED else _pre_size(name, bench, fmt, pre_size)
        return ImageListDataset(folder, paths, labels, fmt, resize_to, bench.num_classes, f"{name}:{set}")

    build.__name__, check.__name__ = f"build_{name}", f"check_{name}"
    build.__doc__ = (f"OpenOOD v1.5's {bench_name} lists (see :mod:`ood_core.datasets.openood`); ``set`` picks the "
                     f"list: {', '.join(bench.sets)}")
    return build, check


BUILDERS = {b: _make(b) for b in CATALOGUE}


def resolve_lists(root: Optional[str], benchmark: str) -> Dict[str, Dict[str, Tuple[Path, Path]]]:
    """Every list of ``benchmark`` under the data root: ``{set: {split: (list file, image folder)}}`` (paths only,
    nothing read)."""
    bench = CATALOGUE[benchmark]
    base = data_root(root)
    return {s: {sp: (base / lst, base / d) for sp, (d, lst) in splits.items()} for s, (_r, splits) in bench.sets.items()}
