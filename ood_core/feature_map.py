"""One copy of a feature file per machine, shared by every process on it: memory-mapped ``.npy`` columns.

Parquet is compressed and encoded, so every process that reads a feature file decodes its own copy into its own
memory: with two Tune trials at a time on a node, two copies of ImageNet's 1.28M x 2,048 training features.
:func:`map_features` instead decodes the file once per machine into a directory of uncompressed ``.npy`` files
(one per column, in the dtype the file stores: float16 stays float16) and maps them into each process that asks:
the pages live once in the operating system's page cache, shared by every process that maps them, and are read
from disk only when touched. The arrays are mapped copy-on-write (``mmap_mode="c"``): a process that writes to
one changes its own private copy of the pages it writes, never the shared file.

The copy is keyed by the source file's identity (its recorded content hash ``<uri>.sha256`` when there is one,
else its path, size and modification time), written under a lock (one process decodes, the others wait) into a
temporary directory renamed into place, and checked when a process maps it: each column's CRC-32, recorded when
written, is recomputed over the mapped bytes once per process (a damaged copy is deleted and decoded again, never
used). Copies not used for :data:`MAX_AGE_S` are removed when a new one is made.

Where: ``$OOD_SWEEP_FEATURE_CACHE`` or ``<tempdir>/ood-sweep-features-<uid>``: a node-local disk.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .feature_store import INDEX_COLUMN, LABEL_COLUMN, META_PREFIX, FeatureSet, _decode_meta, sample_shape
from .storage import PathLike, read_hash, resolve

__all__ = ["map_features", "shared_value", "cache_root", "MAX_AGE_S"]

#: copies unused for this long are removed when a new copy is made (seconds)
MAX_AGE_S = 7 * 24 * 3600
_MANIFEST = "manifest.json"
_CRC_BLOCK = 64 << 20
#: (copy directory, column) -> mapped array, checked once per process
_MAPPED: Dict[Tuple[str, str], np.ndarray] = {}
#: shared values this process has read or computed (shared_value), by file
_SHARED: Dict[str, Any] = {}


def cache_root() -> Path:
    """The machine's directory of decoded copies."""
    env = os.environ.get("OOD_SWEEP_FEATURE_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"ood-sweep-features-{os.getuid()}"


def _identity(uri: PathLike) -> str:
    digest = read_hash(uri)
    if digest:
        return "sha256:" + digest
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
    return f"file:{path}:{info.size}:{mtime}"


def _crc(a: np.ndarray) -> int:
    flat = a.reshape(-1).view(np.uint8)
    crc = 0
    for s in range(0, flat.shape[0], _CRC_BLOCK):
        crc = zlib.crc32(flat[s : s + _CRC_BLOCK], crc)
    return crc


def _decode(uri: PathLike, target: Path) -> None:
    """Write every column of ``uri`` as ``.npy`` files into ``target`` (new), one row group at a time."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        reader = pq.ParquetFile(f)
        schema = reader.schema_arrow
        n = reader.metadata.num_rows
        names = list(schema.names)
        layout, files = {}, {}
        for i, name in enumerate(names):
            t = schema.field(name).type
            meta = _decode_meta(schema.field(name).metadata)
            shape = sample_shape(schema.field(name))
            dtype = (t.value_type if pa.types.is_fixed_size_list(t) else t).to_pandas_dtype()
            layout[name] = {"file": f"c{i}.npy", "shape": list(shape), "dtype": np.dtype(dtype).str, "meta": meta}
            files[name] = np.lib.format.open_memmap(target / f"c{i}.npy", mode="w+", dtype=dtype, shape=(n, *shape))
        row = 0
        for g in range(reader.num_row_groups):
            table = reader.read_row_group(g)
            k = table.num_rows
            for name in names:
                chunks = [c.flatten() if pa.types.is_fixed_size_list(c.type) else c for c in table.column(name).chunks]
                values = np.concatenate([c.to_numpy(zero_copy_only=False) for c in chunks]) if chunks else []
                files[name][row : row + k] = np.asarray(values).reshape((k, *files[name].shape[1:]))
            row += k
        for name, a in files.items():
            a.flush()
            layout[name]["crc32"] = _crc(a)
        manifest = {"source": str(uri), "rows": n, "columns": layout,
                    "metadata": {k[len(META_PREFIX):]: v for k, v in _decode_meta(schema.metadata).items()
                                 if k.startswith(META_PREFIX)}}
        del files
    (target / _MANIFEST).write_text(json.dumps(manifest))


def _evict(root: Path, keep: Path) -> None:
    now = time.time()
    for d in root.iterdir():
        if d != keep and d.is_dir() and (d / _MANIFEST).exists() and now - (d / _MANIFEST).stat().st_mtime > MAX_AGE_S:
            shutil.rmtree(d, ignore_errors=True)


def _copy_dir(uri: PathLike) -> Path:
    """The decoded copy of ``uri`` on this machine, made if missing (under a lock)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(_identity(uri).encode()).hexdigest()[:24]
    target = root / key
    if (target / _MANIFEST).exists():
        return target
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _MANIFEST).exists():
            shutil.rmtree(target, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
            try:
                _decode(uri, tmp)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _evict(root, target)
    return target


def _map_column(directory: Path, manifest: Dict, name: str) -> np.ndarray:
    key = (str(directory), name)
    if key not in _MAPPED:
        entry = manifest["columns"][name]
        a = np.load(directory / entry["file"], mmap_mode="c")
        if a.shape != (manifest["rows"], *entry["shape"]) or a.dtype.str != entry["dtype"] or _crc(a) != entry["crc32"]:
            raise ValueError(f"damaged copy of column {name!r} in {directory}")
        _MAPPED[key] = a
    return _MAPPED[key]


def shared_value(uri: PathLike, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` for the feature file at ``uri``, computed once per machine and kept beside its decoded copy
    (``key`` names what it is, e.g. ``"penultimate/moments_about_mean"``): the first process that asks computes
    it under a lock, the others wait and read it. For statistics of a training set that several fits need
    (:func:`ood_core.streaming.shared`); ``compute`` must depend on the file's content alone. Stored with pickle,
    in this machine's own cache directory."""
    directory = _copy_dir(uri)
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = directory / "shared" / f"{name}.pkl"
    path.parent.mkdir(exist_ok=True)
    memo = _SHARED.get(str(path))
    if memo is not None:
        return memo
    with open(directory / "shared" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            with open(path, "rb") as f:
                value = pickle.load(f)
        else:
            value = compute()
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.rename(tmp, path)
    _SHARED[str(path)] = value
    return value


def map_features(uri: PathLike, columns: Optional[Sequence[str]] = None) -> FeatureSet:
    """The feature file at ``uri`` (path or URI) as a :class:`~ood_core.feature_store.FeatureSet` whose arrays map
    this machine's one decoded copy (made on first use; see the module doc). Columns keep their stored dtype
    (float16 or float32); the arrays are writable copy-on-write views. ``KeyError`` naming the available columns
    when one is missing."""
    for attempt in (0, 1):
        directory = _copy_dir(uri)
        manifest = json.loads((directory / _MANIFEST).read_text())
        available = [n for n in manifest["columns"] if n not in (INDEX_COLUMN, LABEL_COLUMN)]
        wanted = list(available if columns is None else columns)
        missing = [c for c in wanted if c not in available]
        if missing:
            raise KeyError(f"{uri}: no column(s) {missing}; available: {available}")
        try:
            arrays = {n: _map_column(directory, manifest, n) for n in (INDEX_COLUMN, LABEL_COLUMN, *wanted)}
        except ValueError:
            if attempt:
                raise
            for k in [k for k in _MAPPED if k[0] == str(directory)]:
                del _MAPPED[k]
            shutil.rmtree(directory, ignore_errors=True)  # damaged: decode it again
            continue
        os.utime(directory / _MANIFEST)  # in use: not evicted
        return FeatureSet(index=arrays[INDEX_COLUMN], labels=arrays[LABEL_COLUMN],
                          columns={n: arrays[n] for n in wanted}, metadata=dict(manifest["metadata"]),
                          column_meta={n: manifest["columns"][n]["meta"] for n in wanted})
    raise AssertionError("unreachable")
