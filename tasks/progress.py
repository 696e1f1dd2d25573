"""Progress that reads well in a terminal and in a log file.

In a terminal: tqdm bars (in Ray workers, Ray's ``tqdm_ray``, drawn by the driver). Under a pipe or in a log
file, where a bar turns into hundreds of lines: one line per quarter of the work, ``extract cnn-s0/id-train:
2048/8192 images (25%)``. The driver decides (is its standard output a terminal?) and tells its workers
through the ``OOD_SWEEP_PROGRESS`` environment variable (``bars`` or ``lines``) before Ray starts.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "OOD_SWEEP_PROGRESS"


class LineProgress:
    """A tqdm-like counter that prints one line at each quarter of ``total`` (and where it stopped); with
    ``quiet_s``, nothing for work that finishes within that many seconds (a worker's short jobs stay silent:
    the driver counts them)."""

    def __init__(self, total: int, desc: str, unit: str, steps: int = 4, file=None, quiet_s: float = 0.0):
        self.total, self.desc, self.unit, self.steps = max(int(total), 0), desc, unit, steps
        self.n, self._said, self._printed = 0, 0, 0
        self.file, self.quiet_s, self._start = file, quiet_s, time.monotonic()

    def _say(self) -> None:
        if time.monotonic() - self._start < self.quiet_s:
            return
        pct = 100 * self.n // self.total if self.total else 100
        self._printed = self.n
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct}%)", file=self.file or sys.stdout, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        reached = self.steps if not self.total else min(self.steps, self.steps * self.n // self.total)
        if reached > self._said:
            self._said = reached
            self._say()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.n != self._printed:  # where it stopped, unless just said
            self._said = self.steps
            self._say()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def in_terminal() -> bool:
    return sys.stdout.isatty()


def tell_workers() -> None:
    """Record, for the Ray workers this driver starts, whether progress is drawn as bars or as lines."""
    os.environ.setdefault(ENV, "bars" if in_terminal() else "lines")


def driver_progress(total: int, desc: str, unit: str):
    """A progress counter in the driver: a tqdm bar in a terminal, :class:`LineProgress` otherwise."""
    if in_terminal() and total:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stdout)
    return LineProgress(total, f"[{desc}]", unit)


def worker_progress(total: int, desc: str, unit: str):
    """A progress counter in a Ray worker: Ray's tqdm (drawn by the driver) when the driver is in a terminal,
    :class:`LineProgress` otherwise."""
    if os.environ.get(ENV) == "lines":
        return LineProgress(total, desc, unit, quiet_s=10.0)
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=total, desc=desc, unit=unit)
