"""Ray Tune trial: fit a detector on cached ID-train features, score validation and test sets.

The trial sees only cached Parquet features (read once per worker process and kept in an LRU
cache, so with ``reuse_actors`` the files are read once per search, not once per trial).
Selection uses the validation metrics only; test metrics are reported alongside so that the
selected trial's test figures are what the sweep reports.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

import numpy as np

GROUPS = ("near", "far")


@functools.lru_cache(maxsize=64)
def _read(uri: str, columns: Tuple[str, ...]):
    from ood_core.feature_store import read_features

    return read_features(uri, columns=list(columns))


@functools.lru_cache(maxsize=8)
def _head(backbone_json: str, num_classes: int, fmt_json: str):
    import json

    from tasks.runtime import load_backbone

    model = load_backbone(json.loads(backbone_json), num_classes, json.loads(fmt_json))
    return model.head.weight.detach().clone(), model.head.bias.detach().clone()


def _reps(fs, columns, device):
    import torch

    reps = {c: torch.from_numpy(fs.columns[c]).to(device) for c in columns}
    reps["features"] = reps["penultimate"]  # the registry's name for penultimate features
    return reps


def _dataset(entry: Dict, fmt: Dict):
    from ood_core.data import load_dataset
    from tasks.runtime import input_format

    ds = entry["dataset"]
    return load_dataset(ds["dataset"], split=ds["split"], fmt=input_format(fmt), seed=ds["seed"], **ds["params"])


class _Outliers:
    """A data set whose labels all read -1: auxiliary outliers in a training loader (pytorch-ood's convention)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        import torch

        return self.data[i][0], torch.tensor(-1)


def _loader(entry: Dict, fmt: Dict, batch_size: int, device, outliers=()):
    """Loader over one data set; with ``outliers`` (entries), those follow it with label -1."""
    import torch

    data = _dataset(entry, fmt)
    if outliers:
        data = torch.utils.data.ConcatDataset([data, *(_Outliers(_dataset(o, fmt)) for o in outliers)])
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")


def _model_scores(context: Dict, det, spec, device) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Detectors that need the network: run it over every data set (inputs, not cached features).

    ``"model"`` detectors get the network itself (ODIN, GradNorm, MCD, ...); ``"feature_maps"``
    detectors get ``model.feature_maps(x)``, the maps the classifier pools (RankFeat).
    """
    import torch

    from tasks.runtime import load_backbone

    model = load_backbone(context["backbone"], context["num_classes"], context["format"]).to(device).eval()
    in_loop = spec.representation == "model"
    if in_loop:
        det.model = model
    else:
        if not hasattr(model, "feature_maps"):
            raise ValueError(f"{spec.name} needs feature maps, but {context['backbone']['arch']} has no feature_maps()")
    batch = context.get("batch_size", 256)
    sets = context["sets"]
    if det.requires_fit:
        train = _loader(sets["id-train"], context["format"], batch, device, context.get("outliers", ()))
        if in_loop:
            det.fit(train)
        else:
            with torch.no_grad():
                maps, ys = zip(*[(model.feature_maps(x.to(device)), y) for x, y in train])
            det.fit_feature_maps(torch.cat(maps), torch.cat(ys).to(device))
    scores, labels = {}, {}
    for label, entry in sets.items():
        if entry["role"] == "id_train":
            continue
        out, ys = [], []
        for x, y in _loader(entry, context["format"], batch, device):
            x = x.to(device)
            if in_loop:
                out.append(det.predict(x).detach())
            else:
                with torch.no_grad():
                    out.append(det.predict_feature_maps(model.feature_maps(x)))
            ys.append(y)
        scores[label] = torch.cat(out).float().cpu().numpy()
        labels[label] = torch.cat(ys).numpy()
    return scores, labels


def score_detector_on_sets(context: Dict, params: Dict) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Fit the detector with ``params`` on ID train; return ``(scores by set label, labels by set label)``.

    Representation detectors work on the cached Parquet features; detectors that need the network
    (``"model"``, ``"feature_maps"``) run it over the data sets. Multi-layer detectors with a
    validation-time choice (per-layer signs of ``LayerEnergyAggregate``) make it on ID val + OOD val.
    """
    import json

    import torch

    from ood_core.detectors.registry import build_detector, detector_params, fit_detector, get_spec, score_detector
    from tasks.runtime import setup_worker

    device = setup_worker()
    spec = get_spec(context["detector"])
    params = {**context["fixed"], **params}
    if "norm_std" in detector_params(spec.name) and "norm_std" not in params:
        params["norm_std"] = list(context["format"]["std"])  # gradient steps in pixel units
    head = None
    if spec.needs_head:
        head = _head(json.dumps(context["backbone"], sort_keys=True), context["num_classes"],
                     json.dumps(context["format"], sort_keys=True))
        head = tuple(t.to(device) for t in head)
    det = build_detector(spec.name, params, head=head)
    if spec.representation in ("model", "feature_maps"):
        return _model_scores(context, det, spec, device)
    columns = tuple(context["columns"])
    sets = context["sets"]
    train = _read(sets["id-train"]["uri"], columns)
    with torch.no_grad():
        fit_detector(det, _reps(train, columns, device), torch.from_numpy(train.labels).to(device))
        if hasattr(det, "select_signs"):
            ood_val = [_reps(_read(e["uri"], columns), columns, device) for e in sets.values() if e["role"] == "ood_val"]
            merged = {k: torch.cat([r[k] for r in ood_val]) for k in ood_val[0]}
            det.select_signs(_reps(_read(sets["id-val"]["uri"], columns), columns, device), merged)
    scores, labels = {}, {}
    for label, entry in sets.items():
        if entry["role"] == "id_train":
            continue
        fs = _read(entry["uri"], columns)
        with torch.no_grad():
            reps = _reps(fs, columns, device)
            if hasattr(det, "predict_with_exits"):  # early exit: keep where each sample stopped
                s, exits = det.predict_with_exits(reps)
                labels[f"exit:{label}"] = exits.cpu().numpy()
                scores[label] = s.float().cpu().numpy()
            else:
                scores[label] = score_detector(det, reps).float().cpu().numpy()
        labels[label] = fs.labels
    return scores, labels


def evaluate_scores(context: Dict, scores: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Validation metrics (ID val vs each OOD val set, averaged) and test metrics per set and group."""
    from ood_core.metrics import ood_metrics

    sets = context["sets"]
    out: Dict[str, float] = {}
    val = [ood_metrics(scores["id-val"], scores[l]) for l, e in sets.items() if e["role"] == "ood_val"]
    for m in val[0]:
        out[f"val_{m}"] = float(np.mean([v[m] for v in val]))
    by_group: Dict[str, List[Dict[str, float]]] = {g: [] for g in GROUPS}
    for label, entry in sets.items():
        if entry["role"] in GROUPS:
            res = ood_metrics(scores["id-test"], scores[label])
            by_group[entry["role"]].append(res)
            for m, v in res.items():
                out[f"test/{label}/{m}"] = float(v)
    for group, results in by_group.items():
        for m in (results[0] if results else {}):
            out[f"{group}/{m}"] = float(np.mean([r[m] for r in results]))
    return out


def entry_of(config: Dict) -> Tuple[str, Dict]:
    """``(entry key, detector hyperparameters)`` of a trial config.

    Grid / random search passes ``{"entry": {"key", "params"}}``; Optuna's define-by-run space passes
    ``{"entry": {"key"}}`` plus flat sampled values, list elements named ``name[i]``.
    """
    entry = config["entry"]
    if "params" in entry:
        return entry["key"], dict(entry["params"])
    params: Dict = {}
    lists: Dict[str, Dict[int, object]] = {}
    for name, value in config.items():
        if name == "entry":
            continue
        if name.endswith("]") and "[" in name:
            base, index = name[:-1].split("[", 1)
            lists.setdefault(base, {})[int(index)] = value
        else:
            params[name] = value
    for base, items in lists.items():
        params[base] = [items[i] for i in sorted(items)]
    return entry["key"], params


def tune_trial(config: Dict, contexts: Dict[str, Dict]) -> None:
    """Tune function trainable: one (backbone, detector, hyperparameters) point, reported once.

    ``config["entry"]`` = ``{"key": ..., "params": {...}}``; ``contexts[key]`` says which detector,
    backbone and cached feature files the key stands for.
    """
    from ray import tune

    key, params = entry_of(config)
    context = contexts[key]
    scores, _labels = score_detector_on_sets(context, params)
    tune.report(evaluate_scores(context, scores))


def final_scores(context: Dict, params: Dict, uri: str) -> str:
    """Score the selected configuration on ID test and every OOD test set; store them at ``uri``.

    The file is Parquet with columns ``set`` (data set label) and ``score`` (float32).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ood_core import storage

    scores, labels = score_detector_on_sets(context, params)
    keep = ["id-test"] + [l for l, e in context["sets"].items() if e["role"] in GROUPS]
    columns = {
        "set": pa.array([k for k in keep for _ in range(len(scores[k]))], pa.string()),
        "score": pa.array(np.concatenate([scores[k] for k in keep]).astype(np.float32)),
    }
    if f"exit:{keep[0]}" in labels:  # the layer at which each sample exited (early-exit detectors)
        columns["exit_layer"] = pa.array(np.concatenate([labels[f"exit:{k}"] for k in keep]).astype(np.int16))
    table = pa.table(columns)
    with storage.atomic_output(uri) as f:
        pq.write_table(table, f)
    return uri


def load_exits(uri: str) -> Dict[str, np.ndarray]:
    """Per-set exit layers written by :func:`final_scores` for early-exit detectors (empty otherwise)."""
    import pyarrow.parquet as pq

    from ood_core import storage

    with storage.open_input(uri) as f:
        table = pq.read_table(f)
    if "exit_layer" not in table.column_names:
        return {}
    sets = table.column("set").to_numpy(zero_copy_only=False)
    exits = table.column("exit_layer").to_numpy()
    return {name: exits[sets == name] for name in dict.fromkeys(sets)}


def load_scores(uri: str) -> Dict[str, np.ndarray]:
    """The per-set scores written by :func:`final_scores`, in file order."""
    import pyarrow.parquet as pq

    from ood_core import storage

    with storage.open_input(uri) as f:
        table = pq.read_table(f)
    sets = table.column("set").to_numpy(zero_copy_only=False)
    score = table.column("score").to_numpy()
    out: Dict[str, np.ndarray] = {}
    for name in dict.fromkeys(sets):
        out[name] = score[sets == name]
    return out


def backbone_accuracy(uri: str) -> float:
    """ID test accuracy of the backbone from its cached logits."""
    from ood_core.metrics import accuracy

    fs = _read(uri, ("logits",))
    return float(accuracy(fs.columns["logits"], fs.labels))
