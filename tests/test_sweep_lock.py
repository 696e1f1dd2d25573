"""One invocation at a time per sweep run: a second invocation of a running sweep says so and exits."""
import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.errors import UserError
from orchestrator.lock import SweepLock
from sweep_runs import launch, sweep_env, write_config


def test_lock_is_exclusive_and_a_dead_holder_is_taken_over(tmp_path):
    path = tmp_path / "locks" / "sweep-k.lock"
    first = SweepLock(path, "demo")
    first.acquire()
    with pytest.raises(UserError, match=rf"sweep 'demo' is already running \(pid {os.getpid()} on "):
        SweepLock(path, "demo").acquire()
    first.release()
    assert not path.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import json
    import socket

    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": time.time()}))
    taker = SweepLock(path, "demo")
    taker.acquire()  # the holder's process is gone: taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    taker.release()


def test_a_second_invocation_of_a_running_sweep_exits(tmp_path, clean_sweep):
    cfg = write_config(tmp_path, name="twice", storage=str(clean_sweep["storage"]), detectors=[
        {"type": "ViM", "search": {"d": {"grid": [8, 16, 24, 32, 40, 48, 56, 64]}}}])
    first = launch(cfg, tmp_path / "first.log")
    try:
        deadline = time.time() + 240
        while "[sweep] twice:" not in (tmp_path / "first.log").read_text() and time.time() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(cfg)], cwd=tmp_path,
                                env=sweep_env(), capture_output=True, text=True, timeout=240)
        assert first.poll() is None, "the first sweep finished before the second one started: make it longer"
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert second.stderr.strip().startswith(f"error: sweep 'twice' is already running (pid {first.pid} on ")
        assert "--wait" in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
