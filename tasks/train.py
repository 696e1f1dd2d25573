"""Ray task: train one backbone (or reuse its content-addressed checkpoint, or load the user's)."""
from __future__ import annotations

import time
from typing import Dict

from tasks.runtime import input_format, setup_worker


def _load_outliers(specs, fmt):
    """The auxiliary outlier sets (``data.outliers``, as the plan put them in the train section), concatenated;
    only objectives that train on outliers get them (their labels are ignored)."""
    from torch.utils.data import ConcatDataset

    from ood_core.data import load_dataset

    sets = [load_dataset(s["dataset"], split=s["split"], fmt=fmt, seed=s["seed"], **s["params"]) for s in specs]
    return sets[0] if len(sets) == 1 else ConcatDataset(sets)


def train_backbone(backbone: Dict, num_classes: int, fmt: Dict, id_data: Dict) -> Dict:
    """Train ``backbone`` on the ID training split and save its checkpoint.

    ``backbone``: a plan entry (key, arch, params, train, seed, checkpoint_uri, label, and optionally
    ``checkpoint``: a user checkpoint to load instead of training; ``train["outliers"]``: the auxiliary outlier
    data sets an objective that needs them trains on (see ``orchestrator.plan.train_section``); ``neural_collapse_samples``: NC1-NC4 after
    every epoch on that many ID training images, 0 = off, see :class:`ood_core.neural_collapse.CollapseProbe`:
    they join the history as ``nc1`` ... ``nc4`` and ``nc_seconds``). Returns ``{"key", "sha256",
    "history", "cached", "seconds"}`` (plus ``source_checkpoint``, ``source_sha256`` and
    ``evaluation`` (ID val loss / accuracy) for a user checkpoint). A checkpoint at ``checkpoint_uri``
    whose content matches its recorded sha256 (``<checkpoint_uri>.sha256``) and that loads is reused:
    training is skipped and its stored history returned; a damaged one is set aside and retrained. Training
    writes a resume checkpoint (``checkpoint_uri + ".resume"``) every epoch and continues from it
    when the task is retried; it is removed once the final checkpoint is saved.
    """
    from ood_core import storage
    from ood_core.checkpoints import CheckpointError, load_checkpoint, load_user_checkpoint, save_checkpoint
    from ood_core.data import load_dataset
    from ood_core.models import build_model
    from ood_core.training import evaluate_classifier, make_train_config, train_classifier

    uri = backbone["checkpoint_uri"]
    check = storage.verify_cached(uri, "checkpoint", redo="retraining")
    if check.ok:
        try:
            _state, meta = load_checkpoint(uri)
            out = {"key": backbone["key"], "sha256": check.sha256,
                   "history": meta.get("history", []), "cached": True, "seconds": 0.0}
            for k in ("source_checkpoint", "source_sha256", "evaluation"):
                if k in meta:
                    out[k] = meta[k]
            return out
        except CheckpointError as exc:  # intact bytes that do not load (a foreign file): set aside, retrain
            check = storage.Cached(False, note=storage.discard_cached(uri, "checkpoint", str(exc), "retraining"))
    if check.note:  # the driver checked first; this sees only what changed since (another sweep's writes)
        print(f"[train] {backbone['label']}: {check.note}", flush=True)

    device = setup_worker()
    start = time.perf_counter()
    f = input_format(fmt)
    val_set = load_dataset(id_data["dataset"], split="val", fmt=f, seed=id_data["seed"], **id_data["params"])
    model = build_model(backbone["arch"], num_classes=num_classes, in_channels=f.channels, image_size=f.image_size,
                        seed=backbone["seed"], load_weights=not backbone.get("checkpoint"), **backbone["params"])
    meta = {"key": backbone["key"], "arch": backbone["arch"], "params": backbone["params"],
            "num_classes": num_classes, "format": fmt}

    if backbone.get("checkpoint"):
        info = load_user_checkpoint(backbone["checkpoint"], model, arch=backbone["arch"])  # CheckpointError
        evaluation = evaluate_classifier(model, val_set, device=device)
        meta.update(history=[], source_checkpoint=backbone["checkpoint"], source_sha256=info["sha256"],
                    evaluation=evaluation)
        sha = save_checkpoint(backbone["checkpoint_uri"], model.cpu(), meta, record_hash=True)
        return {"key": backbone["key"], "sha256": sha, "history": [], "cached": False,
                "seconds": time.perf_counter() - start, "source_checkpoint": backbone["checkpoint"],
                "source_sha256": info["sha256"], "evaluation": evaluation}

    train_set = load_dataset(id_data["dataset"], split="train", fmt=f, seed=id_data["seed"], **id_data["params"])
    train = dict(backbone["train"])
    nc_samples = int(train.pop("neural_collapse_samples", backbone.get("neural_collapse_samples", 0)) or 0)
    outlier_specs = train.pop("outliers", [])
    cfg = make_train_config(train.pop("recipe", None), **train)
    outlier_set = _load_outliers(outlier_specs, f) if outlier_specs else None
    resume_uri = backbone["checkpoint_uri"] + ".resume"
    probe = None
    if nc_samples:  # NC1-NC4 per epoch on a subset fixed by the sweep's seed: the same images for every backbone
        from ood_core.neural_collapse import CollapseProbe

        probe = CollapseProbe(train_set, nc_samples, seed=id_data["seed"], batch_size=max(256, cfg.batch_size))

    from tasks.progress import worker_progress

    cotrain = cfg.objective.get("cotrain_epochs", 0) if isinstance(cfg.objective, dict) else 0
    bar = worker_progress(cfg.epochs + int(cotrain), f"train {backbone['label']}", "epochs")

    def on_epoch(row):
        nc = f" nc1={row['nc1']:.3g}" if "nc1" in row else ""
        bar.set_description(f"train {backbone['label']} val_acc={row['val_acc']:.3f}{nc}")
        bar.update(1)

    history = train_classifier(model, train_set, val_set, cfg, seed=backbone["seed"], device=device,
                               on_epoch=on_epoch, resume_uri=resume_uri, input_format=f, probe=probe,
                               outlier_set=outlier_set)
    bar.close()
    # no timings in the checkpoint (equal cache keys mean equal bytes): nc_seconds stays in the logged history
    meta["history"] = [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in history]
    sha = save_checkpoint(backbone["checkpoint_uri"], model.cpu(), meta, record_hash=True)
    storage.remove(resume_uri)
    for uri in (backbone["checkpoint_uri"], resume_uri):  # outputs of writers killed with their node
        storage.remove_abandoned_outputs(uri, dead_writers_only=True)
    return {"key": backbone["key"], "sha256": sha, "history": history, "cached": False,
            "seconds": time.perf_counter() - start}
