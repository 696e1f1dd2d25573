"""Where a sweep's files and MLflow store are, resolved the one way ``sweep`` resolves them.

``sweep``, ``report``, ``ui`` and ``features`` all go through here, so a command run from another folder
finds what the sweep wrote or says where it looked; none of them ever creates a store:

* ``storage`` (checkpoints, feature files): a URI (``s3://...``) as it is; a plain path with ``~`` expanded
  and, when relative, taken against the **current folder** (as ``sweep`` takes it);
* the tracking store: the sweep file's ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default
  ``sqlite:///mlflow.db``. MLflow takes a relative SQLite path (``sqlite:///mlflow.db``, three slashes), a
  relative ``file:`` URI and a plain path (its file store) against the current folder too;
  :meth:`TrackingStore.absolute_uri` is the same store named absolutely.

:func:`require_store` is the check ``report`` and ``ui`` make before opening a store: MLflow's client creates
an empty SQLite database (or file store) wherever it is pointed, so a command run in the wrong folder used to
leave an empty ``mlflow.db`` there and report "no sweep". Now it stops with one line that names the absolute
location it looked at, the setting it came from and the folder relative settings were taken against.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from orchestrator.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_NAMED_STORES = ("databricks", "databricks-uc", "uc")  # MLflow's special URIs, also without "://"


def absolute_storage(uri: str) -> str:
    """``storage`` as ``sweep`` uses it: a URI unchanged, a plain path absolute (against the current folder)."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def is_relative_storage(uri: str) -> bool:
    return "://" not in uri and not Path(uri).expanduser().is_absolute()


@dataclass(frozen=True)
class TrackingStore:
    """An MLflow tracking store as a sweep resolves it.

    ``uri``: as configured; ``origin``: where it came from (``tracking_uri``, ``MLFLOW_TRACKING_URI`` or
    ``default tracking_uri``); ``kind``: ``sqlite`` (a database file), ``files`` (MLflow's file store, a
    folder), ``memory`` (an in-memory SQLite database) or ``remote`` (a server or a database server);
    ``path``: the absolute file or folder of a local store; ``relative``: ``uri`` names it relative to the
    current folder ``cwd``.
    """

    uri: str
    origin: str
    kind: str
    path: Optional[str] = None
    relative: bool = False
    cwd: str = ""

    @property
    def absolute_uri(self) -> str:
        """The same store named absolutely (what ``report`` and ``ui`` hand to MLflow)."""
        if self.kind == "sqlite":
            return "sqlite:///" + self.path  # sqlite:////abs/mlflow.db
        if self.kind == "files":
            return Path(self.path).as_uri()
        return self.uri

    @property
    def where(self) -> str:
        """The location for messages: the absolute path of a local store, else its URI."""
        return self.path or self.uri

    @property
    def setting(self) -> str:
        """How the store was given, for messages: ``tracking_uri sqlite:///mlflow.db, relative to ...``."""
        text = f"{self.origin} {self.uri}"
        return text + (f", relative to the current folder {self.cwd}" if self.relative else "")


def _origin(configured: Optional[str]) -> str:
    if configured:
        return "tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return "default tracking_uri"


def tracking_store(configured: Optional[str]) -> TrackingStore:
    """The store a sweep with ``tracking_uri: configured`` (None: not set) writes to, from the current folder."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    origin, cwd = _origin(configured), os.getcwd()
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if uri.split(":", 1)[0].lower() in _NAMED_STORES:
        return TrackingStore(uri, origin, "remote", cwd=cwd)
    if scheme.split("+", 1)[0] == "sqlite":
        rest = uri.split("://", 1)[1]
        if not rest or rest.startswith("/:memory:") or rest in ("/", ":memory:"):
            return TrackingStore(uri, origin, "memory", cwd=cwd)
        raw = (rest[1:] if rest.startswith("/") else rest).split("?", 1)[0]  # sqlite:///x.db -> x.db, ////x -> /x
        relative = not Path(raw).expanduser().is_absolute()
        return TrackingStore(uri, origin, "sqlite", str(Path(raw).expanduser().resolve()), relative, cwd)
    if uri.lower().startswith("file:"):
        raw = uri[len("file:"):]
        raw = raw[2:] if raw.startswith("//") else raw  # file:///abs -> /abs, file:rel -> rel
        raw = raw.split("?", 1)[0]
        relative = not Path(raw).expanduser().is_absolute()
        return TrackingStore(uri, origin, "files", str(Path(raw).expanduser().resolve()), relative, cwd)
    if not scheme and ":" not in uri.split("/", 1)[0]:  # a plain path: MLflow's file store
        relative = not Path(uri).expanduser().is_absolute()
        return TrackingStore(uri, origin, "files", str(Path(uri).expanduser().resolve()), relative, cwd)
    return TrackingStore(uri, origin, "remote", cwd=cwd)


def config_store(cfg) -> TrackingStore:
    """The tracking store of a loaded sweep file (``SweepConfig``)."""
    return tracking_store(cfg.tracking_uri)


def _hint(store: TrackingStore) -> str:
    if store.relative:
        return "run this from the folder the sweep ran in, or set an absolute tracking_uri"
    return "run the sweep first, or check tracking_uri / MLFLOW_TRACKING_URI"


def require_store(store: TrackingStore) -> None:
    """Raise UserError (one line, naming where it looked) unless ``store`` exists and can be read; nothing is
    created. A remote store is asked, with a short timeout, whether it answers."""
    if store.kind == "memory":
        raise UserError(f"{store.origin} {store.uri} is an in-memory store: it holds nothing after the sweep that "
                        "wrote it; set a tracking_uri that persists (e.g. sqlite:////abs/path/mlflow.db)")
    if store.kind == "remote":
        from orchestrator.preflight import check_tracking

        setting = {"MLFLOW_TRACKING_URI": "tracking_uri (from MLFLOW_TRACKING_URI)"}.get(store.origin, store.origin)
        check_tracking(store.uri, setting)  # a server that does not answer: seconds, not minutes of retries
        return
    path = Path(store.path)
    if store.kind == "sqlite":
        if not path.exists():
            raise UserError(f"no MLflow store at {path} ({store.setting}): {_hint(store)}")
        if path.is_dir():
            raise UserError(f"{path} ({store.setting}) is a folder, not an MLflow SQLite database")
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise UserError(f"cannot read the MLflow store {path} ({store.setting}): {exc.strerror or exc}") from None
        if head != _SQLITE_MAGIC:
            what = "is empty" if not head else "is not an SQLite database"
            raise UserError(f"{path} ({store.setting}) {what}, so it holds no MLflow runs")
        return
    if not path.is_dir():  # MLflow's file store: a folder
        found = "is a file, not a folder" if path.exists() else "does not exist"
        raise UserError(f"no MLflow store at {path} ({store.setting}): the folder {found}; {_hint(store)}")


def ui_command(config_path: str, cfg) -> str:
    """The command that opens this sweep's store from any folder: ``cd FOLDER && python -m orchestrator ui FILE``
    when the sweep file's path or its tracking store is relative (both taken against the folder the sweep runs
    in), else just the ``ui`` command."""
    cmd = f"python -m orchestrator ui {shlex.quote(config_path)}"
    store = config_store(cfg)
    if store.relative or not Path(config_path).is_absolute():
        return f"cd {shlex.quote(os.getcwd())} && {cmd}"
    return cmd


# --------------------------------------------------------------------------- the sweep's files

def sweep_files(cfg) -> Dict:
    """The checkpoints and feature files of a sweep (``SweepConfig``), from its plan, with what each file holds.

    Nothing is trained, extracted or started (no Ray): the plan names every file by its cache key, and each
    feature file that exists is described from its Parquet footer (:func:`ood_core.feature_store.
    describe_feature_file`). Returns ``{"sweep", "storage", "checkpoints": [...], "features": [...]}``; a
    feature entry has ``backbone``, ``dataset`` (the sweep's label for it), ``data_set`` (the registry name),
    ``split``, ``role``, ``path`` and ``status``: ``ok`` (with ``rows``, ``columns`` ``{name: width}`` and
    ``metadata``), ``missing`` (not extracted yet: the planned ``columns``), ``incomplete`` or ``unreadable``
    (with ``error``). Raises UserError, naming the absolute folder it looked in, when no file of the sweep
    exists there.
    """
    from ood_core import storage
    from ood_core.feature_store import describe_feature_file
    from orchestrator.plan import make_plan

    root = absolute_storage(cfg.storage)
    plan = make_plan(cfg.model_copy(update={"storage": root}))
    checkpoints: List[Dict] = []
    features: List[Dict] = []
    for bb in plan.backbones:
        entry = {"backbone": bb.label, "arch": bb.arch, "key": bb.key, "path": bb.checkpoint_uri,
                 "status": "ok" if storage.exists(bb.checkpoint_uri) else "missing"}
        if bb.checkpoint:
            entry["source"] = bb.checkpoint
        checkpoints.append(entry)
        for job in bb.features:
            ds = job.dataset
            row = {"backbone": bb.label, "dataset": ds.label, "data_set": ds.dataset, "split": ds.split,
                   "role": ds.role, "path": job.uri, "status": "ok"}
            try:
                info = describe_feature_file(job.uri)
            except FileNotFoundError:
                row.update(status="missing", columns={c: bb.widths.get(c, 1) for c in bb.columns})
            except ValueError as exc:
                row.update(status="unreadable", error=str(exc))
            else:
                row.update(rows=info.rows, columns={c: info.width(c) for c in info.columns},
                           metadata=info.metadata)
                if not info.complete:
                    row.update(status="incomplete", error="its row count differs from the one recorded when it "
                                                          "was written (a damaged footer)")
            features.append(row)
    if all(r["status"] == "missing" for r in features + checkpoints):
        where = f"storage {cfg.storage}" + (f", relative to the current folder {os.getcwd()}"
                                            if is_relative_storage(cfg.storage) else "")
        hint = ("run this from the folder the sweep ran in, or set an absolute storage"
                if is_relative_storage(cfg.storage) else "run the sweep first")
        raise UserError(f"no checkpoint or feature file of sweep {cfg.name!r} under {root} ({where}): {hint}")
    return {"sweep": cfg.name, "storage": root, "checkpoints": checkpoints, "features": features}


def _columns_text(columns: Dict[str, int]) -> str:
    return " ".join(f"{name}[{width}]" for name, width in columns.items())


def _table(headers: List[str], body: List[List[str]]) -> List[str]:
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [render(headers), "  ".join("-" * w for w in widths)] + [render(r) for r in body]


def format_files(listing: Dict) -> str:
    """The listing of :func:`sweep_files` as two plain-text tables (feature files, then checkpoints)."""
    body = []
    for r in listing["features"]:
        if r["status"] == "ok":
            rows, cols = str(r["rows"]), _columns_text(r["columns"])
        elif r["status"] == "missing":
            rows, cols = "-", f"not extracted yet ({_columns_text(r['columns'])})"
        else:
            rows, cols = str(r.get("rows", "-")), f"{r['status']}: {r['error']}"
        body.append([r["backbone"], r["dataset"], r["split"], r["role"], rows, cols, r["path"]])
    lines = [f"sweep {listing['sweep']}: feature files under {listing['storage']}", ""]
    lines += _table(["backbone", "data set", "split", "role", "rows", "columns", "path"], body)
    lines += ["", "checkpoints:"]
    lines += _table(["backbone", "arch", "status", "path"],
                    [[c["backbone"], c["arch"], "ok" if c["status"] == "ok" else "not trained yet", c["path"]]
                     for c in listing["checkpoints"]])
    return "\n".join(lines)
