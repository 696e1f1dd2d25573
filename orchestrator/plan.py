"""Planning: turn a validated config into stages with content-addressed cache keys.

A key is the sha256 of the canonical JSON of everything that determines a stage's output:

* backbone  = arch + params + training section (its objective, and the auxiliary outliers when the objective
              trains on them) + seed + ID data set and input format
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
    role: str  # id_train / id_val / id_test / ood_val / near / far / outlier
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
    checkpoint: Optional[str] = None  # a user checkpoint loaded instead of training
    layers: List[Dict] = field(default_factory=list)
    features: List[FeatureJob] = field(default_factory=list)
    #: width of every extracted column (and ``feature_maps``), from the model's shapes
    widths: Dict[str, int] = field(default_factory=dict)
    #: detector label -> the search space it runs (the user's, or its default adapted to the data)
    searches: Dict[str, Dict] = field(default_factory=dict)

    @property
    def columns(self) -> List[str]:
        return [_column(l) for l in self.layers]

    @property
    def label(self) -> str:
        return f"{self.name}-s{self.seed}"


@dataclass
class SweepPlan:
    config: SweepConfig
    input_format: Dict
    num_classes: int
    backbones: List[BackbonePlan]
    #: ID training rows (None when the data are not on disk yet: ``validate`` on another machine)
    n_train: Optional[int] = None

    def datasets(self, backbone: BackbonePlan, role: Optional[str] = None) -> List[FeatureJob]:
        return [f for f in backbone.features if role is None or f.dataset.role == role]


def _layers(cfg: SweepConfig, model, arch: str) -> List[Dict]:
    """The extracted representations for one backbone: presets / type / pattern selectors expanded."""
    from ood_core.hooks import select_layers

    modules = dict(model.named_modules())
    out: List[Dict] = []
    for j, layer in enumerate(cfg.extract.layers):
        if isinstance(layer, str) or (layer.module is None and layer.name in ("logits", "penultimate")):
            name = layer if isinstance(layer, str) else layer.name
            out.append({"name": name, "module": None, "reduction": "avgpool"})  # avgpool: a no-op on (N, D)
            continue
        if layer.module is not None:
            if layer.module not in modules:
                known = ", ".join(n for n in modules if n)
                raise ConfigError(f"extract.layers[{j}].module: {arch} has no module {layer.module!r}; known: {known}")
            out.append({"name": layer.name or layer.module, "module": layer.module, "reduction": layer.reduction})
            continue
        names = select_layers(model, preset=layer.preset, types=layer.types, pattern=layer.pattern)
        if not names:
            raise ConfigError(f"extract.layers[{j}]: selects no module of {arch}")
        out += [{"name": n, "module": n, "reduction": layer.reduction} for n in names]
    seen = set()
    for layer in out:
        column = _column(layer)
        if column in seen:
            raise ConfigError(f"extract.layers: column {column!r} is extracted twice for {arch}")
        seen.add(column)
    return out


def _column(layer: Dict) -> str:
    from ood_core.hooks import LayerSpec

    return LayerSpec(**layer).column


def _check_detector_layers(cfg: SweepConfig, columns: List[str], arch: str) -> None:
    from ood_core.detectors.registry import get_spec

    for i, det in enumerate(cfg.detectors):
        if get_spec(det.type).representation != "layers":
            continue
        chosen = det.params.get("layers")
        if not chosen:
            raise ConfigError(f"detectors[{i}].params.layers: {det.type} needs the list of extracted columns to use")
        for j, col in enumerate([chosen] if isinstance(chosen, str) else chosen):
            if col not in columns:
                raise ConfigError(f"detectors[{i}].params.layers[{j}]: {col!r} is not extracted for {arch}; "
                                  f"extracted: {', '.join(columns)}")


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
    """Number of ID classes: known without the data (``classes``, the registry's count), else the labels
    of the ID training split."""
    from ood_core.data import load_dataset, num_classes

    known = num_classes(cfg.data.id.dataset, **cfg.data.id.params)
    if known:
        return int(known)

    ds = load_dataset(cfg.data.id.dataset, split="train", fmt=fmt, seed=cfg.seed, **cfg.data.id.params)
    num = getattr(ds, "num_classes", None)
    if num:
        return int(num)
    return int(ds.tensors[1].max()) + 1


def _build(cfg: SweepConfig, i: int, fmt, num_classes: int):
    from ood_core.models import build_model

    bb = cfg.backbones[i]
    try:
        return build_model(bb.arch, num_classes=num_classes, in_channels=fmt.channels, image_size=fmt.image_size,
                           load_weights=False, **bb.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"backbones[{i}].params: {exc}") from None


def id_train_rows(cfg: SweepConfig, fmt) -> Optional[int]:
    """Number of ID training rows, or None when the data set is not on disk (yet)."""
    from ood_core.data import load_dataset

    params = {k: v for k, v in cfg.data.id.params.items() if k != "download"}  # planning never downloads
    try:
        return len(load_dataset(cfg.data.id.dataset, split="train", fmt=fmt, seed=cfg.seed, **params))
    except FileNotFoundError:
        return None


def detector_data(cls: type, params: Dict, widths: Dict[str, int], num_classes: int,
                  n_train: Optional[int]) -> Dict[str, Optional[int]]:
    """What a detector's data-relative constraints are checked against: ``D`` (the width of what it reads),
    ``C``, ``N`` (ID training rows) and ``L`` (the layers it combines)."""
    rep = cls.representation
    width = {"logits": num_classes, "feature_maps": widths.get("feature_maps"), "layers": None}.get(
        rep, widths.get("penultimate"))
    layers = params.get("layers")
    n_layers = None if layers is None else (1 if isinstance(layers, str) else len(layers))
    return {"D": width, "C": num_classes, "N": n_train, "L": n_layers}


def resolve_searches(cfg: SweepConfig, widths: Dict[str, int], num_classes: int,
                     n_train: Optional[int], arch: str) -> Dict[str, Dict]:
    """Each detector's search space for one backbone (its default adapted to the data when the file gives
    none), with every reachable value checked against the data-relative constraints: a value that cannot
    fit the data stops the sweep here, before any training (ConfigError naming the field and the bound)."""
    from ood_core.detectors.registry import get_spec
    from orchestrator.config import check_detector_values, fitting_default_space

    out = {}
    for i, det in enumerate(cfg.detectors):
        cls = get_spec(det.type).cls
        if cls.representation == "feature_maps" and "feature_maps" not in widths:
            raise ConfigError(f"detectors[{i}].type: {cls.__name__} reads feature maps, but {arch} has no feature_maps()")
        data = detector_data(cls, det.params, widths, num_classes, n_train)
        if det.search is not None:
            space = det.search
        else:  # the default space, its grid values also cut to what the fixed parameters allow
            space = fitting_default_space(cls, det.params, cls.search_space(data), data)
        space = {k: v for k, v in space.items() if k not in det.params}
        check_detector_values(f"detectors[{i}]", cls, det.params, space, data)
        out[det.label] = space
    return out


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


def outlier_jobs(cfg: SweepConfig) -> List[DataSetJob]:
    """The auxiliary outlier sets (``data.outliers``): read by the detectors that train on them, never
    extracted or scored."""
    return [DataSetJob(ds.label, "outlier", ds.dataset, ds.split, dict(ds.params), cfg.seed)
            for ds in cfg.data.outliers]


def train_section(cfg: SweepConfig, bb: BackboneConfig) -> Dict:
    """The backbone's train section as the train task and the cache key see it: the objective is in it (left out
    for plain cross entropy, so older keys stand), and for an objective that trains on auxiliary outliers so are the
    ``data.outliers`` sets (``outliers``: their specs), refused here, before any compute, when there are none."""
    train = bb.train.model_dump()
    objective = bb.train.objective
    if objective.needs_outliers and not bb.checkpoint:
        if not cfg.data.outliers:
            i = next(i for i, b in enumerate(cfg.backbones) if b is bb)
            raise ConfigError(f"backbones[{i}].train.objective.name: {objective.name} trains on auxiliary outliers; "
                              "list them in data.outliers (disjoint from every OOD validation and test set)")
        train["outliers"] = [job.spec() for job in outlier_jobs(cfg)]
    return train


def check_objective_layers(cfg: SweepConfig, bb: BackboneConfig, model) -> None:
    """The layers an ``intermediate_energy`` objective names are modules of the backbone (ConfigError if not)."""
    layers = bb.train.objective.layers or []
    names = {n for n, _ in model.named_modules() if n}
    missing = [l for l in layers if l not in names]
    if missing:
        i = next(i for i, b in enumerate(cfg.backbones) if b is bb)
        raise ConfigError(f"backbones[{i}].train.objective.layers: {bb.arch} has no module {missing[0]!r}; "
                          f"modules include {sorted(names)[:20]}")


def backbone_key(cfg: SweepConfig, bb: BackboneConfig, seed: int, fmt) -> str:
    """Key of a trained backbone; a user checkpoint enters by its path and content hash."""
    source = None
    if bb.checkpoint:
        from ood_core import storage
        from ood_core.checkpoints import sha256_bytes

        if not storage.exists(bb.checkpoint):
            raise ConfigError(f"backbones: checkpoint {bb.checkpoint!r} does not exist")
        source = {"uri": bb.checkpoint, "sha256": sha256_bytes(storage.read_bytes(bb.checkpoint))}
    return content_key({
        "v": TRAIN_VERSION, "arch": bb.arch, "params": bb.params, "train": train_section(cfg, bb),
        "seed": seed, "id": {"dataset": cfg.data.id.dataset, "params": cfg.data.id.params, "split_seed": cfg.seed},
        "format": fmt.__dict__, **({"checkpoint": source} if source else {}),
    })


def check_inputs(cfg: SweepConfig, *, fetch: bool) -> List[str]:
    """Every data set and pretrained weight the sweep needs is there (``fetch``: download what can be).

    With ``fetch`` a missing input raises (``DataMissingError`` / ``WeightsMissingError``, one line);
    without it the problems are returned as warning lines (``validate`` on a machine without the data).
    """
    from ood_core.data import check_available
    from ood_core.models import check_weights_available

    sets = [(cfg.data.id.dataset, split, cfg.data.id.params) for split in ("train", "val", "test")]
    sets += [(d.dataset, d.split, d.params)
             for d in cfg.data.ood_val + cfg.data.ood_test.near + cfg.data.ood_test.far + cfg.data.outliers]
    problems = []
    for name, split, params in sets:
        try:
            check_available(name, split=split, fetch=fetch, **params)
        except FileNotFoundError as exc:
            if fetch:
                raise
            problems.append(str(exc))
    for bb in cfg.backbones:
        if bb.checkpoint:
            continue
        try:
            check_weights_available(bb.arch, fetch=fetch, **bb.params)
        except FileNotFoundError as exc:
            if fetch:
                raise
            problems.append(str(exc))
    return list(dict.fromkeys(problems))


def make_plan(cfg: SweepConfig) -> SweepPlan:
    from ood_core.hooks import LayerSpec, column_widths

    fmt = resolve_input_format(cfg)
    num_classes = count_classes(cfg, fmt)
    n_train = id_train_rows(cfg, fmt)
    jobs = _dataset_jobs(cfg)
    backbones = []
    for i, bb in enumerate(cfg.backbones):
        model = _build(cfg, i, fmt, num_classes)
        check_objective_layers(cfg, bb, model)
        layers = _layers(cfg, model, bb.arch)
        _check_detector_layers(cfg, [_column(l) for l in layers], bb.arch)
        widths = column_widths(model, [LayerSpec(**l) for l in layers], (fmt.channels, fmt.image_size, fmt.image_size))
        searches = resolve_searches(cfg, widths, num_classes, n_train, bb.arch)
        for seed in bb.seeds:
            key = backbone_key(cfg, bb, seed, fmt)
            plan = BackbonePlan(
                name=bb.name, seed=seed, key=key, arch=bb.arch, params=dict(bb.params), checkpoint=bb.checkpoint,
                train=train_section(cfg, bb), checkpoint_uri=join_uri(cfg.storage, "checkpoints", f"{key}.pt"),
                layers=layers, widths=widths, searches=searches,
            )
            for job in jobs:
                fkey = content_key({"v": EXTRACT_VERSION, "backbone": key, "data": job.spec(),
                                    "format": fmt.__dict__, "layers": layers,
                                    **({"dtype": cfg.extract.dtype} if cfg.extract.dtype != "float32" else {})})
                plan.features.append(FeatureJob(job, fkey, join_uri(cfg.storage, "features", key, f"{fkey}.parquet")))
            backbones.append(plan)
    return SweepPlan(config=cfg, input_format=dict(fmt.__dict__), num_classes=num_classes, backbones=backbones,
                     n_train=n_train)
