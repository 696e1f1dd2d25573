"""Storage helpers on top of :mod:`pyarrow.fs`: local paths and URIs (``s3://``, ``gs://``, ``file://``...).

Every place in ``ood-sweep`` that names storage accepts either a plain path (``~`` is expanded,
relative paths are made absolute) or a URI that :meth:`pyarrow.fs.FileSystem.from_uri` understands.

Writers use :func:`atomic_output`: the bytes go to ``<path>.tmp-<pid>@<host>-<uuid>`` next to the target and are
moved into place only when the block finishes without an exception, so a reader never sees a partial
file. On local file systems the move is an atomic ``rename``; on object stores (S3, GCS) pyarrow's
``move`` is a copy + delete, which still never exposes a partial object under the final key (object
PUTs are all-or-nothing) but is not atomic with respect to the temp object's removal.

Cached files carry a content hash (see "Content hashes" below): a writer that passes
``record_hash=True`` hashes the bytes as it writes them and, once the file is in place, records the
sha256 in a sidecar ``<path>.sha256`` (``sha256sum`` format, written atomically *after* the file).
:func:`verify` compares a file with its record; :func:`verify_cached` is the one reuse check every
cache of ``ood-sweep`` (checkpoints, feature files, search records and scores) goes through: a file
whose bytes do not match is renamed to ``<path>.damaged-<UTC time>`` and reported in one line, so that
it is recomputed and can never block a rerun or change a number silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass
from typing import IO, Iterator, Optional, Tuple, Union

import pyarrow.fs as pafs

_OBJECT_STORES = ("s3", "gcs", "abfs")  # no real directories; creating one might mean creating a bucket

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["resolve", "exists", "atomic_output", "AtomicOutput", "open_input", "read_bytes", "remove", "is_uri",
           "HASH_SUFFIX", "hash_uri", "file_sha256", "write_hash", "read_hash", "verify", "Verdict", "set_aside",
           "verify_cached", "Cached", "discard_cached"]


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
    """Delete the file at ``uri`` (and its content-hash record ``<uri>.sha256``, if any)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        if missing_ok:
            return
        raise FileNotFoundError(os.fspath(uri))
    fs.delete_file(path)
    if fs.get_file_info(path + HASH_SUFFIX).type == pafs.FileType.File:
        fs.delete_file(path + HASH_SUFFIX)


def remove_abandoned_outputs(uri: PathLike, dead_writers_only: bool = False) -> int:
    """Delete ``<uri>.tmp-*``: the temporary outputs of :class:`AtomicOutput` writers to ``uri`` that died before
    committing or aborting (a worker killed with its node leaves its partial file behind). Without
    ``dead_writers_only``, only for a ``uri`` no live writer is writing to; with it, only the outputs of writers
    known to be dead: a process of this machine that no longer runs (the temporary name records the writer's
    host and pid), so that a concurrent writer of the same key (another sweep) is never disturbed. Returns how
    many were deleted."""
    fs, path = resolve(uri)
    prefix = posixpath.basename(path) + ".tmp-"
    try:
        infos = fs.get_file_info(pafs.FileSelector(posixpath.dirname(path)))
    except FileNotFoundError:
        return 0
    dead = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(prefix)
            and (not dead_writers_only or _writer_is_dead(i.base_name[len(prefix):]))]
    for p in dead:
        try:
            fs.delete_file(p)
        except FileNotFoundError:  # removed by another cleaner meanwhile
            pass
    return len(dead)


def _writer_tag() -> str:
    """``<pid>@<host>``: who writes a temporary output (see :func:`remove_abandoned_outputs`)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _writer_is_dead(suffix: str) -> bool:
    """Whether the writer named in a temporary output's suffix ``<pid>@<host>-<uuid>`` is a process of this
    machine that no longer runs (unknown writers, other machines: not known to be dead)."""
    tag = suffix.rsplit("-", 1)[0]
    pid, _, host = tag.partition("@")
    if not pid.isdigit() or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def open_input(uri: PathLike) -> IO[bytes]:
    """Open ``uri`` for random-access binary reading (a :class:`pyarrow.NativeFile`)."""
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def read_bytes(uri: PathLike) -> bytes:
    """Return the whole content of ``uri``."""
    with open_input(uri) as f:
        return f.read()


class _HashingStream:
    """A binary output stream that forwards to a pyarrow stream and hashes every byte written.

    Writers of cached files only append (Parquet, ``torch.save`` bytes, JSON), so the running sha256
    is the hash of the file. pyarrow writers (``pq.ParquetWriter``, ``pq.write_table``) accept it as a
    Python file object.
    """

    def __init__(self, stream):
        self._stream = stream
        self._sha = hashlib.sha256()
        self._pos = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self._stream.write(view)
        self._pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class AtomicOutput:
    """A temp-then-move output stream; the explicit form of :func:`atomic_output`.

    ``open()`` creates ``<path>.tmp-<pid>@<host>-<uuid>`` (parent directories included) and returns the stream;
    ``commit()`` closes it and moves it onto ``path``; ``abort()`` closes and deletes it. Both are
    idempotent, and ``abort()`` after ``commit()`` does nothing.

    With ``record_hash`` the stream hashes what is written and ``commit()``, after the move, records
    the sha256 in ``<path>.sha256`` (:func:`write_hash`); ``sha256`` then holds the digest.
    """

    def __init__(self, uri: PathLike, *, record_hash: bool = False):
        self.uri = os.fspath(uri)
        self.fs, self.path = resolve(uri, make_parents=True)
        self.tmp_path = f"{self.path}.tmp-{_writer_tag()}-{uuid.uuid4().hex}"
        self.stream = None
        self.record_hash = record_hash
        self.sha256: Optional[str] = None
        self._done = False

    def open(self):
        if self.stream is None:
            self.stream = self.fs.open_output_stream(self.tmp_path)
            if self.record_hash:
                self.stream = _HashingStream(self.stream)
        return self.stream

    def _close_stream(self) -> None:
        if self.stream is not None and not self.stream.closed:
            self.stream.close()

    def commit(self) -> None:
        if self._done:
            return
        self.open()  # an empty file is still a file
        self._close_stream()
        ours = self._identity(self.tmp_path) if self.record_hash else None
        self.fs.move(self.tmp_path, self.path)
        self._done = True
        if self.record_hash:  # after the file: a record never describes bytes that are not there yet
            self.sha256 = self.stream.hexdigest()
            write_hash(self.uri, self.sha256)
            self._settle_record(ours)

    def _identity(self, path: str):
        """(inode, mtime, size) of a local file: a rename keeps them, so they tell our file from another's."""
        if self.fs.type_name != "local":
            return None
        st = os.stat(path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _settle_record(self, ours) -> None:
        """Two writers of one key (two sweeps sharing a store) may interleave: A moves its file, B moves its
        file and records it, then A records *its* hash. Every writer therefore looks again after recording:
        when the file in place is no longer the one it moved (local file systems: another inode), it
        records the hash of the file that is there, so the last record written describes the file in place.
        Object stores have no cheap identity for this (a move is a copy); there a lost race is seen by
        :func:`verify` as a mismatch on the next reuse and recomputed, never reused wrongly."""
        if ours is None:
            return
        for _ in range(3):
            try:
                now = self._identity(self.path)
                if now == ours:
                    return
                ours = now
                write_hash(self.uri)  # hashes the file that is there now
            except OSError:
                return

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
def atomic_output(uri: PathLike, *, record_hash: bool = False) -> Iterator[IO[bytes]]:
    """Yield a binary output stream that replaces ``uri`` only if the block succeeds.

    >>> with atomic_output("/tmp/out.bin") as f:  # doctest: +SKIP
    ...     f.write(b"data")

    On an exception the temporary file is deleted and the exception propagates; an existing file at
    ``uri`` is left untouched. With ``record_hash`` the content's sha256 is recorded next to the file
    (``<uri>.sha256``) once it is in place, for :func:`verify_cached`.
    """
    out = AtomicOutput(uri, record_hash=record_hash)
    stream = out.open()
    try:
        yield stream
    except BaseException:
        out.abort()
        raise
    out.commit()


# ---------------------------------------------------------------------------------------
# Content hashes of cached files

HASH_SUFFIX = ".sha256"
_CHUNK = 8 << 20


def hash_uri(uri: PathLike) -> str:
    """Where the content hash of ``uri`` is recorded: ``<uri>.sha256``."""
    return os.fspath(uri) + HASH_SUFFIX


def file_sha256(uri: PathLike) -> str:
    """The sha256 hex digest of the file at ``uri``, read in 8 MiB chunks."""
    fs, path = resolve(uri)
    sha = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            sha.update(chunk)
    return sha.hexdigest()


def write_hash(uri: PathLike, digest: Optional[str] = None) -> str:
    """Record the sha256 of the file at ``uri`` in ``<uri>.sha256`` (atomically); return it.

    ``digest``: the hash of the bytes the caller just wrote (else the file is read and hashed). Call it
    only after the file is complete and in place. The record is one ``sha256sum`` line
    (``<hex>  <file name>``), so ``sha256sum -c <file>.sha256`` checks it too.
    """
    digest = (digest or file_sha256(uri)).lower()
    name = posixpath.basename(os.fspath(uri).rstrip("/")) if is_uri(uri) else os.path.basename(os.fspath(uri))
    with atomic_output(hash_uri(uri)) as f:
        f.write(f"{digest}  {name}\n".encode())
    return digest


def read_hash(uri: PathLike) -> Optional[str]:
    """The sha256 recorded for ``uri``; None when there is no record. Raises ValueError for a record
    that is not a sha256 line (a damaged record)."""
    record = hash_uri(uri)
    try:
        text = read_bytes(record).decode("ascii")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ValueError(f"{record} is not a sha256 record") from None
    except OSError:
        if not exists(record):
            return None
        raise
    digest = text.split(maxsplit=1)[0].lower() if text.strip() else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{record} is not a sha256 record")
    return digest


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found: ``status`` is ``ok``, ``missing``, ``unhashed`` (no record: written by an
    older version, or its writer has not recorded it yet), ``mismatch`` or ``unreadable``; ``sha256`` is the
    file's hash when it is ``ok``; ``detail`` says what did not match."""

    status: str
    sha256: Optional[str] = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def verify(uri: PathLike) -> Verdict:
    """Compare the file at ``uri`` with its recorded sha256 (reads the whole file).

    A writer replaces the file first and its record second; a mismatch whose record changed while the
    file was hashed is therefore looked at once more before it counts.
    """
    if not exists(uri):
        return Verdict("missing")
    for _attempt in range(2):
        try:
            recorded = read_hash(uri)
        except ValueError:
            return Verdict("mismatch", detail="hash record damaged")
        except OSError as exc:
            return Verdict("unreadable", detail=f"hash record unreadable: {_one_line(exc)}")
        if recorded is None:
            return Verdict("unhashed")
        try:
            actual = file_sha256(uri)
        except FileNotFoundError:
            return Verdict("missing")
        except OSError as exc:
            if not exists(uri):
                return Verdict("missing")
            return Verdict("unreadable", detail=f"unreadable: {_one_line(exc)}")
        if actual == recorded:
            return Verdict("ok", sha256=actual)
        try:
            if read_hash(uri) == recorded:
                break  # a stable record that does not describe the file: damage
        except (ValueError, OSError):
            break
    return Verdict("mismatch", detail="sha256 mismatch")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def set_aside(uri: PathLike) -> Optional[str]:
    """Rename the file at ``uri`` (and its hash record) to ``<uri>.damaged-<UTC time>``; return the new name,
    or None when the file is gone already (another process set it aside) or cannot be moved."""
    s = os.fspath(uri)
    fs, path = resolve(s)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = f".damaged-{stamp}"
    n = 1
    while fs.get_file_info(path + suffix).type != pafs.FileType.NotFound:
        n += 1
        suffix = f".damaged-{stamp}-{n}"
    try:
        fs.move(path, path + suffix)
    except OSError:
        return None
    try:
        if fs.get_file_info(path + HASH_SUFFIX).type == pafs.FileType.File:
            fs.move(path + HASH_SUFFIX, path + suffix + HASH_SUFFIX)
    except OSError:
        pass  # a record without its file is never used: exists() looks at the file
    return s + suffix


@dataclass(frozen=True)
class Cached:
    """The answer of :func:`verify_cached`: ``ok`` (reuse the file; ``sha256`` is its hash), and ``note``, the one
    line to show the user when there is something to say (a damaged file set aside, a file without a hash);
    ``status``: ``ok``, ``missing``, ``unhashed`` or ``damaged``."""

    ok: bool
    note: Optional[str] = None
    sha256: Optional[str] = None
    status: str = ""


def discard_cached(uri: PathLike, what: str, reason: str, redo: str = "recomputing") -> str:
    """Set aside a cached file that cannot be used; return the line that says so."""
    aside = set_aside(uri)
    where = f"set aside as {aside}" if aside else "already moved away or not movable (it will be overwritten)"
    return f"cached {what} damaged ({reason}); {where}, {redo}"


def verify_cached(uri: PathLike, what: str, *, redo: str = "recomputing") -> Cached:
    """The reuse check of every cached file: may the file at ``uri`` be reused?

    * intact (its bytes hash to the recorded sha256): ``Cached(True, sha256=...)``;
    * missing: ``Cached(False)``, nothing to say;
    * no hash record (written by an older ood-sweep): not reused, so recomputed and then hashed; one line;
    * damaged (mismatch, damaged record) or unreadable: renamed to ``<uri>.damaged-<time>`` (:func:`set_aside`)
      and not reused; one line naming where it went (``what`` names the file, ``redo`` what happens next).
    """
    v = verify(uri)
    if v.ok:
        return Cached(True, sha256=v.sha256, status="ok")
    if v.status == "missing":
        return Cached(False, status="missing")
    if v.status == "unhashed":
        return Cached(False, note=f"cached {what} has no content hash (written by an older ood-sweep); {redo}",
                      status="unhashed")
    return Cached(False, note=discard_cached(uri, what, v.detail, redo), status="damaged")
