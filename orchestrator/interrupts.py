"""Ctrl-C that is never lost.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be. When that is
inside a destructor, a weakref callback or a library's catch-all handler, the exception is swallowed
and the sweep would carry on as if nothing happened. :func:`latched_sigint` also records the signal, and
the sweep calls :func:`raise_if_interrupted` between stages and while waiting on Ray, so a Ctrl-C
always ends the sweep at the next boundary at the latest.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_received = threading.Event()


def _on_sigint(signum, frame) -> None:
    _received.set()
    raise KeyboardInterrupt


@contextmanager
def latched_sigint() -> Iterator[None]:
    """Within the block, SIGINT raises ``KeyboardInterrupt`` and is remembered (main thread only)."""
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


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived that was swallowed on its way."""
    if _received.is_set():
        raise KeyboardInterrupt
