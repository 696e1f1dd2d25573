"""Backbone training on a GPU: mixed precision + channels-last against plain float32, on real data.

    python benchmarks/gpu_training.py [--arch resnet18] [--dataset fashionmnist] [--root DIR]
                                      [--epochs 3] [--recipe openood_v1.5] [--batch-size N] [--modes amp fp32]

Trains the same backbone with the same seed and recipe (epochs overridden) once per mode through
:func:`ood_core.training.train_classifier` (``amp=True``: float16 autocast with a gradient scaler and
channels-last weights; ``amp=False``: float32) and prints, per mode, the mean epoch time after the first
epoch (cuDNN autotuning and allocator warm-up happen there), training images per second, the peak GPU
memory and the test accuracy of the kept checkpoint; then the speed-up of AMP over float32.
Needs a CUDA device (on CPU ``amp`` has no effect and the comparison is meaningless).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ood_core.data import load_dataset  # noqa: E402
from ood_core.datasets.base import InputFormat  # noqa: E402
from ood_core.models import build_model  # noqa: E402
from ood_core.training import evaluate_classifier, make_train_config, train_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--dataset", default="fashionmnist")
    ap.add_argument("--root", default=None, help="data root (default: the registry's search path)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--recipe", default="openood_v1.5")
    ap.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    ap.add_argument("--modes", nargs="+", default=["amp", "fp32"], choices=["amp", "fp32"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    fmt = InputFormat(1, 28, (0.2860,), (0.3530,))
    params = {"root": args.root} if args.root else {}
    train = load_dataset(args.dataset, split="train", fmt=fmt, seed=0, **params)
    val = load_dataset(args.dataset, split="val", fmt=fmt, seed=0, **params)
    test = load_dataset(args.dataset, split="test", fmt=fmt, seed=0, **params)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.arch} on {args.dataset} "
          f"(train {len(train)}, val {len(val)}, test {len(test)}), recipe {args.recipe}, {args.epochs} epochs"
          + (f", batch {args.batch_size}" if args.batch_size else ""))
    rows = {}
    for mode in args.modes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = build_model(args.arch, num_classes=10, in_channels=1, image_size=28, seed=0)
        cfg = make_train_config(args.recipe, epochs=args.epochs, amp=(mode == "amp"), batch_size=args.batch_size)
        start = time.perf_counter()
        history = train_classifier(model, train, val, cfg, seed=0, device="cuda", input_format=fmt)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        epoch_s = statistics.mean(h["time_s"] for h in history[1:]) if len(history) > 1 else history[0]["time_s"]
        acc = evaluate_classifier(model, test, device="cuda")["acc"]
        rows[mode] = epoch_s
        print(f"  {mode:5s} epoch {epoch_s:6.2f} s ({len(train) / epoch_s:8.0f} img/s)  total {total:6.1f} s  "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:5.2f} GiB  val acc {history[-1]['val_acc']:.4f}  "
              f"test acc {acc:.4f}  channels_last={model.conv1.weight.is_contiguous(memory_format=torch.channels_last)}")
    if {"amp", "fp32"} <= rows.keys():
        print(f"  AMP speed-up over float32: {rows['fp32'] / rows['amp']:.2f}x")


if __name__ == "__main__":
    main()
