"""Run a planned sweep: train → extract → search, with Ray, tracked in MLflow.

Stages whose content-addressed output already exists (a checkpoint, a valid Parquet file) are
reused without launching a task; the console says so. The driver does no tensor math: it
schedules tasks, logs their results and prints the report.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict
from typing import Dict, List, Tuple

from orchestrator import artifacts, leaderboard, report, search_cache
from orchestrator.config import SweepConfig, val_test_overlap
from orchestrator.errors import UserError
from orchestrator.locations import absolute_storage
from orchestrator.interrupts import POLL_S, latched_sigint, raise_if_interrupted
from orchestrator.plan import BackbonePlan, SweepPlan, check_inputs, content_key, join_uri, make_plan, outlier_jobs
from orchestrator.summary import ordered_figures, summary_html
from orchestrator.tracking import Tracker, flatten
from tasks.evaluate import is_test_metric
from tasks.progress import driver_progress, tell_workers


def _say(msg: str) -> None:
    print(msg, flush=True)


def search_inputs(cfg, bb, det, spec) -> List[str]:
    """What a (backbone, detector) search reads, for its cache key: the feature files, the outlier sets it trains
    on, and the split it is fitted on when that is not ID train (so ``fit_on: train`` keeps the keys it had)."""
    inputs = [f.key for f in bb.features]
    if spec.needs_outliers:
        inputs += [content_key(job.spec()) for job in outlier_jobs(cfg)]
    if det.fit_on != "train":
        inputs.append(f"fit_on:{det.fit_on}")
    return inputs


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune banners, our own progress bar
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C interrupts the sweep, not only Tune
    tell_workers()  # progress as bars in a terminal, as a few lines in a log
    # a trial whose detector raised reports its error instead of the metric (recorded, never retried)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # RAY_ADDRESS (set by `ray job submit`, or by hand) joins a cluster; otherwise a fresh local instance,
    # never a leftover one that Ray would find through /tmp/ray/ray_current_cluster.
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, logging_level="ERROR", configure_logging=True)


def ray_get(refs: List) -> List:
    """``ray.get(refs)``, waiting in short polls so that a recorded Ctrl-C stops the driver at once."""
    import ray

    if not refs:  # ray.get([]) would start Ray implicitly, with its own defaults
        return []
    left = list(refs)
    while left:
        _, left = ray.wait(left, num_returns=len(left), timeout=POLL_S)
        raise_if_interrupted()
    return ray.get(list(refs))


def _trial_failure(result) -> Dict[str, str]:
    """``{"reason": one line, "traceback": ...}`` of a failed Tune result: a reported ``trial_error`` (the
    detector raised; not retried), an error Tune kept after its retries, or a trial that reported nothing."""
    metrics = result.metrics or {}
    if "trial_error" in metrics:
        return {"reason": str(metrics["trial_error"]), "traceback": str(metrics.get("trial_traceback", ""))}
    if result.error is not None:
        return {"reason": _task_failure(result.error), "traceback": str(result.error)}
    return {"reason": "the trial reported no result", "traceback": ""}


def _task_failure(exc: BaseException) -> str:
    """One line for an error raised in a Ray task or trial (the cause, not Ray's wrapper)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def _is_metric(key: str) -> bool:
    return key.startswith(("val_", "test/", "near/", "far/"))


def _bb_dict(bb: BackbonePlan) -> Dict:
    return {"key": bb.key, "label": bb.label, "arch": bb.arch, "params": bb.params, "train": bb.train,
            "seed": bb.seed, "checkpoint_uri": bb.checkpoint_uri, "checkpoint": bb.checkpoint}


def _feature_dict(f) -> Dict:
    return {"key": f.key, "uri": f.uri, "dataset": {**asdict(f.dataset)}}


class StageClock:
    """Wall time per stage of a sweep (train, extract, search, test, report; Ray's start on its own), for the
    closing line and MLflow: no time is spent outside a named stage."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.current = None
        self._since = time.perf_counter()

    def start(self, name) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._since
        self.current, self._since = name, now

    def stop(self) -> Dict[str, float]:
        self.start(None)
        return self.seconds

    def line(self) -> str:
        return ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items() if s >= 0.05)


class SweepRunner:
    def __init__(self, cfg: SweepConfig, config_text: str):
        from orchestrator.preflight import check_environment

        self.cfg = cfg.model_copy(update={"storage": absolute_storage(cfg.storage)})
        check_environment(self.cfg)  # storage writable, tracking store reachable: seconds, before any work
        self.config_text = config_text
        self.plan: SweepPlan = make_plan(self.cfg)
        check_inputs(self.cfg, fetch=True)  # missing data or weights: one clear error before any work
        if self.plan.n_train is None:  # fetched just now: check the search points against its size too
            self.plan = make_plan(self.cfg)
        self.tracking_uri = self.cfg.resolved_tracking_uri()
        self._ray_started = False
        self.clock = StageClock()
        #: the command that opens this sweep's MLflow store (the CLI names the sweep file in it)
        self.ui_command = "python -m orchestrator ui"
        #: one line per (backbone, detector) search with failed trials (the sweep then exits 1)
        self.failures: List[str] = []
        #: identity of this sweep: an interrupted run of the same config is resumed, not duplicated
        self.sweep_key = content_key({"config": self.cfg.model_dump()})

    # ------------------------------------------------------------------ stages
    def train(self, tracker: Tracker, parent: str) -> Dict[str, Dict]:
        import ray

        from ood_core import storage
        from ood_core.checkpoints import CheckpointError, load_checkpoint
        from tasks.train import train_backbone

        cfg, plan = self.cfg, self.plan
        res = cfg.resources
        remote = ray.remote(train_backbone).options(num_cpus=res.cpus_per_task, num_gpus=res.gpus_per_task,
                                                    max_retries=res.max_retries)
        id_data = {"dataset": cfg.data.id.dataset, "params": cfg.data.id.params, "seed": cfg.seed}
        # not in the plan's train section (nor the cache key): it changes the logged history, not the weights
        nc_samples = {b.name: b.train.neural_collapse_samples for b in cfg.backbones}
        results: Dict[str, Dict] = {}
        pending = {}
        for bb in plan.backbones:
            check = storage.verify_cached(bb.checkpoint_uri, "checkpoint", redo="retraining")  # content vs its sha256
            if check.ok:
                try:
                    _state, meta = load_checkpoint(bb.checkpoint_uri)
                    results[bb.key] = {"key": bb.key, "history": meta.get("history", []), "cached": True,
                                       "sha256": check.sha256, "seconds": 0.0}
                    _say(f"[train] {bb.label}: reusing cached checkpoint {bb.key}")
                    continue
                except CheckpointError as exc:  # intact bytes that do not load: set aside too
                    check = storage.Cached(False, storage.discard_cached(bb.checkpoint_uri, "checkpoint", str(exc),
                                                                         "retraining"))
            if check.note:  # damaged (set aside) or written without a hash
                _say(f"[train] {bb.label}: {check.note}")
            _say(f"[train] {bb.label}: training {bb.arch} for {bb.train['epochs']} epochs")
            self._ray()
            pending[bb.key] = remote.remote({**_bb_dict(bb), "neural_collapse_samples": nc_samples[bb.name]},
                                            plan.num_classes, plan.input_format, id_data)
        for key, value in zip(pending, ray_get(list(pending.values()))):
            results[key] = value
        for bb in plan.backbones:
            r = results[bb.key]
            began = int((time.time() - r["seconds"]) * 1000) if not r["cached"] else None  # the task's own start
            rid, finished = tracker.child(parent, f"train {bb.name} ({bb.arch}) seed {bb.seed}",
                                          {"stage": "train", "backbone": bb.label}, start_time=began)
            if finished:  # logged before this sweep was interrupted
                continue
            with tracker.closing(rid):
                tracker.log(rid, params={"arch": bb.arch, "seed": bb.seed, "backbone_key": bb.key,
                                         **{f"params.{k}": v for k, v in bb.params.items()},
                                         **{f"train.{k}": v for k, v in bb.train.items()},
                                         "train.neural_collapse_samples": nc_samples[bb.name]},
                            tags={"cached": str(r["cached"]).lower(), "checkpoint_sha256": r["sha256"],
                                  "objective": (bb.train.get("objective") or {"name": "cross_entropy"})["name"]},
                            metrics={} if r["cached"] else {"train_seconds": r["seconds"]})  # cached: no training
                tracker.log_history(rid, r["history"])
                if not artifacts.log_collapse_curves(tracker, rid, f"train {bb.name} ({bb.arch}) seed {bb.seed}",
                                                     r["history"]) and nc_samples[bb.name] and r["history"]:
                    _say(f"[train] {bb.label}: no neural-collapse curves: its cached checkpoint was trained without "
                         f"them (delete {bb.checkpoint_uri} to retrain with them)")
                if self._local(bb.checkpoint_uri):
                    tracker.log_artifact(rid, bb.checkpoint_uri, "checkpoint")
        return results

    def neural_collapse(self, tracker: Tracker = None, parent: str = None) -> Dict[str, Dict[str, float]]:
        """Final neural-collapse values per backbone label from the cached features (a Ray task each:
        :func:`tasks.analysis.neural_collapse_analysis`, its result cached under ``<storage>/analysis/``): NC1-NC4 on ID train, NC5 against each OOD validation set
        and pooled. Skipped with one line when the sweep does not extract ``penultimate``; a backbone whose values
        cannot be computed (a ``ValueError`` of the diagnostics) gets one line and no values (a diagnostic does not
        fail the sweep). With ``tracker``,
        logged on the sweep run ``parent``: the table ``neural_collapse.csv`` and metrics
        ``neural_collapse.<backbone>.<key>``."""
        import ray

        from tasks.analysis import neural_collapse_analysis

        todo = [bb for bb in self.plan.backbones if "penultimate" in bb.columns]
        if not todo:
            _say("[collapse] skipped: the sweep does not extract 'penultimate' (add it to extract.layers)")
            return {}
        values: Dict[str, Dict[str, float]] = {}
        keys = {bb.label: search_cache.analysis_key("neural_collapse", [f.key for f in bb.features], bb.key)
                for bb in todo}
        for bb in todo:  # cached by the features it reads: a rerun starts no Ray for it
            found = search_cache.load_analysis(self.cfg.storage, keys[bb.label], bb.label)
            if found is not None:
                values[bb.label] = found
        todo = [bb for bb in todo if bb.label not in values]
        if todo:
            self._ray()
            res = self.cfg.resources
            remote = ray.remote(neural_collapse_analysis).options(num_cpus=res.cpus_per_task,
                                                                  max_retries=res.max_retries)
            refs = {bb.label: remote.remote({f.dataset.label: {"uri": f.uri, "role": f.dataset.role}
                                             for f in bb.features}, bb.checkpoint_uri, bb.columns) for bb in todo}
            for label, ref in refs.items():
                try:
                    values[label] = ray_get([ref])[0]
                except ray.exceptions.RayTaskError as exc:
                    if not isinstance(getattr(exc, "cause", None), ValueError):  # an internal fault: its traceback
                        raise
                    _say(f"[collapse] {label}: not computed: {_task_failure(exc)}")  # e.g. non-finite features
                    continue
                search_cache.save_analysis(self.cfg.storage, keys[label], values[label])
        values = {bb.label: values[bb.label] for bb in self.plan.backbones if bb.label in values}  # plan order
        if tracker is not None and values:
            import pandas as pd

            tracker.log_table(parent, pd.DataFrame([{"backbone": k, **v} for k, v in values.items()]),
                              "neural_collapse")
            tracker.log(parent, metrics={f"neural_collapse.{bb}.{k}": v for bb, vals in values.items()
                                         for k, v in vals.items()})
        return values

    def extract(self) -> None:
        import ray
        from ood_core.feature_store import check_feature_file
        from tasks.extract import extract_dataset, merge_shards

        cfg, plan = self.cfg, self.plan
        res = cfg.resources
        remote = ray.remote(extract_dataset).options(num_cpus=res.cpus_per_task, num_gpus=res.gpus_per_task,
                                                     max_retries=res.max_retries)
        merge = ray.remote(merge_shards).options(num_cpus=min(1, res.cpus_per_task), max_retries=res.max_retries)
        todo, cached = [], 0
        for bb in plan.backbones:
            for f in bb.features:
                check = check_feature_file(f.uri, bb.columns)  # content vs its sha256, then structure
                if check.note:  # damaged (set aside) or written without a hash
                    _say(f"[extract] {bb.label}/{f.dataset.label}: {check.note}")
                if check.ok:
                    cached += 1
                else:
                    todo.append((bb, f))
        total = cached + len(todo)
        if cached:
            _say(f"[extract] reusing {cached} of {total} cached feature files")
        if not todo:
            return
        self._ray()
        shards = self._shards()
        _say(f"[extract] extracting {len(todo)} feature files "
             f"({', '.join(str(len(bb.layers)) for bb in plan.backbones)} representations per backbone)"
             + (f"; ID train in {len(shards)} shards of up to {shards[0][1]} rows" if shards else ""))
        waiting: Dict = {}  # ref -> (backbone, feature job, the shard parts when this ref is one of them)
        for bb, f in todo:
            args = (_bb_dict(bb), {**_feature_dict(f), "dtype": cfg.extract.dtype}, bb.layers, plan.num_classes,
                    plan.input_format, cfg.extract.batch_size)
            if shards and f.dataset.role == "id_train":
                token = uuid.uuid4().hex[:8]  # this sweep's parts: a concurrent sweep on the same store has its own
                parts = [f"{f.uri}.rows{a}-{b}.{token}" for a, b in shards]
                for (a, b), part in zip(shards, parts):
                    waiting[remote.remote(*args, shard=(a, b, part))] = (bb, f, parts)
            else:
                waiting[remote.remote(*args)] = (bb, f, None)
        shards_left = {}
        with driver_progress(len(todo), "extract", "sets") as bar:
            while waiting:
                done, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
                raise_if_interrupted()
                for ref in done:
                    ray.get(ref)
                    bb, f, parts = waiting.pop(ref)
                    if parts is None:
                        bar.update(1)
                        continue
                    shards_left[f.uri] = shards_left.get(f.uri, len(parts)) - 1
                    if shards_left[f.uri] == 0:  # every shard written: one merge task joins them
                        waiting[merge.remote(_feature_dict(f), parts)] = (bb, f, None)

    def _shards(self) -> List[Tuple[int, int]]:
        """Row ranges ``[(start, stop), ...]`` that split the ID training set over the cluster's task slots (a
        slot: ``cpus_per_task`` CPUs, or ``gpus_per_task`` GPUs when tasks take GPUs), each starting on a batch
        boundary and at least 4 batches long; ``[]`` when the set is too small to gain from it (or its size is
        unknown). One task per set would leave the other slots idle for most of the stage: the ID training set
        is usually most of the images."""
        import ray

        res, n, batch = self.cfg.resources, self.plan.n_train, self.cfg.extract.batch_size
        if not n:
            return []
        avail = ray.cluster_resources()
        slots = int(avail.get("GPU", 0) // res.gpus_per_task) if res.gpus_per_task else \
            int(avail.get("CPU", 0) // max(res.cpus_per_task, 1e-9))
        batches = -(-n // batch)
        count = min(slots, batches // 4)
        if count < 2:
            return []
        per = -(-batches // count) * batch
        return [(a, min(a + per, n)) for a in range(0, n, per)]

    def context(self, bb: BackbonePlan, det) -> Dict:
        from ood_core.detectors.registry import get_spec

        spec = get_spec(det.type)
        return {
            "detector": spec.name, "fixed": dict(det.params), "columns": bb.columns,
            "backbone": _bb_dict(bb), "num_classes": self.plan.num_classes, "format": self.plan.input_format,
            "sets": {f.dataset.label: {"uri": f.uri, "role": f.dataset.role, "dataset": asdict(f.dataset)}
                     for f in bb.features},
            "outliers": [{"dataset": asdict(job)} for job in outlier_jobs(self.cfg)] if spec.needs_outliers else [],
            "batch_size": self.cfg.extract.batch_size,
            "score_test_every_trial": self.cfg.search.score_test_every_trial,
            "fit_on": det.fit_on,
        }

    def search(self, tracker: Tracker, parent: str) -> List[Dict]:
        """Search every (backbone, detector) pair; unchanged searches come from the search cache."""
        from ood_core.detectors.registry import get_spec
        from orchestrator.search import (BatchedMLflowCallback, TrialProgress, entry_variants, run_search,
                                         spread_shared_statistics)
        from tasks.evaluate import at_chance, backbone_accuracy, constant, load_scores, tune_trial

        cfg, plan = self.cfg, self.plan
        metric, mode = cfg.search.metric, cfg.search.mode
        entries, contexts, runs, info, cached, logged = [], {}, {}, {}, {}, set()
        for bb in plan.backbones:
            for det in cfg.detectors:
                spec = get_spec(det.type)
                space = bb.searches[det.label]
                num_samples = det.num_samples or cfg.search.num_samples
                key = f"{bb.label}/{det.label}"
                inputs = search_inputs(cfg, bb, det, spec)
                skey = search_cache.search_key(inputs, spec.name, det.params, space, num_samples, metric, cfg.seed,
                                               cfg.search.algorithm, cfg.search.score_test_every_trial)
                info[key] = (bb, det, space, skey)
                runs[key], done = tracker.child(parent, f"{det.label} @ {bb.label}",
                                                {"stage": "detector", "backbone": bb.label, "detector": det.label})
                if done:
                    logged.add(key)
                record = search_cache.load(cfg.storage, skey, label=key)
                if record is not None:
                    cached[key] = {**record, "failed": []}
                    continue
                contexts[key] = self.context(bb, det)
                entries.append({"key": key, "search": space, "num_samples": num_samples,
                                "tags": {"backbone": bb.label, "detector": det.label}})
        if cached:
            _say(f"[search] reusing {len(cached)} of {len(info)} cached searches")
        # searches that run the network in their trials first: their test scoring, done by their last trial,
        # then overlaps the other searches instead of ending the stage (the table keeps the sweep's order)
        entries.sort(key=lambda e: get_spec(info[e["key"]][1].type).representation not in ("model", "feature_maps"))
        entries = spread_shared_statistics(entries, lambda e: [
            (info[e["key"]][0].label, s) for s in get_spec(info[e["key"]][1].type).cls.shared_statistics])
        if entries:
            if cfg.search.algorithm == "optuna":
                total = sum(e["num_samples"] for e in entries)
            else:
                total = sum(len(entry_variants(e["search"], e["num_samples"], cfg.seed, e["key"])) for e in entries)
            tested = "every trial scored on test too" if cfg.search.score_test_every_trial else \
                "the selected ones scored on test once"
            _say(f"[search] {len(entries)} searches, {total} trials, selected on val_{metric} ({mode}) only; "
                 f"{tested}")
            self._ray()
            if cfg.search.algorithm == "basic":  # the last trial of each search tests its selection at once
                self._attach_ledger(entries, contexts, info)
            callback = BatchedMLflowCallback(
                tracking_uri=self.tracking_uri, experiment_name=cfg.name, tags={"stage": "trial", "cached": "false"}, parents=runs,
                metric_filter=_is_metric,
            )
            with driver_progress(total, "search", "trials") as bar:
                by_key = run_search(
                    tune_trial, contexts, entries, metric=metric, mode=mode,
                    max_concurrent=cfg.search.max_concurrent_trials, storage_path=join_uri(cfg.storage, "tune"),
                    name=f"{cfg.name}-{self.sweep_key[:12]}", seed=cfg.seed,
                    resources={"cpu": 1, "gpu": cfg.resources.gpus_per_trial},
                    callbacks=[callback, TrialProgress(bar)], max_failures=cfg.resources.max_retries,
                    algorithm=cfg.search.algorithm,
                )
            self.clock.start("test")
            fresh = self._finish_searches(by_key, contexts, info)
        else:
            fresh = {}
        self.clock.start("report")
        rows: List[Dict] = []
        panels: Dict[str, Dict] = {}
        for key, (bb, det, space, skey) in info.items():
            record = cached.get(key) or fresh[key]
            row = {"backbone": bb.label, "backbone_name": bb.name, "seed": bb.seed, "backbone_key": bb.key,
                   "detector": det.label, "type": det.type, "trials": len(record["trials"]) + len(record["failed"]),
                   "failed_trials": record["failed"]}
            if record["selected"] is None:  # every trial failed: a FAILED row, the other detectors go on
                row.update(selected={}, failed=record["failed"][0]["reason"])
                if key not in logged:
                    self._log_failed_detector(tracker, runs[key], det, space, record)
                rows.append(row)
                continue
            best = record["trials"][record["selected"]]
            scores = load_scores(search_cache.paths(cfg.storage, skey)["scores"])
            if key not in logged:
                self._log_detector(tracker, runs[key], bb, det, space, skey, record, scores, reused=key in cached)
            panels.setdefault(bb.label, {})[det.label] = (scores["id-test"],
                                                          {k: v for k, v in scores.items() if k != "id-test"})
            row.update(selected=best["params"], constant_scores=constant(scores), **best["metrics"])
            if row["constant_scores"]:
                tracker.log(runs[key], tags={"constant_scores": "true"})
            rows.append(row)
        artifacts.log_roc_grids(tracker, parent, panels)
        id_test = {bb.key: next(f.uri for f in bb.features if f.dataset.role == "id_test") for bb in plan.backbones}
        for row in rows:
            row["id_accuracy"] = backbone_accuracy(id_test[row["backbone_key"]])
            row["chance"] = 1.0 / plan.num_classes
            row["at_chance"] = at_chance(id_test[row["backbone_key"]], plan.num_classes)
        if any(r["failed_trials"] for r in rows):  # a rerun runs those searches again from scratch
            self._forget_tune_experiments()
        return rows

    def _log_failed_detector(self, tracker: Tracker, run_id: str, det, space, record) -> None:
        """The run of a (backbone, detector) pair whose every trial failed: FAILED, the reason as a tag."""
        first = record["failed"][0]
        tracker.log(run_id, params={**{f"fixed.{k}": v for k, v in det.params.items()}, "search_space": space,
                                    "trials": len(record["failed"])},
                    tags={"cached": "false", "error": first["reason"][:5000]})
        tracker.log_text(run_id, first.get("traceback") or first["reason"], "error.txt")
        tracker.end_run(run_id, "FAILED")

    def _forget_tune_experiments(self) -> None:
        """Remove this sweep's Tune experiments, so that a rerun runs its failed trials again instead of
        restoring them (searches that finished are in the search cache)."""
        import pyarrow.fs as pafs

        from ood_core import storage

        prefix = f"{self.cfg.name}-{self.sweep_key[:12]}"
        fs, root = storage.resolve(join_uri(self.cfg.storage, "tune"))
        for entry in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            if entry.type == pafs.FileType.Directory and (entry.base_name == prefix or
                                                           entry.base_name.startswith(prefix + "-optuna-")):
                fs.delete_dir(entry.path)

    def _log_detector(self, tracker: Tracker, run_id: str, bb, det, space, skey, record, scores, reused: bool):
        """The (backbone, detector) run: selected configuration, its metrics and figures; trials of a reused search."""
        trials = record["trials"]
        best = trials[record["selected"]]
        with tracker.closing(run_id):
            if reused:  # a reused search still gets its complete set of runs in this sweep
                for i, t in enumerate(trials):
                    rid, finished = tracker.child(run_id, report.trial_run_name(det.label, t["params"]),
                                                  {"stage": "trial", "trial_index": str(i)})
                    if not finished:  # what the trial itself scored: the selected one's test scores are the detector run's
                        own = t["metrics"] if self.cfg.search.score_test_every_trial else \
                            {k: v for k, v in t["metrics"].items() if not is_test_metric(k)}
                        with tracker.closing(rid):
                            tracker.log(rid, params=t["params"], metrics=own,
                                        tags={"cached": "true", "backbone": bb.label, "detector": det.label})
            tracker.log(run_id, params={**{f"fixed.{k}": v for k, v in det.params.items()},
                                        **{f"selected.{k}": v for k, v in best["params"].items()},
                                        "search_space": space, "trials": len(trials)},
                        metrics=best["metrics"], tags={"cached": str(reused).lower(), "search_key": skey,
                                                       "backbone_name": bb.name, "arch": bb.arch,
                                                       "objective": "none (checkpoint)" if bb.checkpoint else
                                                       (bb.train.get("objective") or {}).get("name", "cross_entropy")})
            chosen = report.format_params(best["params"])
            artifacts.log_detector_figures(tracker, run_id, f"{det.label} @ {bb.label}" +
                                           (f" ({chosen})" if chosen != "-" else ""), scores)
            artifacts.log_exit_figures(tracker, run_id, det.label, det.params.get("layers", []),
                                       search_cache.paths(self.cfg.storage, skey)["scores"])

    def _attach_ledger(self, entries, contexts, info) -> None:
        """A :class:`tasks.selection.SelectionLedger` for this search stage, known to every trial."""
        import ray

        from orchestrator.search import entry_variants
        from tasks.selection import SelectionLedger

        cfg = self.cfg
        expected = {e["key"]: len(entry_variants(e["search"], e["num_samples"], cfg.seed, e["key"])) for e in entries}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)  # the driver's node
        ledger = ray.remote(SelectionLedger).options(num_cpus=0, scheduling_strategy=here).remote(
            expected, cfg.search.metric, cfg.search.mode)
        for key, context in contexts.items():
            context.update(ledger=ledger, scores_uri=search_cache.paths(cfg.storage, info[key][3])["scores"])

    def _finish_searches(self, by_key, contexts, info) -> Dict[str, Dict]:
        """Per search: its trials that reported metrics, those that failed (parameters, one-line reason,
        traceback), the one selected on validation and its test scores. Only a search without failed trials
        is cached as complete; one whose every trial failed gets no selection (``selected`` None)."""
        import ray

        from orchestrator.search import select_best
        from tasks.evaluate import TEST_ROLES, entry_of, final_scores

        cfg = self.cfg
        metric, mode = cfg.search.metric, cfg.search.mode
        remote = ray.remote(final_scores).options(num_cpus=1, num_gpus=cfg.resources.gpus_per_trial,
                                                  max_retries=cfg.resources.max_retries)
        ledger = next((c["ledger"] for c in contexts.values() if c.get("ledger") is not None), None)
        try:
            tested = ray.get(ledger.results.remote()) if ledger is not None else {}
        except ray.exceptions.RayError:  # its node was lost: every selection is tested in the test stage
            tested = {}
        records, pending, during = {}, {}, 0
        for key, results in by_key.items():
            ok = [r for r in results if r.error is None and f"val_{metric}" in r.metrics]
            trials = [{"params": entry_of(r.config)[1],
                       "metrics": {k: float(v) for k, v in r.metrics.items() if _is_metric(k)}} for r in ok]
            failed = [{"params": entry_of(r.config)[1], **_trial_failure(r)} for r in results if r not in ok]
            records[key] = {"trials": trials, "failed": failed, "selected": None}
            if not ok:
                continue
            best = select_best(ok, metric, mode)
            records[key]["selected"] = next(i for i, r in enumerate(ok) if r is best)
            selected = trials[records[key]["selected"]]
            done = tested.get(key)
            if done is not None and done["index"] == best.config["entry"].get("index"):  # tested in the search
                during += 1
                if "metrics" in done:
                    selected["metrics"].update(done["metrics"])
                else:
                    self._test_failed(records[key], selected, done["error"], done.get("traceback", ""))
                if not records[key]["failed"]:
                    search_cache.save(cfg.storage, info[key][3], trials, records[key]["selected"])
                continue
            uri = search_cache.paths(cfg.storage, info[key][3])["scores"]
            pending[key] = remote.remote(contexts[key], selected["params"], uri)
        if during:
            _say(f"[test] {during} of {during + len(pending)} selected configurations scored on the test sets by "
                 "the last trial of their search")
        if pending:
            sets = len([e for e in next(iter(contexts.values()))["sets"].values() if e["role"] in TEST_ROLES])
            _say(f"[test] scoring the selected configuration of {len(pending)} searches on {sets} test sets")
        with driver_progress(len(pending), "test", "searches") as bar:
            left = dict(pending)
            while left:
                done, _ = ray.wait(list(left.values()), num_returns=1, timeout=POLL_S)
                raise_if_interrupted()
                for ref in done:
                    key = next(k for k, r in left.items() if r == ref)
                    del left[key]
                    bar.update(1)
                    selected = records[key]["trials"][records[key]["selected"]]
                    try:
                        selected["metrics"].update(ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - the selected configuration failed on a test set
                        self._test_failed(records[key], selected, _task_failure(exc), str(exc))
                        continue
                    if not records[key]["failed"]:
                        search_cache.save(cfg.storage, info[key][3], records[key]["trials"],
                                          records[key]["selected"])
        return records

    @staticmethod
    def _test_failed(record: Dict, selected: Dict, reason: str, traceback: str) -> None:
        """The selected configuration failed on a test set: the search has no result (a FAILED row)."""
        record["failed"].append({"params": selected["params"], "reason": f"test scoring: {reason}",
                                 "traceback": traceback})
        record.update(trials=[], selected=None)

    def _ray(self) -> None:
        if not self._ray_started:
            stage = self.clock.current
            self.clock.start("ray start")
            init_ray()
            self._ray_started = True
            self.clock.start(stage)

    def _work_for_ray(self) -> bool:
        """Whether a stage will certainly run Ray tasks: a checkpoint to train or a feature file to extract is
        absent (existence only; damaged files are found by the stages, which start Ray when they need it)."""
        from ood_core.storage import exists

        return any((bb.checkpoint is None and not exists(bb.checkpoint_uri))
                   or any(not exists(f.uri) for f in bb.features) for bb in self.plan.backbones)

    def _open_tracker(self) -> Tracker:
        """The sweep's MLflow tracker; when the sweep will need Ray, Ray starts meanwhile (both take seconds:
        MLflow creating or checking its store, Ray its processes)."""
        if self._ray_started or not self._work_for_ray():
            return Tracker(self.tracking_uri, self.cfg.name)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-store") as pool:
            opening = pool.submit(Tracker, self.tracking_uri, self.cfg.name)
            try:
                self._ray()  # in this thread: Ray's start does not work from another one
            finally:
                tracker = opening.result()
        return tracker

    @staticmethod
    def _local(uri: str) -> bool:
        return "://" not in uri or uri.startswith("file://")

    # ------------------------------------------------------------------ all
    def check_cluster(self) -> None:
        """On a multi-node Ray cluster, refuse storage or tracking that only this node can see.

        Runs when the sweep joins a cluster (``RAY_ADDRESS``, e.g. under ``ray job submit``, or an
        already connected driver), before any work starts.
        """
        import ray

        if not (ray.is_initialized() or os.environ.get("RAY_ADDRESS")):
            return  # a local Ray instance: one node
        self._ray()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) <= 1:
            return
        problems = []
        if "://" not in self.cfg.storage and not self.cfg.shared_storage:
            problems.append(f"storage {self.cfg.storage!r} is a node-local path (use an s3:// or gs:// URI, or a "
                            "shared mount with shared_storage: true)")
        uri = self.tracking_uri
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            problems.append(f"tracking_uri {uri!r} is a local store (run an MLflow tracking server on the head and "
                            "set tracking_uri: http://127.0.0.1:5000, see README)")
        if problems:
            raise UserError(f"this Ray cluster has {len(nodes)} nodes, but " + "; and ".join(problems))

    def run(self, wait: bool = False) -> List[Dict]:
        """Run the sweep; a second invocation of the same sweep exits (or, with ``wait``, waits) while this
        one runs (:mod:`orchestrator.lock`)."""
        from orchestrator.lock import SweepLock, lock_path

        self.check_cluster()  # storage or tracking that only this node sees: refused before anything is written
        with SweepLock(lock_path(self.cfg.storage, self.sweep_key), self.cfg.name) as lock:
            lock.acquire(wait=wait, say=_say)
            with latched_sigint():
                return self._run()

    def _run(self) -> List[Dict]:
        cfg = self.cfg
        started = time.perf_counter()
        self.clock.start("setup")
        tracker = self._open_tracker()
        _say(f"[sweep] {cfg.name}: {len(self.plan.backbones)} backbone(s), {len(cfg.detectors)} detector(s); "
             f"MLflow {self.tracking_uri}, experiment {cfg.name!r}")
        parent, resumed = tracker.open_sweep(f"sweep {cfg.name}", self.sweep_key)
        if resumed:
            _say(f"[sweep] resuming the interrupted sweep run {parent}")
        with tracker.closing(parent):
            tracker.log_text(parent, self.config_text, "config/sweep.yaml")
            tracker.log_text(parent, json.dumps(cfg.model_dump(), indent=2), "config/resolved.json")
            tracker.log(parent, params={k: v for k, v in flatten(cfg.model_dump(exclude={"detectors"})).items()})
            self.clock.start("train")
            self.train(tracker, parent)
            raise_if_interrupted()
            self.clock.start("extract")
            self.extract()
            raise_if_interrupted()
            self.clock.start("search")
            rows = self.search(tracker, parent)  # then "test" and "report"
            raise_if_interrupted()
            artifacts.log_layer_analysis(tracker, parent, self.plan)
            collapse = self.neural_collapse(tracker, parent)
            report.add_collapse(rows, collapse)  # columns of results.csv too
            frame = report.results_frame(rows)
            tracker.log_table(parent, frame, "results")
            fpr = cfg.report.fpr95
            summary = report.seed_summary(rows, fpr=fpr)
            if summary:
                tracker.log_text(parent, report.format_seed_table(summary, fpr=fpr), "results_over_seeds.txt")
            from ood_core.plots import detector_comparison_figure

            by_backbone: Dict[str, List[Dict]] = {}  # seeds of one backbone are averaged, other backbones not
            for r in rows:
                if not r.get("failed"):
                    by_backbone.setdefault(r["backbone_name"], []).append(r)
            for name, scored in by_backbone.items():
                several = len(by_backbone) > 1
                tracker.log_figure(parent, lambda scored=scored, name=name, several=several: detector_comparison_figure(
                    scored, title=f"Selected detectors on {name}: test AUROC per OOD group" if several else None),
                    f"detector_comparison_{name}.png" if several else "detector_comparison.png")
            if len(by_backbone) > 1:  # backbones that differ in architecture or objective, side by side
                from ood_core.plots import backbone_comparison_figure

                compared = [r for group in by_backbone.values() for r in group]
                tracker.log_figure(parent, lambda: backbone_comparison_figure(compared), "backbone_comparison.png")
            board = leaderboard.log_deltas(tracker, parent, cfg, rows) if cfg.report.leaderboard else ""
            overlap = val_test_overlap(cfg)
            flagged = report.problems(rows)
            self.failures = [f"{r['detector']} @ {r['backbone']}: " + (
                f"every trial failed; {r['failed']}" if r.get("failed") else
                f"{report.trials_cell(r)} trials finished; {r['failed_trials'][0]['reason']}")
                for r in rows if r.get("failed") or r["failed_trials"]]
            tracker.wait_figures()  # rendered while the sweep went on; the summary page embeds them
            stages = self.clock.stop()
            tracker.log(parent, metrics={**report.summary_metrics(rows),
                                         **{f"seconds/{name.replace(' ', '_')}": s for name, s in stages.items()}},
                        tags={"sweep_seconds": f"{time.perf_counter() - started:.1f}",
                              "optimistic": str(bool(overlap)).lower(),
                              **({"optimistic_sets": ",".join(overlap)} if overlap else {}),
                              "failed_searches": str(len(self.failures)),
                              **({"problems": "\n".join(flagged)[:5000]} if flagged else {}),
                              "collapsed_backbones": ",".join(sorted({r["backbone"] for r in rows if r["at_chance"]}))})
            tracker.log_text(parent, summary_html(cfg.name, rows, stages=stages, optimistic=bool(overlap),
                                                  sweep_seconds=time.perf_counter() - started,
                                                  config_text=self.config_text,
                                                  blocks=[report.format_collapse(collapse)] * bool(collapse) +
                                                  [board] * bool(board), fpr=fpr,
                                                  figures=ordered_figures(tracker.figures.get(parent, {}))), "summary.html")
        _say("")
        _say(report.format_table(rows, metric_groups=("near", "far"), optimistic=bool(overlap), fpr=fpr))
        if board:
            _say("\n" + board)
        if collapse:
            _say("\n" + report.format_collapse(collapse))
        self.seconds = time.perf_counter() - started
        _say(f"\n[sweep] done in {self.seconds:.1f} s ({self.clock.line()}); browse with: {self.ui_command}")
        return rows
