"""Ray Tune trial: fit a detector on cached ID-train features and score the validation sets; the selected
configuration is then scored on the test sets once (:func:`final_scores`).

The trial sees only cached Parquet features, mapped from the node's one decoded copy of each file
(:func:`ood_core.feature_map.map_features`: every trial process on a node shares its pages, whatever the
concurrency); a detector that fits from a stream reads the training set in chunks (:class:`ood_core.rows.RowSource`),
so a fit holds no second full copy of it. What a searched value does not change
is fitted once per worker: a fitted detector is kept per (feature files, detector, structural hyperparameters),
and a trial that changes only hyperparameters declared ``structural=False`` (KNN's k, ODIN's temperature, ...)
sets them on it instead of fitting again. Selection uses the validation metrics only.
"""
from __future__ import annotations

import collections
import functools
from typing import Dict, List, Optional, Tuple

import numpy as np

GROUPS = ("near", "far")


@functools.lru_cache(maxsize=64)
def _read(uri: str, columns: Tuple[str, ...]):
    from ood_core.feature_map import map_features

    return map_features(uri, columns=list(columns))


@functools.lru_cache(maxsize=8)
def _head(backbone_json: str, num_classes: int, fmt_json: str):
    """The backbone's classifier head ``(w, b)``, read from its checkpoint's state dict alone where that holds
    ``head.weight`` / ``head.bias`` of ``num_classes`` rows, as every model of :mod:`ood_core.models` saves it:
    a head-based trial then holds two tensors, not the whole backbone (a ResNet-50 is ~100 MB per trial process).
    Otherwise the head of the built model."""
    import json

    from ood_core.checkpoints import load_checkpoint
    from tasks.runtime import load_backbone

    backbone = json.loads(backbone_json)
    state, _meta = load_checkpoint(backbone["checkpoint_uri"])
    w, b = state.get("head.weight"), state.get("head.bias")
    if w is not None and b is not None and w.ndim == 2 and w.shape[0] == num_classes and b.shape == (num_classes,):
        return w.detach().clone(), b.detach().clone()
    del state, w, b
    model = load_backbone(backbone, num_classes, json.loads(fmt_json))
    return model.head.weight.detach().clone(), model.head.bias.detach().clone()


def _reps(fs, columns, device):
    """Float32 tensors of the columns (views of the mapped copy where it is float32 on the CPU)."""
    import torch

    reps = {c: torch.from_numpy(fs.columns[c]).to(device=device, dtype=torch.float32) for c in columns}
    reps["features"] = reps["penultimate"]  # the registry's name for penultimate features
    return reps


def _rows(fs, columns, device, uri: str):
    """The training set as a :class:`~ood_core.rows.RowSource` over the mapped columns (streamed fits); the
    statistics several fits need are computed once per machine (:func:`ood_core.feature_map.shared_value`)."""
    from ood_core.feature_map import shared_value
    from ood_core.rows import RowSource

    return RowSource({c: fs.columns[c] for c in columns}, fs.labels, device=device,
                     aliases={"features": "penultimate"},
                     share=lambda key, compute: shared_value(uri, f"{key}@{device}", compute))


def _dataset(entry: Dict, fmt: Dict):
    from ood_core.data import load_dataset
    from tasks.runtime import input_format

    ds = entry["dataset"]
    return load_dataset(ds["dataset"], split=ds["split"], fmt=input_format(fmt), seed=ds["seed"], **ds["params"])


def _loader(entry: Dict, fmt: Dict, batch_size: int, device, outliers=()):
    """Loader over one data set; with ``outliers`` (entries), those follow it with label -1."""
    import torch

    from ood_core.data import AsOutliers

    data = _dataset(entry, fmt)
    if outliers:
        data = torch.utils.data.ConcatDataset([data, *(AsOutliers(_dataset(o, fmt)) for o in outliers)])
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")


def _eval_sets(context: Dict, det, device, roles: Optional[Tuple[str, ...]] = None) -> Dict:
    """The sweep's data sets in the form the detector reads: cached Parquet features, or loaders of inputs.
    With ``roles``, only the sets the protocol needs for them (the training set, the validation sets when the
    detector chooses on them, and those roles) are read."""
    import torch

    from ood_core.evaluation import CACHED, ID_TRAIN, ID_VAL, OOD_VAL, EvalSet

    columns = tuple(context["columns"])
    fit_role = _fit_role(context)
    needed = None if roles is None else {fit_role, *roles, *((ID_VAL, OOD_VAL) if det.uses_validation else ())}
    out = {}
    for label, entry in context["sets"].items():
        role = entry["role"]
        if (needed is not None and role not in needed) or (role == ID_TRAIN != fit_role):
            continue
        # the set the detector is fitted on enters the protocol as its training set; fitted on ID val, that set
        # is also scored as ID val (OpenOOD's protocol for these methods)
        as_roles = [role] + ([ID_TRAIN] if role == fit_role != ID_TRAIN else [])
        for r in as_roles:
            key = label if r == role else f"{label}:fit"
            if det.representation in CACHED:
                fs = _read(entry["uri"], columns)
                labels = torch.from_numpy(fs.labels).to(device)
                if r == ID_TRAIN and det.representation in ("logits", "features"):  # read as the fit needs it
                    out[key] = EvalSet(r, _rows(fs, columns, device, entry["uri"]), labels)
                else:
                    out[key] = EvalSet(r, _reps(fs, columns, device), labels)
            else:
                outliers = context.get("outliers", ()) if r == ID_TRAIN else ()
                out[key] = EvalSet(r, _loader(entry, context["format"], context.get("batch_size", 256), device,
                                              outliers))
    return out


def _fit_role(context: Dict) -> str:
    """The role of the set the detector is fitted on: ``fit_on: val`` fits on ID val, else ID train."""
    return "id_val" if context.get("fit_on", "train") == "val" else "id_train"


@functools.lru_cache(maxsize=2)
def _model(backbone_json: str, num_classes: int, fmt_json: str, device: str):
    """The backbone in eval mode on ``device``, loaded once per worker (model-in-the-loop detectors)."""
    import json

    from tasks.runtime import load_backbone

    return load_backbone(json.loads(backbone_json), num_classes, json.loads(fmt_json)).to(device).eval()


#: fitted detectors of this worker, most recent last: (fit key, detector); a few, so memory stays bounded
_FITTED: "collections.OrderedDict[str, object]" = collections.OrderedDict()
_KEEP_FITTED = 2


def _fit_key(context: Dict, spec, params: Dict) -> str:
    """What a fit depends on: the training inputs, the backbone, the detector and its structural values."""
    import json

    train = [e.get("uri") or e["dataset"] for e in context["sets"].values() if e["role"] == _fit_role(context)]
    structural = {k: v for k, v in params.items() if spec.cls.structural(k)}
    return json.dumps([spec.name, context["backbone"]["key"], train, context.get("outliers", []), structural],
                      sort_keys=True, default=repr)


def approximation_metrics(det, sets: Dict) -> Dict[str, float]:
    """What an approximate search cost in accuracy, measured: a memory bank searched with an IVF index reports
    its recall@k on held-out bank rows (``val_ivf_recall_id``) and on the OOD validation features
    (``val_ivf_recall_ood``), where a missed neighbour raises the score; nothing for exact detectors."""
    import torch

    if getattr(det, "index", "exact") != "ivf":
        return {}
    ood = [s.data["features"] for s in sets.values() if s.role == "ood_val" and isinstance(s.data, dict)]
    out = {"val_ivf_recall_id": float(det.recall_)}
    if ood:
        out["val_ivf_recall_ood"] = float(det.recall_on(torch.cat(ood)))
    return out


def score_detector_on_sets(context: Dict, params: Dict, roles: Optional[Tuple[str, ...]] = None,
                           diagnostics: Optional[Dict[str, float]] = None
                           ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Fit the detector with ``params`` (or reuse this worker's fit of the same structural values) and score
    the sets whose role is in ``roles`` (all by default) through the protocol of :mod:`ood_core.evaluation`;
    return ``(scores by set label, labels by set label)`` (``exit:<label>``: early-exit detectors' exit layers).
    ``diagnostics``, when given, receives :func:`approximation_metrics`."""
    import json

    from ood_core.detectors.registry import build_detector, detector_params, get_spec
    from ood_core.evaluation import CACHED, run_protocol
    from tasks.runtime import setup_worker

    device = setup_worker()
    spec = get_spec(context["detector"])
    params = {**context["fixed"], **params}
    if "norm_std" in detector_params(spec.name) and "norm_std" not in params:
        params["norm_std"] = list(context["format"]["std"])  # gradient steps in pixel units
    key = _fit_key(context, spec, params)
    det = _FITTED.pop(key, None)
    reused = det is not None
    if reused:  # fitted for the same structural values: set the others, keep the fit
        det.set_params(**{k: v for k, v in params.items() if not spec.cls.structural(k)})
    else:
        head = None
        if spec.needs_head:
            head = _head(json.dumps(context["backbone"], sort_keys=True), context["num_classes"],
                         json.dumps(context["format"], sort_keys=True))
            head = tuple(t.to(device) for t in head)
        det = build_detector(spec.name, params, head=head)
    model = None
    if det.representation not in CACHED:
        model = _model(json.dumps(context["backbone"], sort_keys=True), context["num_classes"],
                       json.dumps(context["format"], sort_keys=True), str(device))
    sets = _eval_sets(context, det, device, roles)
    results = run_protocol(det, sets, model=model, device=device,
                           score_roles=None if roles is None else roles.__contains__, fitted=reused)
    if diagnostics is not None:
        diagnostics.update(approximation_metrics(det, sets))
    _FITTED[key] = det
    while len(_FITTED) > _KEEP_FITTED:
        _FITTED.popitem(last=False)
    scores = {label: r.scores for label, r in results.items()}
    labels = {label: r.labels for label, r in results.items()}
    for label, r in results.items():
        if "exit_layer" in r.details:
            labels[f"exit:{label}"] = r.details["exit_layer"]
    return scores, labels


#: the roles a trial scores (selection needs nothing else) and those the selected configuration is tested on
VALIDATION_ROLES = ("id_val", "ood_val")
TEST_ROLES = ("id_test", *GROUPS)


def is_test_metric(name: str) -> bool:
    """Whether a metric name is one of :func:`test_metrics`' (``test/<set>/...``, ``near/...``, ``far/...``)."""
    return name.startswith(tuple(f"{g}/" for g in ("test", *GROUPS)))


def validation_metrics(context: Dict, scores: Dict[str, np.ndarray]) -> Dict[str, float]:
    """``val_<metric>``: ID val against each OOD val set, averaged over the OOD val sets."""
    from ood_core.metrics import ood_metrics

    val = [ood_metrics(scores["id-val"], scores[l]) for l, e in context["sets"].items() if e["role"] == "ood_val"]
    return {f"val_{m}": float(np.mean([v[m] for v in val])) for m in val[0]}


def test_metrics(context: Dict, scores: Dict[str, np.ndarray]) -> Dict[str, float]:
    """``test/<set>/<metric>`` (ID test against each OOD test set) and ``<group>/<metric>`` (their mean per
    group, near and far)."""
    from ood_core.metrics import ood_metrics

    out: Dict[str, float] = {}
    by_group: Dict[str, List[Dict[str, float]]] = {g: [] for g in GROUPS}
    for label, entry in context["sets"].items():
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


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (the first line of the message), for tables and tags."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def constant(scores: Dict[str, np.ndarray]) -> bool:
    """Whether every score of every set is the same value: a detector that cannot rank anything."""
    values = np.concatenate([np.asarray(v, np.float64).ravel() for v in scores.values()])
    return values.size > 1 and bool(np.ptp(values) == 0)


def tune_trial(config: Dict, contexts: Dict[str, Dict]) -> None:
    """Tune function trainable: one (backbone, detector, hyperparameters) point, reported once.

    ``config["entry"]`` = ``{"key": ..., "params": {...}}``; ``contexts[key]`` says which detector,
    backbone and cached feature files the key stands for. An exception raised by the detector or the
    protocol is deterministic (the same inputs fail the same way): it is reported as the trial's result
    (``trial_error``: one line; ``trial_traceback``), so Tune does not retry it and the sweep records it;
    Tune retries only trials whose worker was lost.
    """
    import traceback

    from ray import tune

    key, params = entry_of(config)
    context = contexts[key]
    every = context.get("score_test_every_trial", False)
    try:
        diagnostics: Dict[str, float] = {}
        scores, _labels = score_detector_on_sets(context, params, VALIDATION_ROLES + (TEST_ROLES if every else ()),
                                                 diagnostics)
        metrics = {**validation_metrics(context, scores), **(test_metrics(context, scores) if every else {}),
                   **diagnostics}
    except Exception as exc:  # noqa: BLE001 - reported, not retried
        _complete_search(context, key, config["entry"].get("index"), params, None)
        tune.report({"trial_error": one_line(exc), "trial_traceback": traceback.format_exc()})
        return
    _complete_search(context, key, config["entry"].get("index"), params, metrics)
    tune.report(metrics)


def _complete_search(context: Dict, key: str, index: Optional[int], params: Dict, metrics: Optional[Dict]) -> None:
    """Tell the search's ledger (:mod:`tasks.selection`) this trial's result; the trial that completes the
    search scores the selected configuration on the test sets, here, in this warm worker."""
    import traceback

    import ray

    ledger = context.get("ledger")
    if ledger is None or index is None:
        return
    try:
        claim = ray.get(ledger.record.remote(key, index, params, metrics))
    except ray.exceptions.RayError:  # the ledger's node was lost: the sweep's test stage tests the selection
        return
    if claim is None:
        return
    try:
        result = {"metrics": final_scores(context, claim["params"], context["scores_uri"])}
    except Exception as exc:  # noqa: BLE001 - the sweep records it as the search's test failure
        result = {"error": one_line(exc), "traceback": traceback.format_exc()}
    try:
        ray.get(ledger.finish.remote(key, result))
    except ray.exceptions.RayError:
        pass


def final_scores(context: Dict, params: Dict, uri: str) -> Dict[str, float]:
    """Score the selected configuration on ID test and every OOD test set, once; store the scores at ``uri``
    and return the test metrics (:func:`test_metrics`).

    The file is Parquet with columns ``set`` (data set label) and ``score`` (float32); its sha256 is
    recorded in ``<uri>.sha256`` (checked on reuse by :func:`orchestrator.search_cache.load`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ood_core import storage

    scores, labels = score_detector_on_sets(context, params, TEST_ROLES)
    keep = ["id-test"] + [l for l, e in context["sets"].items() if e["role"] in GROUPS]
    columns = {
        "set": pa.array([k for k in keep for _ in range(len(scores[k]))], pa.string()),
        "score": pa.array(np.concatenate([scores[k] for k in keep]).astype(np.float32)),
    }
    if f"exit:{keep[0]}" in labels:  # the layer at which each sample exited (early-exit detectors)
        columns["exit_layer"] = pa.array(np.concatenate([labels[f"exit:{k}"] for k in keep]).astype(np.int16))
    table = pa.table(columns)
    with storage.atomic_output(uri, record_hash=True) as f:
        pq.write_table(table, f)
    return test_metrics(context, scores)


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


def at_chance(uri: str, num_classes: int) -> bool:
    """Whether the backbone's ID test accuracy is within 3 binomial standard deviations of chance (1/C):
    a collapsed training run, on which no detector result means anything."""
    import math

    n = len(_read(uri, ("logits",)).labels)
    p = 1.0 / num_classes
    return backbone_accuracy(uri) <= p + 3 * math.sqrt(p * (1 - p) / max(n, 1))
