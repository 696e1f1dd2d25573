"""A fake OpenOOD v1.5 data root, checkpoints and leaderboard, written in OpenOOD's own formats.

Shared by the sweep-file tests (``test_sweep_files.py``) and the end-to-end script
(``benchmarks/openood_fake_root.py``): every image list of a benchmark (``benchmark_imglist/<bench>/*.txt``,
``<relative path> <label>`` lines) over a few small PNG and JPEG files in ``images_classic/`` or
``images_largescale/``; the checkpoints a shipped sweep names (OpenOOD's ``results/.../s{0,1,2}/best.ckpt``,
plain state_dicts with random weights under OpenOOD's key names; ImageNet-1K: torchvision's ResNet-50 file in
torch hub's cache); and a leaderboard CSV in the format of OpenOOD's leaderboard branch (``results/*.csv``).
Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import yaml
from PIL import Image

#: a leaderboard in OpenOOD's format: rows of its results/cifar10.csv as written there (values in %)
LEADERBOARD = """Training,Postprocessor,Near-OOD_AUROC,Far-OOD_AUROC,ID_Accuracy,Outlier_Data,Arch,Additional_Description
CrossEntropy,MSP,88.03 ± 0.25,90.73 ± 0.43,95.06 ± 0.30,No,ResNet18,100 epochs
CrossEntropy,KNN,90.64 ± 0.20,92.96 ± 0.14,95.06 ± 0.30,No,ResNet18,100 epochs
CrossEntropy,EBO,87.58 ± 0.46,91.21 ± 0.92,95.06 ± 0.30,No,ResNet18,100 epochs
CrossEntropy,MSP,76.02,85.23,76.18,No,ResNet50,torchvision ckpt
CrossEntropy,KNN,71.10,90.18,76.18,No,ResNet50,torchvision ckpt
CrossEntropy,EBO,75.89,89.47,76.18,No,ResNet50,torchvision ckpt
"""


def _image(path: Path, size, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(path)


def write_root(root: Path, bench: str, *, train_rows: int = 0, per_list: int = 4, size=(40, 36)) -> Path:
    """Every list of ``bench`` under ``root``, ``per_list`` rows each over PNG and JPEG files of ``size``; the ID
    train list ``max(train_rows, per_list)`` rows long (the same few files repeated, labels cycling through the
    classes) so that a KNN with ``k <= train_rows`` has its neighbours."""
    from ood_core.datasets import openood

    b = openood.CATALOGUE[bench]
    for k, (set_, splits) in enumerate(sorted(openood.resolve_lists(str(root), bench).items())):
        for j, (split, (lst, folder)) in enumerate(sorted(splits.items())):
            files = []
            for i in range(per_list):
                rel = f"{bench}_{set_}/{split}/img{i}{'.png' if i % 2 == 0 else '.jpg'}"
                _image(folder / rel, size, seed=1000 * k + 100 * j + i)
                files.append(rel)
            rows = max(train_rows, per_list) if (set_, split) == ("id", "train") else per_list
            lst.parent.mkdir(parents=True, exist_ok=True)
            lst.write_text("".join(f"{files[i % per_list]} {i % b.num_classes}\n" for i in range(rows)))
    return root


def _openood_state(arch: str, num_classes: int, seed: int) -> dict:
    """A random state_dict under the key names of OpenOOD's checkpoint for ``arch``."""
    import torch

    from ood_core.models import build_model

    if arch == "resnet18_32x32":  # OpenOOD's ResNet18_32x32: classifier ``fc``, no num_batches_tracked
        ours = build_model("resnet18", num_classes=num_classes, in_channels=3, image_size=32, seed=seed)
        return {("fc." + k[5:] if k.startswith("head.") else k): v for k, v in ours.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    import torchvision

    torch.manual_seed(seed)
    factory = {"resnet18_224x224": torchvision.models.resnet18, "resnet50_imagenet": torchvision.models.resnet50}
    return factory[arch](num_classes=num_classes).state_dict()  # torchvision's keys


def fake_checkpoints(path: Path, where: Path, *, real: bool = False, torch_home: Optional[Path] = None) -> List[str]:
    """The checkpoints and the leaderboard CSV a sweep file names by relative path, written under ``where`` (the
    sweep's working directory). ``real=False``: stand-in bytes (validate hashes checkpoints, never loads them);
    ``real=True``: loadable state_dicts with random weights under OpenOOD's names, and for a backbone with
    ``weights: imagenet`` torchvision's weights file in ``torch_home``'s hub cache (set ``$TORCH_HOME`` to it)."""
    import torch

    from ood_core.data import num_classes

    cfg = yaml.safe_load(path.read_text())
    classes = num_classes(cfg["data"]["id"]["dataset"])
    made = []
    for i, bb in enumerate(cfg["backbones"]):
        if bb.get("checkpoint") and not Path(bb["checkpoint"]).is_absolute():
            target = where / bb["checkpoint"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if real:
                torch.save(_openood_state(bb["arch"], classes, seed=i), target)
            else:
                target.write_bytes(b"not a real checkpoint")
            made.append(bb["checkpoint"])
        elif real and bb.get("params", {}).get("weights"):
            from ood_core.backbones.imagenet import _weights_enum

            url = _weights_enum(bb["arch"], bb["params"]["weights"]).url
            target = Path(torch_home) / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(_openood_state(bb["arch"], classes, seed=i), target)
            made.append(str(target))
    board = cfg.get("report", {}).get("leaderboard")
    if board and not Path(board).is_absolute():
        (where / board).parent.mkdir(parents=True, exist_ok=True)
        (where / board).write_text(LEADERBOARD, encoding="utf-8")
        made.append(board)
    return made


def largest_knn_k(path: Path) -> int:
    """The largest ``k`` a KNN-family detector of the sweep file may search or be given (0 without one)."""
    ks = [0]
    for det in yaml.safe_load(path.read_text())["detectors"]:
        ks += [int(det.get("params", {}).get("k", 0))]
        ks += [int(v) for v in (det.get("search", {}).get("k", {}) or {}).get("grid", [])]
    return max(ks)
