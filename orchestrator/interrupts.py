"""Ctrl-C that stops a sweep cleanly and is never lost.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be. When that is
inside a destructor, an at-fork hook (logging's lock release when Ray starts a process) or a library's
catch-all handler, the exception is swallowed, a stray traceback is printed and the sweep would carry
on. Within :func:`latched_sigint` the first SIGINT is only recorded; the driver waits on Ray in short
polls and calls :func:`raise_if_interrupted` between them and between stages, so it stops within a
fraction of a second, in its own code. Inside :func:`interruptible` (code we cannot poll from, such as
Tune's event loop) and on a second Ctrl-C the signal raises at once.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

#: how often the driver looks for a recorded Ctrl-C while it waits on Ray (seconds)
POLL_S = 0.2

_received = threading.Event()
_raise_at_once = [False]


def _on_sigint(signum, frame) -> None:
    again = _received.is_set()
    _received.set()
    if again or _raise_at_once[0]:
        raise KeyboardInterrupt


@contextmanager
def latched_sigint() -> Iterator[None]:
    """Within the block, SIGINT is recorded for :func:`raise_if_interrupted` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _received.clear()


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGINT raises ``KeyboardInterrupt`` at once (for loops we cannot poll from)."""
    raise_if_interrupted()
    before = _raise_at_once[0]
    _raise_at_once[0] = True
    try:
        yield
    finally:
        _raise_at_once[0] = before
    raise_if_interrupted()  # swallowed inside the block: never take a stopped loop for a finished one


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT was recorded."""
    if _received.is_set():
        raise KeyboardInterrupt
