"""Checks of the environment a sweep writes to, before any work: its storage and its MLflow store.

A storage that is a file, lies under a file, under ``/proc`` or on a read-only file system, and a tracking
server that does not answer, used to surface after Ray had started and a backbone had trained, as a
traceback (or, for the server, as minutes of retries). :func:`check_environment` finds each in seconds and
raises :class:`~orchestrator.errors.UserError` with one line naming the setting:

* ``storage`` (a path or a ``pyarrow.fs`` URI such as ``s3://bucket/prefix``): created if missing and
  written by actually writing, reading back and deleting a small probe file (through
  :mod:`ood_core.storage`); folders the probe had to create are removed again, so ``validate`` leaves
  nothing behind.
* the tracking URI (``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``):
  ``http(s)://`` a short request to the server (``/health``) with a timeout; ``sqlite:///`` the
  database file's folder writable (probed the same way) and an existing file an SQLite database;
  ``file://`` or a plain path (MLflow's file store) a writable folder; ``postgresql://``, ``mysql://``...
  the database port accepts connections.

``python -m orchestrator validate`` and ``sweep`` run it (``orchestrator.cli``).
"""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlparse

from orchestrator.errors import UserError

#: seconds a tracking server or database has to answer
TIMEOUT_S = 5.0
_PROBE = b"ood-sweep write probe\n"
_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _reason(exc: BaseException) -> str:
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _absolute(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def _missing_local_dirs(path: str) -> List[str]:
    """The folders ``os.makedirs(path)`` would create, deepest first (stops at the first existing entry)."""
    out = []
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        out.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return out


def _probe_folder(setting: str, shown: str, fs, path: str, *, object_store: bool, local: bool) -> None:
    """Create ``path`` on ``fs`` if needed and write, read back and delete a probe file in it."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise UserError(f"{setting}: {shown} is a file, not a folder")
    created = _missing_local_dirs(path) if local else []
    try:
        if not object_store and info.type != pafs.FileType.Directory:
            try:
                fs.create_dir(path, recursive=True)
            except Exception as exc:
                raise UserError(f"{setting}: cannot create the folder {shown} ({_reason(exc)})") from None
        probe = f"{path.rstrip('/')}/.ood-sweep-probe-{uuid.uuid4().hex}"
        try:
            with fs.open_output_stream(probe) as out:
                out.write(_PROBE)
            with fs.open_input_stream(probe) as src:
                back = src.read()
            fs.delete_file(probe)
        except Exception as exc:
            raise UserError(f"{setting}: cannot write to {shown} ({_reason(exc)})") from None
        if back != _PROBE:
            raise UserError(f"{setting}: {shown} does not return what was written to it")
    finally:
        for folder in created:  # deepest first; only empty folders the probe created
            try:
                os.rmdir(folder)
            except OSError:
                break


def check_storage(uri: str, setting: str = "storage") -> None:
    """``uri`` (a path or a URI) can be created and written; raise UserError (``storage: ...``) otherwise."""
    from ood_core import storage

    uri = _absolute(uri)
    try:
        fs, path = storage.resolve(uri)
    except Exception as exc:  # pyarrow: ArrowInvalid for an unknown scheme or a malformed URI
        raise UserError(f"{setting}: {uri!r} is not a usable path or URI ({_reason(exc)})") from None
    object_store = fs.type_name in ("s3", "gcs", "abfs")
    if object_store and not path.strip("/"):
        raise UserError(f"{setting}: {uri!r} names no bucket")
    _probe_folder(setting, uri, fs, path, object_store=object_store, local=fs.type_name == "local")


def _check_local_folder(setting: str, folder: str) -> None:
    import pyarrow.fs as pafs

    _probe_folder(setting, folder, pafs.LocalFileSystem(), folder, object_store=False, local=True)


def _sqlite_path(uri: str) -> Optional[str]:
    """The database file of a ``sqlite://`` URI (``sqlite:///rel.db``, ``sqlite:////abs.db``), None in memory."""
    rest = uri[len("sqlite://"):]
    if not rest or rest in ("/", "/:memory:") or rest.startswith("/:memory:"):
        return None
    path = rest[1:] if rest.startswith("/") else rest  # sqlite:///x.db -> x.db (relative), ////x -> /x
    path = path.split("?", 1)[0]
    return str(Path(path).expanduser().resolve())


def _check_sqlite(setting: str, uri: str) -> None:
    path = _sqlite_path(uri)
    if path is None:
        return
    if os.path.isdir(path):
        raise UserError(f"{setting}: {path} (from {uri}) is a folder, not an SQLite database file")
    _check_local_folder(setting, os.path.dirname(path))
    if os.path.exists(path):
        try:
            with open(path, "r+b") as fh:  # opened for writing, nothing written
                head = fh.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise UserError(f"{setting}: cannot open {path} for writing ({_reason(exc)})") from None
        if head and head != _SQLITE_MAGIC:
            raise UserError(f"{setting}: {path} is not an SQLite database (damaged, or another file); move it "
                            "away or point the tracking URI elsewhere")


def _http_status(setting: str, uri: str, path: str, timeout: float) -> int:
    """HTTP status of ``GET uri/path``; UserError when nothing answers."""
    hint = "start the server (mlflow server --host 127.0.0.1 --port PORT) or fix the tracking URI"
    try:
        with urllib.request.urlopen(urllib.request.Request(uri.rstrip("/") + path, method="GET"),
                                    timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:  # an answer
        if exc.code in (502, 503, 504):  # from a proxy or load balancer that cannot reach the server
            raise UserError(f"{setting}: the MLflow tracking server at {uri} does not answer "
                            f"(HTTP {exc.code} {exc.reason}); {hint}") from None
        return exc.code
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = _reason(reason) if isinstance(reason, BaseException) else str(reason)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            text = f"no answer within {timeout:g} s"
        raise UserError(f"{setting}: cannot reach the MLflow tracking server at {uri} ({text}); {hint}") from None
    except (socket.timeout, TimeoutError):
        raise UserError(f"{setting}: the MLflow tracking server at {uri} sent no answer within {timeout:g} s; "
                        f"{hint}") from None
    except (OSError, ValueError) as exc:  # a malformed URL, a reset connection
        raise UserError(f"{setting}: cannot reach the MLflow tracking server at {uri} ({_reason(exc)}); "
                        f"{hint}") from None


def _check_http(setting: str, uri: str, timeout: float) -> None:
    """An MLflow server answers ``/health``; behind a proxy that hides it, its REST API. 401 / 403: there,
    with authentication (MLflow's client brings the credentials)."""
    ok = lambda code: 200 <= code < 300 or code in (401, 403)  # noqa: E731
    code = _http_status(setting, uri, "/health", timeout)
    if ok(code):
        return
    api = _http_status(setting, uri, "/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    if not ok(api):
        raise UserError(f"{setting}: {uri} answers, but not as an MLflow tracking server (HTTP {code} for /health, "
                        f"{api} for its REST API); check the host, port and path")


def _check_db_port(setting: str, uri: str, scheme: str, timeout: float) -> None:
    try:
        parsed = urlparse(uri)
        host, port = parsed.hostname, parsed.port or _DB_PORTS[scheme]
    except ValueError as exc:
        raise UserError(f"{setting}: {uri!r} is not a valid URI ({exc})") from None
    if not host:
        return  # a socket path or a driver-specific form: left to the driver
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        text = f"no answer within {timeout:g} s" if isinstance(exc, socket.timeout) else _reason(exc)
        raise UserError(f"{setting}: cannot reach the tracking database at {host}:{port} ({text})") from None


def tracking_setting(tracking_uri: Optional[str]) -> str:
    """How the tracking URI was given, for messages."""
    if tracking_uri:
        return "tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "tracking_uri (from MLFLOW_TRACKING_URI)"
    return "tracking_uri (default sqlite:///mlflow.db)"


def check_tracking(uri: str, setting: str = "tracking_uri", timeout: float = TIMEOUT_S) -> None:
    """The MLflow store at ``uri`` can be reached (a server) or written (a local store), in seconds."""
    if uri.split(":", 1)[0].lower() in ("databricks", "databricks-uc", "uc"):
        return  # MLflow's special stores: their own clients check them
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2
    if base in ("http", "https"):
        _check_http(setting, uri, timeout)
    elif base == "sqlite":
        _check_sqlite(setting, uri)
    elif base == "file":
        _check_local_folder(setting, uri[len("file://"):].split("?", 1)[0] or "/")
    elif not scheme:
        _check_local_folder(setting, str(Path(uri).expanduser().resolve()))
    elif base in _DB_PORTS:
        _check_db_port(setting, uri, base, timeout)
    # databricks, uc, other plugins: their own clients check them


def check_environment(cfg, timeout: float = TIMEOUT_S) -> None:
    """Storage writable and tracking store reachable for ``cfg`` (a SweepConfig); UserError otherwise.

    Takes seconds; creates nothing that stays (folders the storage probe needed are removed again)."""
    check_storage(cfg.storage)
    check_tracking(cfg.resolved_tracking_uri(), tracking_setting(cfg.tracking_uri), timeout)
