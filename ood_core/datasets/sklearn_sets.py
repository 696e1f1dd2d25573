"""Quickstart sets (offline, shipped with scikit-learn), returned as small ``TensorDataset``.

* ``digits``: the 1,797 8x8 UCI digits, stratified per class into train/val/test by
  ``fractions``; optional ``classes`` filter with labels remapped to their position in
  ``classes`` (each class is split with its own random stream, so the split of a class does
  not depend on which other classes are selected: ``classes=[0..4]`` as ID and
  ``classes=[5..9]`` as near-OOD never share an image).
* ``gaussian_noise`` (N(mean 0.5, std 0.25) clipped to [0, 1]) and ``uniform_noise``
  (U[0, 1]): ``n`` images per split, each split from its own random stream.
* ``sklearn_photos``: non-overlapping ``patch`` x ``patch`` tiles of the two sample photos
  (china.jpg, flower.jpg), shuffled by ``seed`` and split by ``fractions``.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .base import (DEFAULT_FRACTIONS, SPLITS, DatasetParamError, InputFormat, check_classes, check_count, check_fractions,
                   rng, take_split, tensor_dataset)


@functools.lru_cache(maxsize=1)
def digits_raw() -> Tuple[np.ndarray, np.ndarray]:
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
    fr = check_fractions("digits", fractions)
    classes = list(range(10)) if classes is None else check_classes("digits", classes, 10)
    images, target = digits_raw()
    idx, labels = [], []
    for pos, c in enumerate(classes):
        members = np.flatnonzero(target == c)
        chosen = take_split(members[rng(seed, 0, c).permutation(len(members))], split, fr)
        idx.append(np.sort(chosen))
        labels.append(np.full(len(chosen), pos, dtype=np.int64))
    order = np.concatenate(idx)
    x = torch.from_numpy(images[order].copy())
    ds = tensor_dataset(x, torch.from_numpy(np.concatenate(labels)), fmt)
    ds.num_classes = len(classes)
    return ds


def _noise(kind: int, split: str, fmt: InputFormat, seed: int, n: int) -> TensorDataset:
    n = check_count(("gaussian_noise", "uniform_noise")[kind], "n", n, minimum=1)
    gen = rng(seed, 1, kind, SPLITS.index(split))  # disjoint stream per (kind, split)
    shape = (int(n), fmt.channels, fmt.image_size, fmt.image_size)
    if kind == 0:
        x = np.clip(gen.normal(0.5, 0.25, size=shape), 0.0, 1.0)
    else:
        x = gen.uniform(0.0, 1.0, size=shape)
    return tensor_dataset(torch.from_numpy(x.astype(np.float32)), torch.full((int(n),), -1), fmt)


def build_gaussian_noise(*, split: str, fmt: InputFormat, seed: int, n: int = 500) -> TensorDataset:
    """``n`` images of i.i.d. N(mean 0.5, std 0.25) pixels clipped to [0, 1], unlabelled."""
    return _noise(0, split, fmt, seed, n)


def build_uniform_noise(*, split: str, fmt: InputFormat, seed: int, n: int = 500) -> TensorDataset:
    """``n`` images of i.i.d. U[0, 1] pixels, unlabelled."""
    return _noise(1, split, fmt, seed, n)


@functools.lru_cache(maxsize=4)
def photo_tiles(patch: int) -> np.ndarray:
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


def check_photo_patch(patch) -> int:
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer, float)) or int(patch) != patch \
            or not 2 <= patch <= 427:
        raise DatasetParamError("patch", f"dataset 'sklearn_photos': patch must be an integer in 2..427, got {patch!r}")
    return int(patch)


def build_sklearn_photos(*, split: str, fmt: InputFormat, seed: int, patch: int = 32,
                         fractions: Sequence[float] = DEFAULT_FRACTIONS) -> TensorDataset:
    """Non-overlapping ``patch`` tiles of scikit-learn's two sample photos, unlabelled."""
    fr = check_fractions("sklearn_photos", fractions)
    check_photo_patch(patch)
    tiles = photo_tiles(int(patch))
    chosen = take_split(rng(seed, 2).permutation(len(tiles)), split, fr)
    x = torch.from_numpy(tiles[chosen].astype(np.float32) / 255.0)
    return tensor_dataset(x, torch.full((len(chosen),), -1), fmt)


# mean / std of all 1,797 digits after /16 and bilinear upsampling 8x8 -> 16x16 (the
# `resize` in base), computed once with torch in float64: mean 0.30526, std 0.31895.
DIGITS_FORMAT = InputFormat(channels=1, image_size=16, mean=(0.3053,), std=(0.3189,))
