"""Storage helpers on top of :mod:`pyarrow.fs`: local paths and URIs (``s3://``, ``gs://``, ``file://``...).

Every place in ``ood-sweep`` that names storage accepts either a plain path (``~`` is expanded,
relative paths are made absolute) or a URI that :meth:`pyarrow.fs.FileSystem.from_uri` understands.

Writers use :func:`atomic_output`: the bytes go to ``<path>.tmp-<uuid>`` next to the target and are
moved into place only when the block finishes without an exception, so a reader never sees a partial
file. On local file systems the move is an atomic ``rename``; on object stores (S3, GCS) pyarrow's
``move`` is a copy + delete, which still never exposes a partial object under the final key (object
PUTs are all-or-nothing) but is not atomic with respect to the temp object's removal.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import IO, Iterator, Tuple, Union

import pyarrow.fs as pafs

_OBJECT_STORES = ("s3", "gcs", "abfs")  # no real directories; creating one might mean creating a bucket

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["resolve", "exists", "atomic_output", "AtomicOutput", "open_input", "read_bytes", "remove", "is_uri"]


def is_uri(uri: PathLike) -> bool:
    """True when ``uri`` has a scheme (``s3://bucket/key``, ``file:///tmp/x``)."""
    return "://" in os.fspath(uri)


def resolve(uri: PathLike, *, make_parents: bool = False) -> Tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or a URI.

    Plain paths use :class:`pyarrow.fs.LocalFileSystem` with ``~`` expanded and the path made
    absolute; URIs go through :meth:`pyarrow.fs.FileSystem.from_uri`. With ``make_parents`` the
    parent directory is created (skipped on object stores, which have no real directories).
    """
    s = os.fspath(uri)
    if not s:
        raise ValueError("empty storage path")
    if is_uri(s):
        fs, path = pafs.FileSystem.from_uri(s)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s))
    if make_parents and fs.type_name not in _OBJECT_STORES:
        parent = posixpath.dirname(path) if is_uri(s) else os.path.dirname(path)
        if parent and parent not in ("/", "."):
            fs.create_dir(parent, recursive=True)
    return fs, path


def exists(uri: PathLike) -> bool:
    """True when ``uri`` names an existing file (directories do not count)."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def remove(uri: PathLike, *, missing_ok: bool = True) -> None:
    """Delete the file at ``uri``."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        if missing_ok:
            return
        raise FileNotFoundError(os.fspath(uri))
    fs.delete_file(path)


def open_input(uri: PathLike) -> IO[bytes]:
    """Open ``uri`` for random-access binary reading (a :class:`pyarrow.NativeFile`)."""
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def read_bytes(uri: PathLike) -> bytes:
    """Return the whole content of ``uri``."""
    with open_input(uri) as f:
        return f.read()


class AtomicOutput:
    """A temp-then-move output stream; the explicit form of :func:`atomic_output`.

    ``open()`` creates ``<path>.tmp-<uuid>`` (parent directories included) and returns the stream;
    ``commit()`` closes it and moves it onto ``path``; ``abort()`` closes and deletes it. Both are
    idempotent, and ``abort()`` after ``commit()`` does nothing.
    """

    def __init__(self, uri: PathLike):
        self.uri = os.fspath(uri)
        self.fs, self.path = resolve(uri, make_parents=True)
        self.tmp_path = f"{self.path}.tmp-{uuid.uuid4().hex}"
        self.stream = None
        self._done = False

    def open(self):
        if self.stream is None:
            self.stream = self.fs.open_output_stream(self.tmp_path)
        return self.stream

    def _close_stream(self) -> None:
        if self.stream is not None and not self.stream.closed:
            self.stream.close()

    def commit(self) -> None:
        if self._done:
            return
        self.open()  # an empty file is still a file
        self._close_stream()
        self.fs.move(self.tmp_path, self.path)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._close_stream()
        finally:
            if self.fs.get_file_info(self.tmp_path).type != pafs.FileType.NotFound:
                self.fs.delete_file(self.tmp_path)


@contextlib.contextmanager
def atomic_output(uri: PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary output stream that replaces ``uri`` only if the block succeeds.

    >>> with atomic_output("/tmp/out.bin") as f:  # doctest: +SKIP
    ...     f.write(b"data")

    On an exception the temporary file is deleted and the exception propagates; an existing file at
    ``uri`` is left untouched.
    """
    out = AtomicOutput(uri)
    stream = out.open()
    try:
        yield stream
    except BaseException:
        out.abort()
        raise
    out.commit()
