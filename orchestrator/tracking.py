"""MLflow tracking: one experiment per sweep, nested runs, batched logging.

Layout of a sweep in MLflow::

    <sweep name> (experiment)
    └── sweep run                 resolved config, results table, figures, summary metrics, summary.html
        ├── train <backbone>      per-epoch loss / accuracy, checkpoint, its sha256
        └── <detector> @ <bb>     selected hyperparameters, val + test metrics, ROC / histogram figures
            └── trial runs        one per Tune trial: parameters, validation metrics
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Tuple

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
#: how long a store that another process holds (a locked sqlite file, tables being created) is waited for
STORE_WAIT_S = 120.0
_BUSY = ("database is locked", "database table is locked", "already exists", "unique constraint failed",
         "duplicate column name",
         "no such table")  # the last: another process is creating MLflow's tables right now
_DAMAGED = ("file is not a database", "database disk image is malformed")


def store_call(fn, uri: str, say=print):
    """``fn()`` against the tracking store at ``uri``: a store that another process holds (a locked sqlite
    file, MLflow's tables being created by a concurrent sweep) is waited for, up to :data:`STORE_WAIT_S`,
    with one message; a damaged store is one line (:class:`UserError`)."""
    from orchestrator.errors import UserError

    deadline, told = time.monotonic() + STORE_WAIT_S, False
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised otherwise
            text = str(exc).lower()
            if any(t in text for t in _DAMAGED):
                reason = next(t for t in _DAMAGED if t in text)
                raise UserError(f"tracking store {uri} cannot be used ({reason}); move the file aside or set "
                                "tracking_uri to another store") from None
            if not any(t in text for t in _BUSY) or time.monotonic() > deadline:
                raise
            if not told:
                say(f"[mlflow] the tracking store {uri} is busy (another process is using it); waiting up to "
                    f"{STORE_WAIT_S:.0f} s")
                told = True
            time.sleep(0.5)


@contextmanager
def creation_lock(uri: str):
    """Hold an exclusive ``flock`` on a sqlite store's file while MLflow opens it (creating or migrating its
    tables), so that sweeps started together do not run the migration twice; other stores: nothing."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = uri[len("sqlite:///"):]
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab") as f:  # an empty file is an empty sqlite database
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _StoreClient:
    """An :class:`MlflowClient` whose every call goes through :func:`store_call`."""

    def __init__(self, client: MlflowClient, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *a, **k: store_call(lambda: attr(*a, **k), self._uri)


#: the experiment tag MLflow 3's UI reads to choose its view, and the value of the classic runs / metrics view
EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"


class Tracker:
    """Thin wrapper over :class:`MlflowClient` for one sweep's runs."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        with creation_lock(tracking_uri):  # MLflow's table creation / migration is not safe to run twice at once
            self.client = _StoreClient(store_call(lambda: MlflowClient(tracking_uri), tracking_uri), tracking_uri)
            self.experiment_id = store_call(lambda: self._experiment_id(experiment), tracking_uri)
        self.experiment = experiment
        #: PNG bytes of the figures logged through this tracker, per run (for the summary page)
        self.figures: Dict[str, Dict[str, bytes]] = {}
        self._figure_pool = None
        self._pending_figures: list = []

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created when absent (a concurrent creation makes the retry find it)."""
        exp = self.client._client.get_experiment_by_name(name)
        if exp is None:
            # MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts, an assistant);
            # a sweep is model development: runs, metrics, artifacts
            return self.client._client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created by an older ood-sweep or by hand
            self.client._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        return exp.experiment_id

    # -- runs --------------------------------------------------------------------------
    def start_run(self, name: str, parent: Optional[str] = None, tags: Optional[Dict[str, str]] = None,
                  start_time: Optional[int] = None) -> str:
        """A new run; ``start_time`` (ms since the epoch) when the work it records began earlier (a training
        task's start), so that its duration in the UI is the work's."""
        all_tags = dict(tags or {})
        if parent:
            all_tags[PARENT_TAG] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags, start_time=start_time)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def run(self, name: str, parent: Optional[str] = None, tags: Optional[Dict[str, str]] = None):
        run_id = self.start_run(name, parent, tags)
        with self.closing(run_id):
            yield run_id

    @contextmanager
    def closing(self, run_id: str):
        """End ``run_id`` as FINISHED, or KILLED (Ctrl-C) / FAILED when the block raises."""
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, "KILLED" if _interrupted() else "FAILED")
            raise
        self.end_run(run_id)

    # -- resuming -------------------------------------------------------------------------
    def open_sweep(self, name: str, sweep_key: str) -> Tuple[str, bool]:
        """The sweep run for ``sweep_key``: an unfinished one is resumed, else a new one is created.

        An interrupted sweep (killed, failed, or still marked running because its process died)
        started again with the same config continues in the same MLflow run, so no run is duplicated.
        """
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.stage = 'sweep' and tags.sweep_key = '{sweep_key}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id, True
        return self.start_run(name, tags={"stage": "sweep", "sweep_key": sweep_key}), False

    def child(self, parent: str, name: str, tags: Dict[str, str], start_time: Optional[int] = None
              ) -> Tuple[str, bool]:
        """The child run of ``parent`` carrying ``tags`` (created when absent); ``(run_id, finished)``."""
        clauses = [f"tags.`{PARENT_TAG}` = '{parent}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        found = self.client.search_runs([self.experiment_id], filter_string=" and ".join(clauses), max_results=1)
        if found:
            run = found[0]
            return run.info.run_id, run.info.status == "FINISHED"
        return self.start_run(name, parent=parent, tags=tags, start_time=start_time), False

    # -- logging (always batched) -------------------------------------------------------
    def log(self, run_id: str, metrics: Optional[Dict[str, float]] = None, params: Optional[Dict] = None,
            tags: Optional[Dict[str, str]] = None, step: int = 0) -> None:
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        ps = [Param(k, _param_str(v)) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ms), len(ps), len(ts), 1), 900):
            self.client.log_batch(run_id, metrics=ms[i:i + 900], params=ps[i:i + 90], tags=ts[i:i + 90])

    def log_history(self, run_id: str, rows: Iterable[Dict]) -> None:
        """Per-epoch rows (each with an ``epoch`` field) as stepped metrics, in one batch."""
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(row["epoch"])) for row in rows for k, v in row.items() if k != "epoch"]
        for i in range(0, len(ms), 900):
            self.client.log_batch(run_id, metrics=ms[i:i + 900])

    def log_figure(self, run_id: str, figure, name: str) -> None:
        """A matplotlib figure as the PNG artifact ``name`` (rendered once; kept in :attr:`figures`).

        ``figure`` is a Figure, or a function that builds one: a function is built, rendered and logged on this
        tracker's one figure thread while the sweep goes on (its driver otherwise only waits on Ray; rendering
        took seconds per sweep), and matplotlib is then used by that thread alone. :meth:`wait_figures` waits for
        them and raises the first error."""
        if callable(figure) and not hasattr(figure, "savefig"):
            if self._figure_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._figure_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="figures")
            self._pending_figures.append(self._figure_pool.submit(self._render_and_log, run_id, figure, name))
            return
        self._render_and_log(run_id, lambda: figure, name)

    def wait_figures(self) -> None:
        """Wait until every figure given as a function is logged; the first error is raised here."""
        pending, self._pending_figures = self._pending_figures, []
        for future in pending:
            future.result()

    def _render_and_log(self, run_id: str, build, name: str) -> None:
        import io

        buf = io.BytesIO()
        build().savefig(buf, format="png")
        png = self.figures.setdefault(run_id, {})[name] = buf.getvalue()
        folder, base = os.path.split(name)
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, base), "wb") as fh:
                fh.write(png)
            self.client.log_artifact(run_id, os.path.join(tmp, base), folder or None)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_table(self, run_id: str, frame, name: str) -> None:
        """A pandas frame as CSV and Parquet artifacts (``name``.csv / .parquet)."""
        with tempfile.TemporaryDirectory() as tmp:
            frame.to_csv(os.path.join(tmp, f"{name}.csv"), index=False)
            frame.to_parquet(os.path.join(tmp, f"{name}.parquet"), index=False)
            self.client.log_artifacts(run_id, tmp)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_path)


def _param_str(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:6000]


def _interrupted() -> bool:
    import sys

    exc = sys.exc_info()[1]
    return isinstance(exc, KeyboardInterrupt)


def flatten(d: Dict, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def experiment_runs(tracking_uri: str, experiment: str) -> List:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=10000)
