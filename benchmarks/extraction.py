"""Throughput of feature extraction vs a plain forward pass (target: ratio >= 0.90).

    python benchmarks/extraction.py [--model small_cnn|resnet18|resnet18_cifar] [--batch-size 256]
                                    [--n 4096] [--device cpu] [--repeats 3] [--threads 0] [--lir]

For the same model, data, batch size and device it times

(a) a plain inference loop: ``model.eval()``, ``torch.inference_mode()``, logits copied to the host;
(b) :func:`ood_core.hooks.extract_features` reading logits + penultimate + one intermediate layer
    (average-pooled) into a Parquet file in a temporary directory (``--lir`` adds the energy of every
    conv / batch-norm / linear layer, the LIR per-layer scores),

after a warm-up, alternating (a) and (b) ``--repeats`` times and keeping the best time of each, and prints
both throughputs and the ratio (b)/(a) (also the ratio of the medians and of the best CPU times, which say
more when other processes share the machine's cores).

Models: ``small_cnn`` (ood_core.models, 1x16x16 inputs), ``resnet18`` (torchvision, ImageNet stem,
3x32x32), ``resnet18_cifar`` (torchvision ResNet18 with the CIFAR stem: 3x3 stride-1 conv1, no max-pool).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ood_core.hooks import LayerSpec, energy_layer_specs, extract_features  # noqa: E402


def build(name: str, num_classes: int = 10):
    """(model, input shape, intermediate module) for a benchmark model name."""
    if name == "small_cnn":
        from ood_core.models import build_model

        return build_model("small_cnn", num_classes=num_classes, in_channels=1, image_size=16, seed=0), (1, 16, 16), "bn2"
    if name in ("resnet18", "resnet18_cifar"):
        import torchvision

        torch.manual_seed(0)
        m = torchvision.models.resnet18(num_classes=num_classes)
        if name == "resnet18_cifar":
            m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            m.maxpool = nn.Identity()
        m.head = m.fc  # the ood_core convention: model.head is the classifier (same module, two names)
        return m, (3, 32, 32), "layer2.0.bn1"
    raise SystemExit(f"unknown model {name!r}")


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t0):
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def plain_loop(model, loader, device):
    model.eval()
    t0 = _clock()
    with torch.inference_mode():
        for x, _ in loader:
            out = model(x.to(device, non_blocking=True))
            out.float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _since(t0)


def extract_loop(model, loader, layers, device, tmp):
    uri = os.path.join(tmp, "features.parquet")
    t0 = _clock()
    extract_features(model, loader, layers, uri, metadata={"dataset": "bench"}, device=device)
    out = _since(t0)
    os.remove(uri)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small_cnn", choices=["small_cnn", "resnet18", "resnet18_cifar"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--lir", action="store_true", help="also write the energy of every conv/bn/linear layer")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, shape, mid = build(args.model)
    model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.n, *shape, generator=g), torch.randint(0, 10, (args.n,), generator=g))
    loader = DataLoader(data, batch_size=args.batch_size, pin_memory=device.type == "cuda")
    layers = [LayerSpec("logits"), LayerSpec("penultimate"), LayerSpec(mid, mid, "avgpool")]
    if args.lir:
        layers += energy_layer_specs(model)

    warm = DataLoader(torch.utils.data.Subset(data, range(min(args.n, 2 * args.batch_size))), batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop(model, warm, device)
        extract_loop(model, warm, layers, device, tmp)
        a_runs, b_runs = [], []
        for r in range(args.repeats):  # alternate (ab, ba, ...), so slow phases of a shared machine hit both
            for which in ("ab" if r % 2 == 0 else "ba"):
                if which == "a":
                    a_runs.append(plain_loop(model, loader, device))
                else:
                    b_runs.append(extract_loop(model, loader, layers, device, tmp))
    best_a, best_b = min(w for w, _ in a_runs), min(w for w, _ in b_runs)
    cpu_a, cpu_b = min(c for _, c in a_runs), min(c for _, c in b_runs)
    tp_a, tp_b = args.n / best_a, args.n / best_b
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model={args.model} input={shape} batch={args.batch_size} n={args.n} device={device} "
          f"threads={torch.get_num_threads()} columns={len(layers)} load1={load:.2f}")
    print(f"(a) plain forward : {tp_a:10.1f} samples/s  (best of {args.repeats}: {best_a:.3f} s wall, {cpu_a:.3f} s CPU)")
    print(f"(b) extract+write : {tp_b:10.1f} samples/s  (best of {args.repeats}: {best_b:.3f} s wall, {cpu_b:.3f} s CPU)")
    ratio = tp_b / tp_a
    med = statistics.median(w for w, _ in a_runs) / statistics.median(w for w, _ in b_runs)
    print(f"ratio (b)/(a)     : {ratio:.3f}  (target >= 0.90: {'OK' if ratio >= 0.90 else 'BELOW'}); "
          f"ratio of medians {med:.3f}; CPU-time ratio {cpu_a / cpu_b:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
