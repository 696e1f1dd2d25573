"""Per-process runtime setup shared by the tasks: device choice, CPU threads, model loading."""
from __future__ import annotations

import functools
import os
from typing import Dict

import torch


def setup_worker() -> torch.device:
    """Use the GPU Ray assigned to this task (if any) and as many CPU threads as it reserved."""
    cpus = None
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # pragma: no cover - outside Ray
        cpus = None
    if cpus:
        torch.set_num_threads(max(1, int(round(cpus))))
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned, so cuda:0 is ours.
    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") != "":
        return torch.device("cuda", 0)
    return torch.device("cpu")


def input_format(fmt: Dict):
    from ood_core.data import InputFormat

    return InputFormat(fmt["channels"], fmt["image_size"], tuple(fmt["mean"]), tuple(fmt["std"]))


@functools.lru_cache(maxsize=8)
def _load_model_cached(checkpoint_uri: str, arch: str, params_json: str, num_classes: int, channels: int, size: int):
    import json

    from ood_core.checkpoints import load_checkpoint, load_into
    from ood_core.models import build_model

    model = build_model(arch, num_classes=num_classes, in_channels=channels, image_size=size, load_weights=False,
                        **json.loads(params_json))  # every weight comes from the checkpoint
    state, _meta = load_checkpoint(checkpoint_uri)
    load_into(model, state)
    return model.eval()


def load_backbone(backbone: Dict, num_classes: int, fmt: Dict):
    """The trained model of a backbone plan (cached per worker process)."""
    import json

    return _load_model_cached(backbone["checkpoint_uri"], backbone["arch"], json.dumps(backbone["params"], sort_keys=True),
                              num_classes, fmt["channels"], fmt["image_size"])
