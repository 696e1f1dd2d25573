"""Hyperparameter search with Ray Tune, one Tuner per (backbone, detector).

Search specs (YAML or a detector's ``default_search_space``) become Tune domains:

=========================  =================================
spec                       Tune
=========================  =================================
``{grid: [a, b]}``         ``tune.grid_search([a, b])``
``{choice: [a, b]}``       ``tune.choice([a, b])``
``{uniform: [lo, hi]}``    ``tune.uniform(lo, hi)``
``{loguniform: [lo, hi]}`` ``tune.loguniform(lo, hi)``
``{randint: [lo, hi]}``    ``tune.randint(lo, hi + 1)`` (both ends included)
``[spec, spec, ...]``      a list searched element-wise (per-layer weights)
a plain value              fixed
=========================  =================================

Grids are crossed; random domains are sampled ``num_samples`` times per grid point.
Finished searches are cached by content (see :mod:`orchestrator.search_cache`).
Trials are selected on the validation metric only (``val_<metric>``); see :func:`sweep_space`
for how one Tuner carries every detector's search.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback

from orchestrator.interrupts import interruptible
from orchestrator.plan import join_uri


def to_tune_domain(spec: Any):
    if isinstance(spec, list):  # element-wise search of a list-valued hyperparameter
        return [to_tune_domain(item) for item in spec]
    if not isinstance(spec, dict):
        return spec
    (kind, value), = spec.items()
    if kind == "grid":
        return tune.grid_search(list(value))
    if kind == "choice":
        return tune.choice(list(value))
    if kind == "uniform":
        return tune.uniform(*value)
    if kind == "loguniform":
        return tune.loguniform(*value)
    if kind == "randint":
        return tune.randint(value[0], value[1] + 1)
    raise ValueError(f"unknown search kind {kind!r}")


def param_space(search: Dict[str, Any]) -> Dict[str, Any]:
    return {name: to_tune_domain(spec) for name, spec in search.items()}


def _random(spec: Any) -> bool:
    if isinstance(spec, list):
        return any(_random(item) for item in spec)
    return isinstance(spec, dict) and next(iter(spec)) != "grid"


def is_random(search: Dict[str, Any]) -> bool:
    return any(_random(s) for s in search.values())


class BatchedMLflowCallback(MLflowLoggerCallback):
    """Ray's MLflow logger, adapted to a sweep-wide search.

    * each trial run is nested under the run of its (backbone, detector) pair
      (``parents[entry key]``) and logs that detector's hyperparameters, not Tune's wrapper;
    * metrics go in one batch per result, only our own keys (the stock callback makes one
      tracking call per metric, which dominates a search against a sqlite store).
    """

    def __init__(self, *args, parents: Dict[str, str], metric_filter: Callable[[str], bool], **kwargs):
        super().__init__(*args, **kwargs)
        self._parents = parents
        self._metric_filter = metric_filter
        self._retries: Dict = {}
        self._failed: set = set()  # trials that reported an error

    def log_trial_start(self, trial):
        if trial in self._trial_runs:
            return
        from tasks.evaluate import entry_of

        entry = trial.config["entry"]
        key, params = entry_of(trial.config)
        parent = self._parents[key]
        client = self.mlflow_util._get_client()
        # a trial restarted after an interruption continues in the run it had
        found = client.search_runs([self.mlflow_util.experiment_id], max_results=1, filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.trial_name = '{trial}'"))
        if found:
            self._trial_runs[trial] = found[0].info.run_id
            return
        from orchestrator.report import trial_run_name

        tags = {**(self.tags or {}), "trial_name": str(trial), "mlflow.parentRunId": parent,
                **{k: str(v) for k, v in entry.get("tags", {}).items()},
                **({"trial_index": str(entry["index"])} if "index" in entry else {})}
        run = self.mlflow_util.start_run(tags=tags, run_name=trial_run_name(entry.get("tags", {}).get(
            "detector", key), params))
        self._trial_runs[trial] = run.info.run_id
        self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=params)

    def log_trial_result(self, iteration: int, trial, result: Dict):
        import time

        from mlflow.entities import Metric

        run_id = self._trial_runs[trial]
        client = self.mlflow_util._get_client()
        if "trial_error" in result:  # the detector raised: the run FAILED, with the reason and the traceback
            self._failed.add(trial)
            client.set_tag(run_id, "error", str(result["trial_error"])[:5000])
            client.log_text(run_id, str(result.get("trial_traceback", result["trial_error"])), "error.txt")
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in result.items()
                   if self._metric_filter(k) and isinstance(v, (int, float))]
        client.log_batch(run_id, metrics=metrics)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial that lost its worker (node gone, process killed) restarts elsewhere (``FailureConfig``)
        and goes on in the same run; the run's ``retries`` tag counts the restarts."""
        super().on_trial_recover(iteration, trials, trial, **info)
        self._retries[trial] = self._retries.get(trial, 0) + 1
        if trial in self._trial_runs:
            self.mlflow_util._get_client().set_tag(self._trial_runs[trial], "retries", str(self._retries[trial]))

    def log_trial_end(self, trial, failed: bool = False):
        run_id = self._trial_runs[trial]
        if failed and trial not in self._failed and getattr(trial, "error_file", None):  # Tune gave up retrying
            try:
                with open(trial.error_file) as f:
                    text = f.read()
                self.mlflow_util._get_client().set_tag(run_id, "error", text.strip().splitlines()[-1][:5000])
                self.mlflow_util._get_client().log_text(run_id, text, "error.txt")
            except OSError:
                pass
        self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed or trial in self._failed else "FINISHED")


class TrialProgress(tune.Callback):
    """Advances a tqdm bar as trials finish."""

    def __init__(self, bar):
        self.bar = bar

    def __getstate__(self):  # Tune checkpoints its callbacks; a terminal stream does not pickle
        return {"bar": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.bar is not None:
            self.bar.update(1)

    on_trial_error = on_trial_complete


def entry_variants(search: Dict[str, Any], num_samples: int, seed: int, key: str) -> List[Dict[str, Any]]:
    """The concrete hyperparameter points of one entry, drawn by Tune's variant generator.

    Grids are crossed; random domains are sampled ``num_samples`` times per grid point from a
    random stream seeded by ``(seed, key)``, so an entry's points do not depend on which other
    entries share the sweep (that is what lets an entry's result be cached on its own).
    """
    import hashlib

    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    state = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")
    rng = np.random.RandomState(state)
    copies = num_samples if is_random(search) else 1
    points = []
    for _ in range(copies):
        for _spec, cfg in generate_variants(param_space(search), random_state=rng):
            points.append(cfg)
    return points


def spread_shared_statistics(entries: List[Dict[str, Any]],
                             statistics: Callable[[Dict[str, Any]], Iterable[Any]]) -> List[Dict[str, Any]]:
    """``entries`` in an order where, wherever another order allows, no entry directly follows one that shares a
    training statistic with it (``statistics(entry)``: what its fit shares, e.g. ``(backbone, "moments_about_mean")``
    for Mahalanobis and RMD): the first fit of a statistic computes it while the others wait, so two such trials
    side by side would leave a task slot idle. Otherwise the order is kept."""
    remaining, out, last = list(entries), [], set()
    while remaining:
        pick = next((e for e in remaining if not last & set(statistics(e))), remaining[0])
        remaining.remove(pick)
        out.append(pick)
        last = set(statistics(pick))
    return out


def sweep_space(entries: List[Dict[str, Any]], seed: int) -> Dict[str, Any]:
    """One Tune space for every (backbone, detector) search of a sweep.

    ``entries``: dicts with ``key`` (unique), ``search`` (our spec format), ``num_samples`` and
    optional ``tags``. Each of an entry's points (:func:`entry_variants`) becomes one grid value
    ``{"key", "params", "tags", "index"}`` (``index``: its position among the entry's points). One Tuner for the whole sweep pays Tune's start-up and actor cost
    once, and ``reuse_actors`` keeps the cached features of a worker across detectors.
    """
    points = []
    for e in entries:
        for index, params in enumerate(entry_variants(e["search"], e["num_samples"], seed, e["key"])):
            points.append({"key": e["key"], "params": params, "tags": e.get("tags", {}), "index": index})
    return {"entry": tune.grid_search(points)}


class OptunaSpace:
    """A define-by-run Optuna space for one entry (picklable, so Tune can checkpoint the searcher).

    Grids and choices become categorical, ``uniform`` / ``loguniform`` floats, ``randint`` integers
    (both ends included); the elements of a list-valued hyperparameter are named ``name[i]``.
    """

    def __init__(self, search: Dict[str, Any], key: str, tags: Dict[str, str]):
        self.search, self.key, self.tags = search, key, tags

    def _suggest(self, trial, name: str, spec: Any) -> None:
        if isinstance(spec, list):
            for i, item in enumerate(spec):
                self._suggest(trial, f"{name}[{i}]", item)
            return
        if not isinstance(spec, dict):
            trial.suggest_categorical(name, [spec])
            return
        (kind, value), = spec.items()
        if kind in ("grid", "choice"):
            trial.suggest_categorical(name, list(value))
        elif kind == "uniform":
            trial.suggest_float(name, value[0], value[1])
        elif kind == "loguniform":
            trial.suggest_float(name, value[0], value[1], log=True)
        else:
            trial.suggest_int(name, value[0], value[1])

    def __call__(self, trial):
        for name, spec in self.search.items():
            self._suggest(trial, name, spec)
        return {"entry": {"key": self.key, "tags": self.tags}}


def run_search(
    trainable: Callable,
    contexts: Dict[str, Dict],
    entries: List[Dict[str, Any]],
    *,
    metric: str,
    mode: str,
    max_concurrent: int,
    storage_path: str,
    name: str,
    resources: Dict[str, float],
    seed: int,
    callbacks: Optional[List] = None,
    max_failures: int = 2,
    algorithm: str = "basic",
) -> Dict[str, List]:
    """Run every entry's search; return ``{entry key: [tune.Result, ...]}``.

    ``basic`` (grid + random) runs every entry in one Tuner; ``optuna`` runs one Tuner per entry with
    Tune's :class:`OptunaSearch` (TPE, seeded), ``num_samples`` trials each. Failed trials are among the
    results (``error`` set, or a reported ``trial_error``); the caller decides what they mean.
    """
    trainable = tune.with_resources(tune.with_parameters(trainable, contexts=contexts), resources)
    if algorithm == "optuna":
        return _run_optuna(trainable, entries, metric=metric, mode=mode, max_concurrent=max_concurrent,
                           storage_path=storage_path, name=name, seed=seed, callbacks=callbacks,
                           max_failures=max_failures)
    path = join_uri(storage_path, name)
    tuner = _restore(path, trainable)  # an interrupted search: finished trials are kept, the rest run
    if tuner is None:
        tuner = tune.Tuner(
            trainable,
            param_space=sweep_space(entries, seed),
            tune_config=tune.TuneConfig(
                metric=f"val_{metric}", mode=mode, reuse_actors=True, max_concurrent_trials=max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, verbose=0, callbacks=callbacks or [],
                failure_config=tune.FailureConfig(max_failures=max_failures),
            ),
        )
    with interruptible():  # a swallowed Ctrl-C is raised after fit: a stopped experiment is never cached
        grid = tuner.fit()
    return _group(grid, entries, metric)


def _run_optuna(trainable, entries, *, metric, mode, max_concurrent, storage_path, name, seed, callbacks,
                max_failures) -> Dict[str, List]:
    import hashlib

    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    by_key: Dict[str, List] = {}
    for e in entries:
        entry_seed = int.from_bytes(hashlib.sha256(f"optuna:{seed}:{e['key']}".encode()).digest()[:4], "little")
        searcher = OptunaSearch(OptunaSpace(e["search"], e["key"], e.get("tags", {})), metric=f"val_{metric}",
                                mode=mode, seed=entry_seed)
        path_name = f"{name}-optuna-{hashlib.sha256(e['key'].encode()).hexdigest()[:8]}"
        path = join_uri(storage_path, path_name)
        tuner = _restore(path, trainable)
        if tuner is None:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=f"val_{metric}", mode=mode, num_samples=e["num_samples"], reuse_actors=True,
                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                ),
                run_config=tune.RunConfig(
                    name=path_name, storage_path=storage_path, verbose=0, callbacks=callbacks or [],
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                ),
            )
        with interruptible():
            grid = tuner.fit()
        by_key.update(_group(grid, [e], metric))
    return by_key


def _restore(path: str, trainable):
    """The interrupted Tune experiment at ``path``, or None when there is none, or when its state cannot be
    restored (damaged or from another version): then it is set aside, said in one line, and the search
    starts afresh (finished searches are in the search cache anyway)."""
    if not tune.Tuner.can_restore(path):
        return None
    try:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state: start again rather than block every rerun
        import time

        from ood_core import storage

        fs, local = storage.resolve(path)
        aside = f"{local}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        fs.move(local, aside)
        print(f"[search] interrupted search state cannot be restored ({type(exc).__name__}); set aside as "
              f"{aside}, starting the search again", flush=True)
        return None


def _group(grid, entries, metric: str) -> Dict[str, List]:
    from tasks.evaluate import entry_of

    by_key: Dict[str, List] = {e["key"]: [] for e in entries}
    for result in grid:
        key, _ = entry_of(result.config)
        if key in by_key:  # a restored search may hold entries finished (and cached) before
            by_key[key].append(result)
    return by_key


def select_best(results: List, metric: str, mode: str):
    """The result with the best validation metric (first one on ties, i.e. trial order)."""
    ok = [r for r in results if r.error is None and f"val_{metric}" in r.metrics]
    sign = 1.0 if mode == "max" else -1.0
    return max(ok, key=lambda r: sign * float(r.metrics[f"val_{metric}"]))
