"""ood-sweep vs pytorch-ood's GridSearch vs an OpenOOD-style APS loop, on one study (issue 14).

    python benchmarks/peers.py [--rounds 2] [--storage DIR] [--sides ours,pytorch-ood,aps] [--config FILE]
                               [--aps-fit per-point|once]

The study is ``sweeps/peers.yaml``: Fashion-MNIST classes 0-5 as ID, classes 6-9 (near) and scikit-learn's
digits (far) as OOD test sets, one OOD validation set (Fashion-MNIST 6-9, val split), small_cnn trained once;
OpenOOD v1.5's grids for ReAct, ASH (ash-b), KNN, GEN and ODIN, Mahalanobis and EnergyBased without a search.

1. **Prepare.** The study is copied into ``--storage`` (default ``.ood_sweep/peers-bench``; the benchmark deletes
   folders in it, so it is its own storage) and run once with ``python -m orchestrator sweep`` as a warm-up: it
   trains the backbone (cached for every round after) and warms the caches. Every side then uses the same
   checkpoint (the plan's ``checkpoint_uri``, loaded with ``tasks.runtime.load_backbone``), the same data sets
   (``ood_core.data.load_dataset`` in the plan's input format), the same grids and batch size (the study's
   ``extract.batch_size``).
2. **Three sides, alternated** (the order rotates by one each round), ``--rounds`` rounds, each timed by wall clock:

   * ``ours``: ``python -m orchestrator sweep <study> --json OUT`` in a subprocess, training cached; the feature
     files, search records and Tune state (``<storage>/features``, ``/search``, ``/tune``) deleted before each
     round, a fresh MLflow sqlite store (and artifact folder) per round. Extraction + search + test + report.
   * ``pytorch-ood``: pytorch-ood 0.4.0's ``GridSearch`` per detector on its own detector classes built on the
     loaded model (``backbone``/``encoder`` = ``model.features``, ``head`` = ``model.head``), ``fit_loader`` = ID
     train, ``val_loader`` = ID val + OOD val (label -1), the same grid (its units), AUROC; then the test sets are
     scored once with the chosen configuration (``detector.predict`` over each loader) and the AUROC of ID test
     vs each OOD test set is pytorch-ood's ``OODMetrics``. Detectors without a search are fitted and scored once.
   * ``aps``: OpenOOD's automatic parameter search as a loop over the grid: per grid point the network is run
     again (over ID train when the detector fits, ID val and OOD val), ood_core's detector is fitted and scores
     validation; the best point (first on ties) is kept; then the network runs on the test sets once and the kept
     detector scores them. ``--aps-fit once`` runs the ID-train pass once per detector instead (what OpenOOD's
     ``Evaluator`` does: ``setup`` once, then ``set_hyperparam`` + val inference per point).
3. **Tune's floor**, once per round after ``ours``: a trivial function trainable that only reports a constant,
   over the same trial space as ours (the same number of trials), ``max_concurrent_trials`` as the study,
   ``reuse_actors=True``, Ray started by ``orchestrator.sweep.init_ray``, MLflow logging through our
   ``BatchedMLflowCallback`` (one child run per trial under a run per detector, a fresh sqlite store), in a
   subprocess. Floor = ``tuner.fit()`` seconds / trials; ours = ``stages["search"]`` / trials.
4. **Table and checks**: wall times per round and medians, ratios of medians, load average at start and end;
   per detector the selected configuration and test AUROC per set on each side. Checks: the three sides select
   the same configuration and report the same test AUROCs (to 1e-3). Targets: ours <= 0.5 x pytorch-ood,
   ours <= 0.2 x APS, ours' search stage per trial <= floor + 0.2 s. Exit 1 when a check or a target is missed
   (each named). A benchmark, not a test: it is not part of the test suite.

Parameter mapping (pytorch-ood 0.4.0 vs ours; the same quantity is computed on both sides):

* ReAct / ASH ``percentile``: pytorch-ood takes fractions (0.85), ours percent (85). ReAct's threshold is the
  ``p``-th percentile of all ID-train penultimate activations on both sides (``np.percentile``, linear).
  pytorch-ood's ReAct / ASH are feature-map detectors; they are given ``model.features`` (``(N, D)``; for ASH
  reshaped to ``(N, D, 1, 1)``, and the head flattens it back), so both sides clip / prune the pooled
  penultimate features that the linear head reads. OpenOOD's ASHNet applies ``ash_b``; the variant is pinned
  to ``ash-b`` on every side (pytorch-ood's default is ``ash-s``).
* GEN: OpenOOD's ``M`` grid {10, ..., 1000} is above C = 6 everywhere, so ``M = 6`` (all classes) on every side;
  pytorch-ood averages where ours sums (a factor 1/6: same ranking) and clamps the probabilities to
  [1e-7, 1 - 1e-7] (ours does not; see the docstring of ``ood_core.detectors.probability.GEN``).
* ODIN: pytorch-ood's ``temperature`` is our ``t``; ``norm_std`` = the study's input std on both sides (``eps``
  in pixel units). pytorch-ood's default criterion averages the loss over the batch, ours sums it: the gradient
  is scaled by the batch size, its sign (all ODIN uses) is the same.
* Mahalanobis: pytorch-ood scores half the squared distance with the unnormalised scatter and an absolute ridge
  1e-6; ours the distance with the covariance and a relative ridge: the same ranking (its docstring). pytorch-ood
  0.4.0's ``Mahalanobis`` has no ``eps`` (that is ``MahalanobisODIN``); none is set.
* KNN: pytorch-ood searches with scikit-learn's exact ``NearestNeighbors``, ours with its exact torch engine.

The encoders handed to pytorch-ood run under ``torch.no_grad`` (except ODIN's model, which needs gradients):
a user's choice that only makes pytorch-ood faster.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIDES = ("ours", "pytorch-ood", "aps")
TOL = 1e-3  # test AUROC agreement
TARGET_POD, TARGET_APS, TARGET_FLOOR_S = 0.5, 0.2, 0.2
#: our hyperparameter name -> (pytorch-ood's name, ours -> theirs, theirs -> ours)
PERCENT = (lambda v: v / 100.0, lambda v: v * 100.0)
PARAM_MAP: Dict[str, Dict[str, Tuple[str, Callable, Callable]]] = {
    "ReAct": {"percentile": ("percentile", *PERCENT)},
    "ASH": {"percentile": ("percentile", *PERCENT)},
    "ODIN": {"t": ("temperature", float, float)},
}


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# -- the study ------------------------------------------------------------------------------------------------
def write_study(config: Path, storage: Path, folder: Path) -> Path:
    """The study with ``storage`` and a fresh sqlite tracking store in ``folder`` (which also receives MLflow's
    artifacts: the sweep runs with ``folder`` as its working directory)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    study = yaml.safe_load(config.read_text())
    study["storage"] = str(storage)
    study["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    path = folder / config.name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


class Study:
    """The plan of the study, its data sets, the loaded model and each detector's grid (our units)."""

    def __init__(self, path: Path):
        from orchestrator.config import load_config
        from orchestrator.plan import make_plan

        self.cfg = load_config(str(path))
        self.plan = make_plan(self.cfg)
        self.bb = self.plan.backbones[0]
        self.fmt = self.plan.input_format
        self.batch_size = self.cfg.extract.batch_size
        self.sets = {f.dataset.label: f.dataset for f in self.bb.features}  # label -> DataSetJob (role, spec)
        self.detectors = [(d.label, d.type, dict(d.params), self.bb.searches[d.label]) for d in self.cfg.detectors]

    def labels(self, role: str) -> List[str]:
        return [label for label, job in self.sets.items() if job.role == role]

    @property
    def test_labels(self) -> List[str]:
        return self.labels("near") + self.labels("far")

    def model(self):
        from tasks import runtime

        runtime._load_model_cached.cache_clear()  # each round loads the checkpoint
        bb = {"checkpoint_uri": self.bb.checkpoint_uri, "arch": self.bb.arch, "params": self.bb.params}
        return runtime.load_backbone(bb, self.plan.num_classes, self.fmt)

    def dataset(self, label: str, ood_label: bool = False):
        """Data set ``label`` as the sweep builds it; ``ood_label``: every label reads -1 (pytorch-ood's OOD)."""
        from ood_core.data import AsOutliers, load_dataset
        from tasks.runtime import input_format

        job = self.sets[label]
        data = load_dataset(job.dataset, split=job.split, fmt=input_format(self.fmt), seed=job.seed, **job.params)
        return AsOutliers(data) if ood_label else data

    def loader(self, *datasets):
        import torch

        data = datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(list(datasets))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=False)


def grid_points(space: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The points of a grid space, crossed in the order of its keys (the order Tune's variant generator gives)."""
    if not space:
        return [{}]
    names = list(space)
    for name in names:
        if not (isinstance(space[name], dict) and set(space[name]) == {"grid"}):
            raise SystemExit(f"peers: only grid searches are benchmarked; {name}: {space[name]}")
    return [dict(zip(names, values)) for values in itertools.product(*(space[n]["grid"] for n in names))]


def same_params(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return set(a) == set(b) and all(math.isclose(float(a[k]), float(b[k]), rel_tol=1e-9) if
                                    isinstance(a[k], (int, float)) and isinstance(b[k], (int, float))
                                    else a[k] == b[k] for k in a)


def fmt_params(p: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={round(v, 6) if isinstance(v, float) else v}" for k, v in p.items()) or "-"


# -- side: ours -----------------------------------------------------------------------------------------------
def clean_storage(storage: Path) -> None:
    """Remove what a sweep computes after training (features, search records and scores, Tune state)."""
    for name in ("features", "search", "tune"):  # orchestrator/plan.py, search_cache.py, sweep.py
        shutil.rmtree(storage / name, ignore_errors=True)


def run_sweep(config: Path, storage: Path, runs: Path, tag: str) -> Tuple[float, Dict]:
    """``python -m orchestrator sweep`` on the study in a subprocess; (wall seconds, its --json output)."""
    folder = runs / tag
    shutil.rmtree(folder, ignore_errors=True)
    study = write_study(config, storage, folder)
    out, log = folder / "sweep.json", folder / "sweep.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(study), "--json", str(out)],
                            cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if rc != 0 or not out.exists():
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"peers: the sweep ({tag}) exited {rc}; see {log}:\n" + "\n".join(tail))
    return seconds, json.loads(out.read_text())


def side_ours(config: Path, storage: Path, runs: Path, tag: str, study: Study) -> Dict:
    clean_storage(storage)
    seconds, out = run_sweep(config, storage, runs, tag)
    results = {}
    for row in out["rows"]:
        results[row["detector"]] = {
            "selected": dict(row.get("selected") or {}), "val_auroc": row.get("val_auroc"),
            "test": {label: row.get(f"test/{label}/auroc") for label in study.test_labels},
        }
    trials = sum(int(row["trials"]) for row in out["rows"])
    for label, per_trial in trial_seconds(runs / tag / "mlflow.db").items():
        if label in results:
            results[label]["seconds"] = per_trial
    return {"seconds": seconds, "results": results, "stages": out.get("stages", {}), "trials": trials}


def trial_seconds(db: Path) -> Dict[str, float]:
    """Mean duration of a trial's MLflow run (the callback's start to end: the trial and its logging) per
    detector, read from the round's sqlite store: where the search stage's time goes."""
    import sqlite3

    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select d.value, avg(r.end_time - r.start_time) from runs r "
            "join tags d on d.run_uuid = r.run_uuid and d.key = 'detector' "
            "join tags s on s.run_uuid = r.run_uuid and s.key = 'stage' and s.value = 'trial' "
            "where r.end_time is not null group by d.value").fetchall()
    return {label: ms / 1000.0 for label, ms in rows}


# -- side: Tune's floor ---------------------------------------------------------------------------------------
def _floor_trainable(config):
    from ray import tune

    tune.report({"val_auroc": 0.5})


def tune_floor(study_path: Path, out: Path) -> None:
    """Run in a subprocess (``--floor-json``): Tune's own cost for the study's trial space, with our MLflow
    callback, a trivial trainable; writes ``{"seconds", "trials"}``."""
    import mlflow
    from ray import tune

    from orchestrator.search import BatchedMLflowCallback, sweep_space
    from orchestrator.sweep import _is_metric, init_ray

    study = Study(study_path)
    cfg = study.cfg
    tracking = cfg.resolved_tracking_uri()
    client = mlflow.MlflowClient(tracking)
    experiment = client.create_experiment("peers-floor")
    parent = client.create_run(experiment, run_name="floor").info.run_id
    entries, parents = [], {}
    for label, _type, _fixed, space in study.detectors:
        key = f"{study.bb.label}/{label}"
        parents[key] = client.create_run(experiment, run_name=key, tags={"mlflow.parentRunId": parent}).info.run_id
        entries.append({"key": key, "search": space, "num_samples": 1, "tags": {"detector": label}})
    space = sweep_space(entries, cfg.seed)
    trials = len(space["entry"]["grid_search"])
    init_ray()
    callback = BatchedMLflowCallback(tracking_uri=tracking, experiment_name="peers-floor",
                                     tags={"stage": "trial"}, parents=parents, metric_filter=_is_metric)
    started = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(_floor_trainable, {"cpu": 1}), param_space=space,
        tune_config=tune.TuneConfig(metric="val_auroc", mode="max", reuse_actors=True,
                                    max_concurrent_trials=cfg.search.max_concurrent_trials),
        run_config=tune.RunConfig(name="floor", storage_path=str(Path(cfg.storage) / "tune-floor"), verbose=0,
                                  callbacks=[callback]),
    )
    grid = tuner.fit()
    seconds = time.perf_counter() - started
    for run_id in [parent, *parents.values()]:
        client.set_terminated(run_id)
    errors = sum(1 for r in grid if r.error is not None)
    out.write_text(json.dumps({"seconds": seconds, "trials": trials, "errors": errors}))


def side_floor(config: Path, storage: Path, runs: Path, tag: str) -> Dict:
    folder = runs / tag
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(storage / "tune-floor", ignore_errors=True)
    study = write_study(config, storage, folder)
    out, log = folder / "floor.json", folder / "floor.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--floor-json", str(out),
                             "--config", str(study)], cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT
                            ).returncode
    if rc != 0 or not out.exists():
        raise SystemExit(f"peers: Tune's floor exited {rc}; see {log}")
    return json.loads(out.read_text())


# -- side: pytorch-ood ----------------------------------------------------------------------------------------
def _no_grad(fn):
    import torch

    def run(x):
        with torch.no_grad():
            return fn(x)
    return run


def pod_detector(kind: str, model, fixed: Dict, std: List[float]):
    """pytorch-ood's detector of our ``kind`` on the loaded model, with the study's fixed parameters."""
    import pytorch_ood.detector as pod

    features = _no_grad(model.features)
    if kind == "ReAct":
        return pod.ReAct(backbone=features, head=model.head, percentile=0.9)  # energy score (the default)
    if kind == "ASH":
        return pod.ASH(backbone=_no_grad(lambda x: model.features(x)[:, :, None, None]),
                       head=lambda maps: model.head(maps.flatten(1)), variant=fixed["variant"], percentile=0.65)
    if kind == "KNN":
        return pod.KNN(encoder=features, k=50)
    if kind == "GEN":
        return pod.GEN(model, M=fixed.get("M"))
    if kind == "ODIN":
        return pod.ODIN(model, norm_std=list(std))
    if kind == "Mahalanobis":
        return pod.Mahalanobis(encoder=features)
    if kind == "EnergyBased":
        return pod.EnergyBased(model, t=float(fixed.get("t", 1.0)))
    raise SystemExit(f"peers: no pytorch-ood mapping for {kind}")


def to_pod(kind: str, params: Dict) -> Dict:
    out = {}
    for name, value in params.items():
        theirs, forward, _back = PARAM_MAP.get(kind, {}).get(name, (name, lambda v: v, None))
        out[theirs] = forward(value)
    return out


def from_pod(kind: str, params: Dict) -> Dict:
    back = {theirs: (ours, b) for ours, (theirs, _f, b) in PARAM_MAP.get(kind, {}).items()}
    return {back[k][0] if k in back else k: back[k][1](v) if k in back else v for k, v in params.items()}


def _pod_auroc(id_scores, ood_scores) -> float:
    import torch
    from pytorch_ood.metrics import OODMetrics

    metric = OODMetrics()
    metric.update(torch.cat([id_scores, ood_scores]).float(),
                  torch.cat([torch.zeros(len(id_scores), dtype=torch.long),
                             -torch.ones(len(ood_scores), dtype=torch.long)]))
    return float(metric.compute()["AUROC"])


def side_pytorch_ood(study: Study) -> Dict:
    import logging

    import torch
    from pytorch_ood.utils.hpo import GridSearch

    logging.getLogger("pytorch_ood").setLevel(logging.ERROR)  # ReAct.fit: "No device set. Will use 'cpu'."
    started = time.perf_counter()
    model = study.model()
    std = list(study.fmt["std"])
    train = study.loader(study.dataset("id-train"))
    (ood_val,) = study.labels("ood_val")
    val = study.loader(study.dataset("id-val"), study.dataset(ood_val, ood_label=True))
    tests = {label: study.loader(study.dataset(label)) for label in ["id-test", *study.test_labels]}
    results = {}
    for label, kind, fixed, space in study.detectors:
        t0 = time.perf_counter()
        det = pod_detector(kind, model, fixed, std)
        points = grid_points(space)
        val_auroc = None
        if points == [{}]:  # no search: fit once
            if det.requires_fit:
                det.fit(train)
            selected = {}
        else:
            grid = {}  # the same grid in pytorch-ood's names and units, crossed in the same order
            for name in points[0]:
                theirs = [to_pod(kind, {name: v}) for v in space[name]["grid"]]
                grid[next(iter(theirs[0]))] = [next(iter(t.values())) for t in theirs]
            search = GridSearch(det, train if det.requires_fit else None, val, hyperparameter_space=grid)
            selected = from_pod(kind, search.run())
            val_auroc = search.best_score_
        scores = {}
        for name, loader in tests.items():
            out = []
            for x, _y in loader:
                with torch.no_grad() if kind != "ODIN" else torch.enable_grad():
                    out.append(det.predict(x).detach().float().cpu())
            scores[name] = torch.cat(out)
        results[label] = {"selected": selected, "val_auroc": val_auroc, "seconds": time.perf_counter() - t0,
                          "test": {t: _pod_auroc(scores["id-test"], scores[t]) for t in study.test_labels}}
    return {"seconds": time.perf_counter() - started, "results": results}


# -- side: the APS loop ---------------------------------------------------------------------------------------
def _network(model, loader):
    """One pass of the network: penultimate features and logits (the representations the sweep caches)."""
    import torch

    feats, ys = [], []
    with torch.inference_mode():
        for x, y in loader:
            feats.append(model.features(x))
            ys.append(y)
        z = torch.cat(feats)
        logits = model.head(z)
    return {"features": z, "penultimate": z, "logits": logits}, torch.cat(ys)


def side_aps(study: Study, fit_once: bool = False) -> Dict:
    import torch

    from ood_core.detectors.registry import build_detector, detector_params, fit_detector, get_spec, score_detector
    from ood_core.evaluation import CACHED, EvalSet, score
    from ood_core.metrics import auroc

    started = time.perf_counter()
    model = study.model()
    head = (model.head.weight.detach().clone(), model.head.bias.detach().clone())
    (ood_val,) = study.labels("ood_val")
    loaders = {name: study.loader(study.dataset(name)) for name in ["id-train", "id-val", ood_val, "id-test",
                                                                     *study.test_labels]}

    def scores_of(det, spec, name):
        if spec.representation in CACHED:
            reps, _ = _network(model, loaders[name])
            with torch.no_grad():
                return score_detector(det, reps).float().cpu().numpy()
        return score(det, EvalSet("x", loaders[name]), model, torch.device("cpu")).scores

    results = {}
    for label, kind, fixed, space in study.detectors:
        t0 = time.perf_counter()
        spec = get_spec(kind)
        points = grid_points(space)
        best, train_reps = None, None
        for params in points:
            values = {**fixed, **params}
            if "norm_std" in detector_params(kind) and "norm_std" not in values:
                values["norm_std"] = list(study.fmt["std"])  # as the sweep's trials: eps in pixel units
            det = build_detector(kind, values, head=head if spec.needs_head else None)
            if spec.representation == "model":
                det.model = model
            if det.requires_fit:
                if train_reps is None or not fit_once:
                    train_reps = _network(model, loaders["id-train"])
                with torch.no_grad():
                    fit_detector(det, *train_reps)
            if len(points) == 1:  # no search: nothing to choose
                best = (None, params, det)
                break
            val = auroc(scores_of(det, spec, "id-val"), scores_of(det, spec, ood_val))
            if best is None or val > best[0]:
                best = (val, params, det)
        val_auroc, selected, det = best
        id_test = scores_of(det, spec, "id-test")
        results[label] = {"selected": dict(selected), "val_auroc": val_auroc,
                          "test": {t: auroc(id_test, scores_of(det, spec, t)) for t in study.test_labels},
                          "seconds": time.perf_counter() - t0}
    return {"seconds": time.perf_counter() - started, "results": results}


# -- report ---------------------------------------------------------------------------------------------------
def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(study: Study, sides: List[str], rounds: List[Dict[str, Dict]], load: Tuple, args) -> List[str]:
    """Print the tables; return the missed checks and targets."""
    problems: List[str] = []
    times = {s: [r[s]["seconds"] for r in rounds if s in r] for s in sides}
    med = {s: median(times[s]) for s in sides}
    names = {"ours": "ood-sweep sweep (extraction + search + test + report; training cached)",
             "pytorch-ood": "pytorch-ood 0.4.0 GridSearch per detector (test scored once)",
             "aps": "APS loop, network re-run per grid point" + (" (ID-train pass once per detector)"
                                                                  if args.aps_fit == "once" else "")}
    _say("\n## Wall time per round (s)\n")
    _say("| side | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " | median |")
    _say("| --- | " + " | ".join("---" for _ in rounds) + " | --- |")
    for s in sides:
        _say(f"| {names[s]} | " + " | ".join(f"{t:.1f}" for t in times[s]) + f" | **{med[s]:.1f}** |")
    if "ours" in sides:
        floors = [r["floor"] for r in rounds if "floor" in r]
        trials = rounds[0]["ours"]["trials"]
        search = [r["ours"]["stages"].get("search", float("nan")) / r["ours"]["trials"] for r in rounds]
        floor = [f["seconds"] / f["trials"] for f in floors]
        _say(f"| Tune's floor: trivial trainable, {floors[0]['trials'] if floors else '?'} trials, "
             "MLflow callback | " + " | ".join(f"{f['seconds']:.1f}" for f in floors) +
             f" | **{median([f['seconds'] for f in floors]):.1f}** |")
        stage_names = list(dict.fromkeys(k for r in rounds for k in r["ours"]["stages"]))
        _say(f"\nours, seconds per stage (median of {len(rounds)}): " + ", ".join(
            f"{k} {median([r['ours']['stages'].get(k, 0.0) for r in rounds]):.1f}" for k in stage_names))
        per_trial, floor_trial = median(search), median(floor)
        _say(f"ours' search stage: {per_trial:.3f} s per trial ({trials} trials); Tune's floor {floor_trial:.3f} s "
             f"per trial; above the floor: **{per_trial - floor_trial:+.3f} s** (target <= {TARGET_FLOOR_S} s)")
        if floors and any(f.get("errors") for f in floors):
            problems.append("Tune's floor: some trivial trials errored")
        if not per_trial - floor_trial <= TARGET_FLOOR_S:
            problems.append(f"target: search stage {per_trial - floor_trial:+.3f} s per trial above Tune's floor "
                            f"(> {TARGET_FLOOR_S} s)")
        for other, target in (("pytorch-ood", TARGET_POD), ("aps", TARGET_APS)):
            if other in sides:
                ratio = med["ours"] / med[other]
                _say(f"ours / {other}: **{ratio:.2f}** (target <= {target})")
                if not ratio <= target:
                    problems.append(f"target: ours / {other} = {ratio:.2f} (> {target})")
    _say(f"load average (1, 5, 15 min) at start {load[0][0]:.2f} {load[0][1]:.2f} {load[0][2]:.2f}, "
         f"at end {load[1][0]:.2f} {load[1][1]:.2f} {load[1][2]:.2f}")

    last = rounds[-1]
    tests = study.test_labels
    _say(f"\n## Selected configuration, its validation AUROC and test AUROC ({' / '.join(tests)}), last round\n")
    _say("| detector | " + " | ".join(f"{s} selected | {s} AUROC" for s in sides) + " | agree |")
    _say("| --- | " + " | ".join("--- | ---" for _ in sides) + " | --- |")
    for label, _kind, _fixed, _space in study.detectors:
        cells, ok = [], True
        ref = last[sides[0]]["results"].get(label)
        for s in sides:
            res = last[s]["results"].get(label)
            if res is None:
                cells.append("missing | -")
                ok = False
                continue
            val = "" if res.get("val_auroc") is None else f"(val {100 * res['val_auroc']:.2f}) "
            cells.append(f"{fmt_params(res['selected'])} | {val}" + " / ".join(
                f"{100 * res['test'][t]:.2f}" if res["test"].get(t) is not None else "-" for t in tests))
            if ref is not None and s != sides[0]:
                if not same_params(ref["selected"], res["selected"]):
                    ok = False
                    problems.append(f"agreement: {label}: {sides[0]} selected {fmt_params(ref['selected'])}, "
                                    f"{s} {fmt_params(res['selected'])}")
                for t in tests:
                    a, b = ref["test"].get(t), res["test"].get(t)
                    if a is None or b is None or not abs(a - b) <= TOL:
                        ok = False
                        problems.append(f"agreement: {label} test AUROC on {t}: {sides[0]} {a}, {s} {b} "
                                        f"(|diff| > {TOL})")
        _say(f"| {label} | " + " | ".join(cells) + f" | {'yes' if ok else '**no**'} |")
    if sides:
        _say("\n## Seconds per detector, last round (ours: mean seconds per trial, Tune runs "
             f"{study.cfg.search.max_concurrent_trials} at a time; the others: the search and the test scoring)\n")
        _say("| detector | grid points | " + " | ".join(sides) + " |")
        _say("| --- | --- | " + " | ".join("---" for _ in sides) + " |")
        for label, _kind, _fixed, space in study.detectors:
            _say(f"| {label} | {len(grid_points(space))} | " + " | ".join(
                f"{last[s]['results'][label].get('seconds', float('nan')):.{2 if s == 'ours' else 1}f}"
                for s in sides) + " |")
    for r_i, r in enumerate(rounds[:-1]):  # earlier rounds must give the same results as the last
        for s in sides:
            for label, res in r[s]["results"].items():
                other = last[s]["results"].get(label)
                if other and not (same_params(res["selected"], other["selected"]) and all(
                        abs((res["test"][t] or 0) - (other["test"][t] or 0)) <= 1e-9 for t in tests)):
                    problems.append(f"repeatability: {s} {label} differs between round {r_i + 1} and the last")
    return problems


# -- main -----------------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--storage", default=str(REPO / ".ood_sweep" / "peers-bench"),
                   help="the benchmark's own storage (features, searches and Tune state in it are deleted)")
    p.add_argument("--config", default=str(REPO / "sweeps" / "peers.yaml"))
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    p.add_argument("--aps-fit", choices=("per-point", "once"), default="per-point",
                   help="APS loop: run the ID-train pass per grid point (default) or once per detector")
    p.add_argument("--floor-json", help=argparse.SUPPRESS)  # internal: the Tune floor subprocess
    args = p.parse_args(argv)
    if args.floor_json:
        tune_floor(Path(args.config), Path(args.floor_json))
        return 0
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        p.error(f"--sides: choose from {', '.join(SIDES)}")
    sides = [s for s in SIDES if s in sides]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config, storage = Path(args.config).resolve(), Path(args.storage).resolve()
    runs = storage / "runs"
    load_start = os.getloadavg()
    started = time.perf_counter()

    prep = write_study(config, storage, runs / "plan")
    study = Study(prep)
    if "ours" in sides or not Path(study.bb.checkpoint_uri).exists():
        _say(f"[peers] warm-up: the whole study once (trains the backbone unless cached) into {storage}")
        clean_storage(storage)
        seconds, out = run_sweep(config, storage, runs, "warmup")
        stages = out.get("stages", {})
        acc = out["rows"][0].get("id_accuracy") if out.get("rows") else None
        _say(f"[peers] warm-up {seconds:.1f} s (train {stages.get('train', 0):.1f} s); ID test accuracy "
             f"{100 * acc:.2f}%" if acc is not None else f"[peers] warm-up {seconds:.1f} s")
    _say(f"[peers] checkpoint {study.bb.checkpoint_uri}; sets: " + ", ".join(
        f"{label} ({job.role})" for label, job in study.sets.items()))
    _say("[peers] grids: " + "; ".join(f"{label} {fmt_params({k: v['grid'] for k, v in space.items()})}"
                                       for label, _kind, _fixed, space in study.detectors))

    rounds: List[Dict[str, Dict]] = []
    for r in range(args.rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        result: Dict[str, Dict] = {}
        for side in order:
            if side == "ours":
                result[side] = side_ours(config, storage, runs, f"round{r + 1}-ours", study)
                result["floor"] = side_floor(config, storage, runs, f"round{r + 1}-floor")
                extra = f"; Tune's floor {result['floor']['seconds']:.1f} s for {result['floor']['trials']} trials"
            elif side == "pytorch-ood":
                result[side], extra = side_pytorch_ood(study), ""
            else:
                result[side], extra = side_aps(study, fit_once=args.aps_fit == "once"), ""
            _say(f"[peers] round {r + 1}: {side} {result[side]['seconds']:.1f} s{extra}")
        rounds.append(result)

    load_end = os.getloadavg()
    problems = report(study, sides, rounds, (load_start, load_end), args)
    _say(f"\n[peers] {time.perf_counter() - started:.0f} s in all")
    if problems:
        _say("\nMISSED:")
        for line in problems:
            _say(f"  - {line}")
        return 1
    _say("all checks and targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
