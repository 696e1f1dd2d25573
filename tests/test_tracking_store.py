"""The MLflow store under contention: created by two sweeps at once, locked by another process, damaged."""
import multiprocessing as mp
import sqlite3
import threading
import time

import pytest

from orchestrator.errors import UserError
from orchestrator.tracking import Tracker, store_call


def _open_and_log(uri, name, queue):
    try:
        tracker = Tracker(uri, name)
        run = tracker.start_run("probe")
        tracker.log(run, metrics={"m": 1.0})
        tracker.end_run(run)
        queue.put("ok")
    except Exception as exc:  # noqa: BLE001
        queue.put(repr(exc))


def test_two_processes_create_the_store_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_and_log, args=(uri, "same", queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert sorted(queue.get(timeout=5) for _ in procs) == ["ok"] * 3


def test_a_locked_store_is_waited_for(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "locked")
    run = tracker.start_run("probe")
    holder = sqlite3.connect(tmp_path / "mlflow.db", timeout=0, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for 8 s
    threading.Timer(8.0, holder.rollback).start()
    started = time.monotonic()
    tracker.log(run, metrics={"m": 2.0})
    assert time.monotonic() - started >= 7.5
    assert tracker.client.get_run(run).data.metrics["m"] == 2.0


def test_a_store_locked_longer_than_sqlite_waits_is_retried_with_one_message(capsys):
    """Past sqlite's own busy timeout (MLflow sets 20 s) the call is retried, bounded, saying so once."""
    from sqlalchemy.exc import OperationalError

    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        return "done"

    assert store_call(locked_twice, "sqlite:///x.db") == "done" and len(calls) == 3
    out = capsys.readouterr().out
    assert out.count("the tracking store sqlite:///x.db is busy (another process is using it)") == 1
    with pytest.raises(OperationalError, match="no such column"):  # anything else is not waited for
        store_call(lambda: (_ for _ in ()).throw(OperationalError("SELECT", {}, Exception("no such column: x"))),
                   "sqlite:///x.db")


def test_a_damaged_store_is_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an sqlite file" * 200)
    with pytest.raises(UserError, match=r"tracking store sqlite:///.*mlflow.db cannot be used \(file is not a database\)"):
        Tracker(f"sqlite:///{db}", "damaged")


def test_figures_given_as_functions_are_rendered_on_one_thread_and_logged(tmp_path):
    from matplotlib.figure import Figure

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "figures")
    run = tracker.start_run("probe")
    threads = {}

    def build(title):
        threads[title] = threading.current_thread().name
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().set_title(title)
        return fig

    tracker.log_figure(run, lambda: build("a"), "a.png")
    tracker.log_figure(run, lambda: build("b"), "sub/b.png")
    tracker.log_figure(run, build("c"), "c.png")  # a Figure: rendered here and now
    tracker.wait_figures()
    assert threads["a"] == threads["b"] != threads["c"] == threading.current_thread().name
    assert threads["a"].startswith("figures")
    assert set(tracker.figures[run]) == {"a.png", "sub/b.png", "c.png"}
    assert all(png.startswith(b"\x89PNG") for png in tracker.figures[run].values())
    logged = {f.path for f in tracker.client._client.list_artifacts(run)} | \
        {f.path for f in tracker.client._client.list_artifacts(run, "sub")}
    assert {"a.png", "c.png", "sub/b.png"} <= logged

    def broken():
        raise RuntimeError("no figure")

    tracker.log_figure(run, broken, "x.png")
    with pytest.raises(RuntimeError, match="no figure"):
        tracker.wait_figures()
    tracker.wait_figures()  # reported once
