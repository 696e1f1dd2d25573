"""Tiny data sets written in the real on-disk formats (for tests; nothing is downloaded).

CIFAR pickled batches, SVHN MATLAB files, MNIST idx files (gzipped or raw), image folders in the
DTD / Places365 / ODIN / TinyImageNet layouts. Pixel values encode (set, item) so tests can check
which image came back.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Dict, List

import numpy as np


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 50) -> Dict[str, np.ndarray]:
    """Five training batches of ``per_batch`` images and a test batch; returns the arrays written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    xs, ys = [], []
    for i in range(1, 6):
        x = cifar_images(per_batch, i)
        y = np.arange(per_batch) % 10
        xs.append(x), ys.append(y)
        with open(folder / f"data_batch_{i}", "wb") as f:  # the real files: dict of bytes keys, uint8 rows
            pickle.dump({b"batch_label": b"training batch", b"labels": y.tolist(), b"data": x.reshape(per_batch, -1),
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
    xt = cifar_images(n_test, 99)
    yt = np.arange(n_test) % 10
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": yt.tolist(), b"data": xt.reshape(n_test, -1)}, f, protocol=2)
    out["train_x"], out["train_y"] = np.concatenate(xs), np.concatenate(ys)
    out["test_x"], out["test_y"] = xt, yt
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return out


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, n, seed in (("train", n_train, 7), ("test", n_test, 8)):
        x = cifar_images(n, seed)
        y = np.arange(n) % 100
        with open(folder / part, "wb") as f:
            pickle.dump({"fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(), "data": x.reshape(n, -1)}, f)
        out[f"{part}_x"], out[f"{part}_y"] = x, y
    return out


def write_svhn(root: Path, n_train: int = 30, n_test: int = 40) -> Dict[str, np.ndarray]:
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        x = cifar_images(n, seed)  # (N, 3, 32, 32)
        y = np.arange(n) % 10
        stored = np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)  # SVHN stores 0 as 10
        savemat(str(folder / f"{part}_32x32.mat"), {"X": np.transpose(x, (2, 3, 1, 0)), "y": stored})
        out[f"{part}_x"], out[f"{part}_y"] = x, y
    return out


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 40, n_test: int = 30, gz: bool = True, seed: int = 0):
    """The four idx files of MNIST / FashionMNIST into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = gen.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            data = _idx(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[f"{prefix}_x"], out[f"{prefix}_y"] = x, y.astype(np.int64)
    return out


def write_images(folder: Path, n: int, size=(40, 30), seed: int = 0, ext: str = ".png", mode: str = "RGB") -> List[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        img = Image.fromarray(gen.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)
        p = folder / f"img_{seed}_{i:04d}{ext}"
        img.save(p)
        paths.append(p)
    return paths


def write_tinyimagenet(root: Path, wnids=("n01", "n02", "n03"), per_class: int = 6, n_val: int = 9) -> Path:
    base = root / "tiny-imagenet-200"
    (base / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        write_images(base / "train" / w / "images", per_class, size=(64, 64), seed=10 + k, ext=".JPEG")
    val = write_images(base / "val" / "images", n_val, size=(64, 64), seed=50, ext=".JPEG")
    lines = [f"{p.name}\t{wnids[i % len(wnids)]}\t0\t0\t63\t63" for i, p in enumerate(val)]
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_all(root: Path) -> None:
    """Every set the shipped sweep files name, tiny."""
    write_cifar10(root)
    write_cifar100(root)
    write_svhn(root)
    write_mnist(root / "MNIST" / "raw", seed=1)
    write_mnist(root / "FashionMNIST" / "raw", seed=2, gz=False)
    write_tinyimagenet(root)
    write_images(root / "dtd" / "dtd" / "images" / "banded", 5, size=(50, 40), seed=3, ext=".jpg")
    write_images(root / "places365" / "val_256", 5, size=(64, 64), seed=4, ext=".jpg")
