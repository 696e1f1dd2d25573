"""Planning: turn a validated config into stages with content-addressed cache keys.

A key is the sha256 of the canonical JSON of everything that determines a stage's output:

* backbone  = arch + params + training section + seed + ID data set and input format
* features  = backbone key + data set (name, split, params, seed) + extracted layers

so re-running a sweep reuses what is finished and a changed setting recomputes exactly what
it affects. Changing a detector or its search space changes no key: only the search reruns.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from orchestrator.config import BackboneConfig, DataSetConfig, SweepConfig
from orchestrator.errors import ConfigError

#: bump when training / extraction code changes what a stage produces
TRAIN_VERSION = 2  # 2: initial weights seeded from the backbone seed
EXTRACT_VERSION = 1


def content_key(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def join_uri(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


@dataclass
class DataSetJob:
    """One data set to extract, as the tasks need it (plain data, JSON-able)."""

    label: str  # display name, unique in the sweep
    role: str  # id_train / id_val / id_test / ood_val / near / far
    dataset: str
    split: str
    params: Dict
    seed: int

    def spec(self) -> Dict:
        return {"dataset": self.dataset, "split": self.split, "params": self.params, "seed": self.seed}


@dataclass
class FeatureJob:
    dataset: DataSetJob
    key: str
    uri: str


@dataclass
class BackbonePlan:
    name: str
    seed: int
    key: str
    arch: str
    params: Dict
    train: Dict
    checkpoint_uri: str
    features: List[FeatureJob] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}-s{self.seed}"


@dataclass
class SweepPlan:
    config: SweepConfig
    input_format: Dict
    num_classes: int
    layers: List[Dict]
    backbones: List[BackbonePlan]

    def datasets(self, backbone: BackbonePlan, role: Optional[str] = None) -> List[FeatureJob]:
        return [f for f in backbone.features if role is None or f.dataset.role == role]


def _layers(cfg: SweepConfig) -> List[Dict]:
    out = []
    for layer in cfg.extract.layers:
        if isinstance(layer, str):
            out.append({"name": layer, "module": None, "reduction": "avgpool"})  # a no-op on (N, D)
        else:
            if layer.module is None:  # logits / penultimate written as a mapping
                out.append({"name": layer.name, "module": None, "reduction": "avgpool"})
            else:
                out.append({"name": layer.name or layer.module, "module": layer.module, "reduction": layer.reduction})
    return out


def resolve_input_format(cfg: SweepConfig):
    """The ID input format: the data set's default, overridden by ``data.id.format``."""
    from ood_core.data import DATASETS, InputFormat

    entry = DATASETS[cfg.data.id.dataset]
    base = entry.default_format
    over = cfg.data.id.format
    if base is None and (over.channels is None or over.image_size is None or over.mean is None or over.std is None):
        raise ConfigError(f"data.id.format: {cfg.data.id.dataset!r} has no default format; give channels, image_size, mean, std")
    fmt = InputFormat(
        channels=over.channels or base.channels,
        image_size=over.image_size or base.image_size,
        mean=tuple(over.mean) if over.mean else tuple(base.mean),
        std=tuple(over.std) if over.std else tuple(base.std),
    )
    if len(fmt.mean) != fmt.channels or len(fmt.std) != fmt.channels:
        if over.mean is None and over.std is None and len(base.mean) == 1:
            fmt = InputFormat(fmt.channels, fmt.image_size, fmt.mean * fmt.channels, fmt.std * fmt.channels)
        else:
            raise ConfigError(f"data.id.format: mean and std need {fmt.channels} values (one per channel)")
    return fmt


def count_classes(cfg: SweepConfig, fmt) -> int:
    """Number of ID classes: ``classes`` when given, else the labels of the ID training split."""
    classes = cfg.data.id.params.get("classes")
    if classes:
        return len(classes)
    from ood_core.data import load_dataset

    ds = load_dataset(cfg.data.id.dataset, split="train", fmt=fmt, seed=cfg.seed, **cfg.data.id.params)
    num = getattr(ds, "num_classes", None)
    if num:
        return int(num)
    return int(ds.tensors[1].max()) + 1


def _check_modules(cfg: SweepConfig, fmt, num_classes: int, layers: List[Dict]) -> None:
    from ood_core.models import build_model

    for i, bb in enumerate(cfg.backbones):
        try:
            model = build_model(bb.arch, num_classes=num_classes, in_channels=fmt.channels,
                                image_size=fmt.image_size, **bb.params)
        except TypeError as exc:
            raise ConfigError(f"backbones[{i}].params: {exc}") from None
        modules = dict(model.named_modules())
        for j, layer in enumerate(layers):
            if layer["module"] and layer["module"] not in modules:
                known = ", ".join(n for n in modules if n)
                raise ConfigError(
                    f"extract.layers[{j}].module: {bb.arch} has no module {layer['module']!r}; known: {known}"
                )


def _dataset_jobs(cfg: SweepConfig) -> List[DataSetJob]:
    idd = cfg.data.id
    jobs = [
        DataSetJob(f"id-{split}", f"id_{split}", idd.dataset, split, dict(idd.params), cfg.seed)
        for split in ("train", "val", "test")
    ]

    def ood(ds: DataSetConfig, role: str) -> DataSetJob:
        return DataSetJob(ds.label, role, ds.dataset, ds.split, dict(ds.params), cfg.seed)

    jobs += [ood(ds, "ood_val") for ds in cfg.data.ood_val]
    jobs += [ood(ds, "near") for ds in cfg.data.ood_test.near]
    jobs += [ood(ds, "far") for ds in cfg.data.ood_test.far]
    return jobs


def backbone_key(cfg: SweepConfig, bb: BackboneConfig, seed: int, fmt) -> str:
    return content_key({
        "v": TRAIN_VERSION, "arch": bb.arch, "params": bb.params, "train": bb.train.model_dump(),
        "seed": seed, "id": {"dataset": cfg.data.id.dataset, "params": cfg.data.id.params, "split_seed": cfg.seed},
        "format": fmt.__dict__,
    })


def make_plan(cfg: SweepConfig) -> SweepPlan:
    fmt = resolve_input_format(cfg)
    num_classes = count_classes(cfg, fmt)
    layers = _layers(cfg)
    _check_modules(cfg, fmt, num_classes, layers)
    jobs = _dataset_jobs(cfg)
    backbones = []
    for bb in cfg.backbones:
        for seed in bb.seeds:
            key = backbone_key(cfg, bb, seed, fmt)
            plan = BackbonePlan(
                name=bb.name, seed=seed, key=key, arch=bb.arch, params=dict(bb.params),
                train=bb.train.model_dump(), checkpoint_uri=join_uri(cfg.storage, "checkpoints", f"{key}.pt"),
            )
            for job in jobs:
                fkey = content_key({"v": EXTRACT_VERSION, "backbone": key, "data": job.spec(),
                                    "format": fmt.__dict__, "layers": layers})
                plan.features.append(FeatureJob(job, fkey, join_uri(cfg.storage, "features", key, f"{fkey}.parquet")))
            backbones.append(plan)
    return SweepPlan(config=cfg, input_format=dict(fmt.__dict__), num_classes=num_classes, layers=layers,
                     backbones=backbones)
