"""train_classifier on the digits quickstart set (CPU)."""
import math
import numpy as np

import pytest
import torch

from ood_core.data import DATASETS, load_dataset
from ood_core.models import build_model
from ood_core.training import TrainConfig, evaluate_classifier, train_classifier

FMT = DATASETS["digits"].default_format
CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05)


@pytest.fixture(scope="module")
def digits():
    return (load_dataset("digits", split="train", fmt=FMT, seed=0),
            load_dataset("digits", split="val", fmt=FMT, seed=0))


def _run(digits, seed=0, cfg=CFG, **kw):
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=16, seed=seed)
    hist = train_classifier(model, digits[0], digits[1], cfg, seed=seed, device="cpu", **kw)
    return model, hist


def test_trains_to_high_accuracy_and_restores_best(digits):
    seen = []
    model, hist = _run(digits, on_epoch=seen.append)
    assert [r["epoch"] for r in hist] == [1, 2, 3] and seen == hist
    assert set(hist[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"}
    best = max(r["val_acc"] for r in hist)
    assert best > 0.8
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[0]["lr"] == pytest.approx(0.05) and hist[-1]["lr"] < hist[1]["lr"] < 0.05
    assert not model.training
    ev = evaluate_classifier(model, digits[1], device="cpu")
    assert ev["acc"] == pytest.approx(best)  # best-val weights restored


def test_deterministic_for_seed(digits):
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, schedule="cosine_epoch", label_smoothing=0.1)
    m1, h1 = _run(digits, seed=1, cfg=cfg)
    m2, h2 = _run(digits, seed=1, cfg=cfg)
    for a, b in zip(h1, h2):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert h1[1]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_config_validation_and_unlabelled(digits):
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    noise = load_dataset("uniform_noise", split="train", fmt=FMT, seed=0, n=8)
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=16, seed=0)
    with pytest.raises(ValueError, match="unlabelled"):
        train_classifier(model, noise, None, CFG, seed=0, device="cpu")


def test_no_val_set_keeps_last_weights(digits):
    small = torch.utils.data.Subset(digits[0], range(64))
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=16, seed=0)
    hist = train_classifier(model, small, None, TrainConfig(epochs=1, schedule="constant"), seed=0, device="cpu")
    assert len(hist) == 1 and math.isnan(hist[0]["val_acc"]) and hist[0]["lr"] == 0.05


def test_device_batches_follow_the_shuffling_dataloader_order():
    """The GPU-resident batches of an in-memory data set are the DataLoader's batches, epoch after epoch."""
    from torch.utils.data import DataLoader, TensorDataset

    from ood_core.training import DeviceBatches

    ds = TensorDataset(torch.arange(103, dtype=torch.float32)[:, None] * 2, torch.arange(103))
    loader = DataLoader(ds, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(3))
    ours = DeviceBatches(ds, 10, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert len(ours) == len(loader) == 11
    for _epoch in range(2):
        for (xa, ya), (xb, yb) in zip(loader, ours, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = DeviceBatches(ds, 50, torch.device("cpu"), None)
    assert [len(b[1]) for b in plain] == [50, 50, 3] and torch.equal(torch.cat([b[1] for b in plain]), ds.tensors[1])


def test_device_batches_of_raw_images_convert_like_the_dataset():
    from torch.utils.data import DataLoader

    from ood_core.datasets.base import ArrayImageDataset, InputFormat
    from ood_core.training import DeviceBatches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 1, 8, 8), dtype=np.uint8)
    fmt = InputFormat(3, 12, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))  # gray -> RGB, resized: conversion per batch
    ds = ArrayImageDataset(images, np.arange(5, 35), np.arange(30) % 3, fmt, 3, "raw")
    loader = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    ours = DeviceBatches(ds, 8, torch.device("cpu"), torch.Generator().manual_seed(1))
    for (xa, ya), (xb, yb) in zip(loader, ours, strict=True):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb)
