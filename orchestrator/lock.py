"""One invocation at a time per sweep run.

Two invocations of the same sweep file (same content, so the same sweep key) would resume the same MLflow
run, do all the work twice and log every metric twice. The first takes an exclusive lock file named after
the sweep key; a second one says who holds it and exits, or waits for it with ``--wait``. A lock left by a
process that died (same machine, pid gone) is taken over.

The lock lives under the storage folder when that is a local path (a shared mount makes it cluster-wide),
else in ``~/.ood_sweep/locks`` (this machine only: object stores have no exclusive create).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from orchestrator.errors import UserError

POLL_S = 2.0


def lock_path(storage: str, sweep_key: str) -> Path:
    base = Path(storage) / "locks" if "://" not in storage else Path.home() / ".ood_sweep" / "locks"
    return base / f"sweep-{sweep_key}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SweepLock:
    """An exclusive lock file; :meth:`acquire` raises :class:`UserError` (or waits) when another live
    process holds it."""

    def __init__(self, path: Path, name: str):
        self.path, self.name, self.held = Path(path), name, False

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _try(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            stale = holder is None and time.time() - self._mtime() > 10  # an unreadable, old lock file
            stale |= bool(holder) and holder.get("host") == socket.gethostname() and not _alive(int(holder["pid"]))
            if stale:
                self.path.unlink(missing_ok=True)
                return self._try()
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        self.held = True
        return True

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return time.time()

    def acquire(self, wait: bool = False, say: Callable[[str], None] = print, timeout: Optional[float] = None) -> None:
        started = time.time()
        told = False
        while not self._try():
            holder = self._holder() or {}
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                   f"{time.strftime('%H:%M:%S', time.localtime(holder.get('since', time.time())))}")
            if not wait:
                raise UserError(f"sweep {self.name!r} is already running ({who}); wait for it to finish, or run "
                                f"the same command with --wait (lock: {self.path})")
            if not told:
                say(f"[sweep] {self.name}: another invocation is running ({who}); waiting for it to finish")
                told = True
            if timeout is not None and time.time() - started > timeout:
                raise UserError(f"sweep {self.name!r}: still running elsewhere after {timeout:.0f} s ({who})")
            time.sleep(POLL_S)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
