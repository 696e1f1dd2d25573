"""The feature store: one Parquet file per (backbone, dataset, split), written with pyarrow.

Layout (readable with pandas, polars, duckdb):

* one row per sample, in the order the samples were written;
* ``index`` (int64, the sample's position in its data set) and ``label`` (int64, ``-1`` if unlabelled);
* one column per representation: ``fixed_size_list<float32>[D]`` for vectors, ``float32`` for per-sample
  scalars (vectors in ``float16`` for a file written with ``dtype="float16"``: half the bytes, values rounded to
  11 significant bits; scalars stay float32; :func:`read_features` returns float32 either way) (e.g. the LIR per-layer energy). Arrays with more than two dimensions (feature maps, reduction
  ``"none"``) are stored flattened and their per-sample shape is kept in the field metadata key ``shape``
  (JSON); :func:`read_features` restores it;
* schema metadata: every key is prefixed ``ood_sweep.`` (``backbone_key``, ``dataset``, ``split``,
  ``layers`` as JSON, plus whatever the caller passes); field metadata per column (``layer``,
  ``reduction``...); the file footer also records ``ood_sweep.num_rows``, which
  :func:`validate_feature_file` checks.

Writing is atomic (:class:`ood_core.storage.AtomicOutput`): the file appears under its final name only when
:meth:`FeatureWriter.close` succeeds; after an exception inside the ``with`` block nothing is left behind.
With ``record_hash=True`` (the sweep's feature cache) the bytes are hashed as they are written and the sha256
is recorded in ``<file>.sha256``; :func:`check_feature_file` verifies it (and the structure) before reuse.
The Arrow conversion and Parquet encoding run in a background thread fed through a bounded queue, so they
overlap with the next forward pass during extraction (see ``benchmarks/extraction.py``).
"""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import AtomicOutput, Cached, PathLike, atomic_output, resolve, verify_cached

__all__ = ["FeatureSet", "FeatureWriter", "read_features", "merge_feature_files", "describe_feature_file",
           "FeatureFileInfo", "validate_feature_file", "check_feature_file", "META_PREFIX",
           "INDEX_COLUMN", "LABEL_COLUMN", "FORMAT_VERSION"]

META_PREFIX = "ood_sweep."
INDEX_COLUMN = "index"
LABEL_COLUMN = "label"
FORMAT_VERSION = "1"
_NUM_ROWS_KEY = META_PREFIX + "num_rows"
_STOP = object()
#: the types representation columns may be stored in
STORAGE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def _to_float16(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` rounded to float16; ``ValueError`` naming the column when a finite value is beyond its range
    (65504), which would otherwise be stored as inf."""
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    if not np.isfinite(h).all() and np.isfinite(a[~np.isfinite(h)]).any():
        raise ValueError(f"column {name!r}: values beyond float16's range (|x| > 65504); store it as float32")
    return h


@dataclass
class FeatureSet:
    """The content of a feature file as numpy arrays.

    ``columns`` maps a column name to a float32 array of shape ``(N,)``, ``(N, D)`` or ``(N, *shape)``;
    ``metadata`` holds the schema metadata with the ``ood_sweep.`` prefix removed; ``column_meta`` the
    field metadata of each returned column.
    """

    index: np.ndarray
    labels: np.ndarray
    columns: Dict[str, np.ndarray]
    metadata: Dict[str, str]
    column_meta: Dict[str, Dict[str, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _meta_str(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _prefixed(metadata: Optional[Mapping[str, object]]) -> Dict[str, str]:
    out = {META_PREFIX + "format_version": FORMAT_VERSION}
    for k, v in (metadata or {}).items():
        key = k if k.startswith(META_PREFIX) else META_PREFIX + k
        out[key] = _meta_str(v)
    return out


class FeatureWriter:
    """Stream batches of features into a Parquet file, atomically.

    >>> with FeatureWriter(uri, {"dataset": "digits", "split": "test"},
    ...                    {"penultimate": {"layer": "penultimate", "reduction": "avgpool"}}) as w:  # doctest: +SKIP
    ...     w.write(index, labels, {"penultimate": feats, "logits": logits})

    ``write`` validates shapes in the caller's thread and hands the arrays to a writer thread
    (queue of ``max_pending`` batches); the arrays are **not copied**, so the caller must not modify
    them afterwards. Rows are buffered into row groups of about ``row_group_rows`` rows or
    ``row_group_bytes`` bytes. Errors of the writer thread are raised by the next ``write`` or by
    ``close``. The first ``write`` fixes the set of columns and their shapes. ``record_hash``: record the
    file's sha256 in ``<uri>.sha256`` once it is in place (see :func:`check_feature_file`). ``dtype``:
    ``"float32"`` (default) or ``"float16"``, the type the vector columns are stored in (the arrays are given in
    float32 and rounded to nearest by the writer thread; values beyond float16's range refused); per-sample
    scalars stay float32 (they cost 4 bytes a row, and a one-dimensional detector on a layer's energy moved by
    up to 4.6 AUROC points when they were rounded: ``benchmarks/float16_effect.py``).
    """

    def __init__(self, uri: PathLike, metadata: Optional[Mapping[str, str]] = None,
                 column_meta: Optional[Mapping[str, Mapping[str, str]]] = None, *,
                 compression: Optional[str] = "snappy", row_group_rows: int = 65536,
                 row_group_bytes: int = 64 << 20, max_pending: int = 4, record_hash: bool = False,
                 dtype: str = "float32"):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        self.uri = uri
        self.dtype = dtype
        self.record_hash = bool(record_hash)
        self.metadata = _prefixed(metadata)
        self.column_meta = {k: {mk: _meta_str(mv) for mk, mv in v.items()} for k, v in (column_meta or {}).items()}
        self.compression = compression
        self.row_group_rows = int(row_group_rows)
        self.row_group_bytes = int(row_group_bytes)
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, int(max_pending)))
        self._thread: Optional[threading.Thread] = None
        self._out: Optional[AtomicOutput] = None
        self._layout: Optional[Dict[str, tuple]] = None  # column -> per-sample shape (() for scalars)
        self._schema: Optional[pa.Schema] = None
        self._error: Optional[BaseException] = None
        self._closed = False
        self._aborting = False
        self.num_rows = 0

    # ------------------------------------------------------------------ public API
    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def write(self, index, labels, columns: Mapping[str, np.ndarray], *,
              ready: Optional[Callable[[], None]] = None) -> None:
        """Append ``N`` rows: ``index`` int64 (N,), ``labels`` int64 (N,), ``columns`` float32 arrays.

        ``ready``, if given, is called in the writer thread before the column arrays are read (used by
        :func:`ood_core.hooks.extract_features` to wait for asynchronous device-to-host copies); the
        arrays must then already be C-contiguous float32.
        """
        if self._closed:
            raise ValueError("FeatureWriter is closed")
        self._raise_pending()
        index = np.ascontiguousarray(index, dtype=np.int64).reshape(-1)
        labels = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)
        n = index.shape[0]
        if labels.shape[0] != n:
            raise ValueError(f"labels has {labels.shape[0]} rows, index has {n}")
        if not columns:
            raise ValueError("write() needs at least one feature column")
        cols: Dict[str, np.ndarray] = {}
        for name, arr in columns.items():
            if name in (INDEX_COLUMN, LABEL_COLUMN):
                raise ValueError(f"column name {name!r} is reserved")
            a = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
            if a.dtype != np.float32 or not a.flags.c_contiguous:
                if ready is not None:
                    raise ValueError(f"column {name!r}: with ready=, arrays must be C-contiguous float32")
                a = np.ascontiguousarray(a, dtype=np.float32)
            if a.ndim == 0 or a.shape[0] != n:
                raise ValueError(f"column {name!r} has shape {a.shape}, expected {n} rows")
            cols[name] = a
        if self._layout is None:
            self._start({k: v.shape[1:] for k, v in cols.items()})
        else:
            if set(cols) != set(self._layout):
                raise ValueError(f"columns {sorted(cols)} differ from the first batch's {sorted(self._layout)}")
            for k, v in cols.items():
                if v.shape[1:] != self._layout[k]:
                    raise ValueError(f"column {k!r}: per-sample shape {v.shape[1:]} != {self._layout[k]}")
        if n == 0:
            return
        self._put((index, labels, cols, ready))
        self.num_rows += n

    def close(self) -> None:
        """Flush, finalise the Parquet footer and move the file into place."""
        if self._closed:
            return
        self._closed = True
        self._stop()
        if self._error is not None:
            self._discard()
            raise self._error
        if self.num_rows == 0:
            self._discard()
            raise ValueError(f"no rows were written to {self.uri}; refusing to create an empty feature file")
        self._out.commit()

    def abort(self) -> None:
        """Stop writing and delete the temporary file; the target is left untouched."""
        if self._closed and self._out is None:
            return
        self._closed = True
        self._aborting = True
        self._stop()
        self._discard()

    # ------------------------------------------------------------------ internals
    def _start(self, layout: Dict[str, tuple]) -> None:
        fields = [pa.field(INDEX_COLUMN, pa.int64(), nullable=False),
                  pa.field(LABEL_COLUMN, pa.int64(), nullable=False)]
        for name, shape in layout.items():
            meta = dict(self.column_meta.get(name, {}))
            value_type = STORAGE_DTYPES[self.dtype]
            if len(shape) == 0:  # per-sample scalars (a layer's energy) stay float32: 4 bytes a row
                typ = pa.float32()
            else:
                typ = pa.list_(value_type, int(np.prod(shape)))
                if len(shape) > 1:
                    meta["shape"] = json.dumps([int(s) for s in shape])
            fields.append(pa.field(name, typ, nullable=False, metadata=meta or None))
        self._schema = pa.schema(fields, metadata=self.metadata)
        self._feature_fields = fields[2:]
        self._layout = dict(layout)
        self._out = AtomicOutput(self.uri, record_hash=self.record_hash)
        stream = self._out.open()
        self._thread = threading.Thread(target=self._run, args=(stream,), name="FeatureWriter", daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():  # pragma: no cover - defensive
                    self._raise_pending()
                    raise RuntimeError("FeatureWriter thread stopped unexpectedly")

    def _raise_pending(self) -> None:
        if self._error is not None:
            err = self._error
            self.abort()
            raise err

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def _discard(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            out.abort()

    def _to_batch(self, index, labels, cols) -> pa.RecordBatch:
        arrays: List[pa.Array] = [pa.array(index, type=pa.int64()), pa.array(labels, type=pa.int64())]
        for f in self._feature_fields:
            a = cols[f.name]
            if pa.types.is_fixed_size_list(f.type):
                if f.type.value_type == pa.float16():
                    a = _to_float16(a, f.name)
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=f.type.value_type),
                                                                type=f.type))
            else:
                arrays.append(pa.array(a, type=pa.float32()))
        return pa.RecordBatch.from_arrays(arrays, schema=self._schema)

    def _run(self, stream) -> None:
        writer = None
        pending: List[pa.RecordBatch] = []
        rows = nbytes = 0

        def flush():
            nonlocal writer, pending, rows, nbytes
            if not pending:
                return
            if writer is None:
                writer = pq.ParquetWriter(stream, self._schema, compression=self.compression,
                                          use_dictionary=[LABEL_COLUMN],
                                          write_statistics=[INDEX_COLUMN, LABEL_COLUMN])
            table = pa.Table.from_batches(pending, schema=self._schema)
            writer.write_table(table, row_group_size=max(1, table.num_rows))
            pending, rows, nbytes = [], 0, 0

        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if self._error is not None or self._aborting:
                continue  # keep draining so the producer never blocks
            try:
                index, labels, cols, ready = item
                if ready is not None:
                    ready()
                batch = self._to_batch(index, labels, cols)
                pending.append(batch)
                rows += batch.num_rows
                nbytes += batch.nbytes
                if rows >= self.row_group_rows or nbytes >= self.row_group_bytes:
                    flush()
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self._error = exc
        try:
            if self._error is None and not self._aborting:
                flush()
                if writer is not None:
                    writer.add_key_value_metadata({_NUM_ROWS_KEY: str(self.num_rows)})
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
        finally:
            if writer is not None:
                try:
                    writer.close()
                except BaseException as exc:  # noqa: BLE001
                    if self._error is None:
                        self._error = exc


def merge_feature_files(parts: Sequence[PathLike], uri: PathLike, *, record_hash: bool = False,
                        compression: Optional[str] = "snappy") -> int:
    """Concatenate feature files written for consecutive row ranges of one data set (extraction shards) into
    the single file ``uri``, atomically; returns its row count.

    The parts must share one schema (columns, their metadata and the file's metadata) and their ``index``
    columns must continue each other (part ``k + 1`` starts where part ``k`` ends, the first at 0), so the
    result is the file one extraction over the whole set writes, row for row and value for value (its row
    groups may be cut elsewhere). Streamed one row group at a time: memory stays one row group, not the set.
    ``ValueError`` naming the part when a schema or the row order does not fit."""
    if not parts:
        raise ValueError("merge_feature_files: no parts")
    schema, expected = None, 0
    for part in parts:
        fs, path = resolve(part)
        part_schema = pq.read_schema(path, filesystem=fs)
        if schema is None:
            schema = part_schema
        elif not part_schema.equals(schema, check_metadata=True):
            raise ValueError(f"merge_feature_files: {part} has another schema than {parts[0]}")
    with atomic_output(uri, record_hash=record_hash) as sink:
        with pq.ParquetWriter(sink, schema, compression=compression) as writer:
            for part in parts:
                fs, path = resolve(part)
                reader = pq.ParquetFile(fs.open_input_file(path))
                for g in range(reader.num_row_groups):
                    table = reader.read_row_group(g)
                    index = table.column(INDEX_COLUMN)
                    if table.num_rows and index[0].as_py() != expected:
                        raise ValueError(f"merge_feature_files: {part} row group {g} starts at index "
                                         f"{index[0].as_py()}, expected {expected}")
                    expected += table.num_rows
                    writer.write_table(table)
    return expected


# ---------------------------------------------------------------------- reading
def _to_numpy(chunked: pa.ChunkedArray, dtype) -> np.ndarray:
    """Flat numpy values of a primitive (or flattened list) column; zero-copy for single clean chunks.

    A single chunk without nulls whose buffer is exclusively owned by the freshly read table is wrapped
    without copying (and stays writable); otherwise the chunks are copied into one new array.
    """
    chunks = [c.flatten() if pa.types.is_fixed_size_list(c.type) else c for c in chunked.chunks]
    if len(chunks) == 1 and chunks[0].null_count == 0 and chunks[0].type == pa.from_numpy_dtype(dtype):
        c = chunks[0]
        buf = c.buffers()[1]
        itemsize = np.dtype(dtype).itemsize
        if buf is not None and buf.is_mutable and len(c) * itemsize + c.offset * itemsize <= buf.size:
            return np.frombuffer(buf, dtype=dtype, count=len(c), offset=c.offset * itemsize)
    if not chunks:
        return np.empty(0, dtype=dtype)
    return np.concatenate([c.to_numpy(zero_copy_only=False).astype(dtype, copy=False) for c in chunks])


def _decode_meta(meta: Optional[Mapping[bytes, bytes]]) -> Dict[str, str]:
    return {k.decode(): v.decode() for k, v in (meta or {}).items()}


def sample_shape(field: pa.Field) -> tuple:
    """The per-sample shape of a column: ``()`` for a scalar, ``(D,)`` for a vector, the recorded ``shape`` for a
    flattened array (feature maps)."""
    if not pa.types.is_fixed_size_list(field.type):
        return ()
    meta = _decode_meta(field.metadata)
    return tuple(json.loads(meta["shape"])) if "shape" in meta else (field.type.list_size,)


def read_features(uri: PathLike, columns: Optional[Sequence[str]] = None) -> FeatureSet:
    """Read a feature file (all representation columns, or ``columns``) into a :class:`FeatureSet`.

    Vector columns come back as ``(N, D)`` float32 arrays, scalar columns as ``(N,)``, and columns
    with a recorded ``shape`` as ``(N, *shape)``. Raises ``KeyError`` naming the available columns
    when one is missing.
    """
    fs, path = resolve(uri)
    schema = pq.read_schema(path, filesystem=fs)
    available = [n for n in schema.names if n not in (INDEX_COLUMN, LABEL_COLUMN)]
    wanted = list(available if columns is None else columns)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise KeyError(f"{uri}: no column(s) {missing}; available: {available}")
    table = pq.read_table(path, filesystem=fs, columns=[INDEX_COLUMN, LABEL_COLUMN, *wanted])
    n = table.num_rows
    index = _to_numpy(table.column(INDEX_COLUMN), np.int64)
    labels = _to_numpy(table.column(LABEL_COLUMN), np.int64)
    out: Dict[str, np.ndarray] = {}
    col_meta: Dict[str, Dict[str, str]] = {}
    for name in wanted:
        f = schema.field(name)
        meta = _decode_meta(f.metadata)
        values = _to_numpy(table.column(name), np.float32)
        if pa.types.is_fixed_size_list(f.type):
            values = values.reshape((n, *sample_shape(f)))
        out[name] = values
        col_meta[name] = meta
    del table
    metadata = {k[len(META_PREFIX):]: v for k, v in _decode_meta(schema.metadata).items() if k.startswith(META_PREFIX)}
    return FeatureSet(index=index, labels=labels, columns=out, metadata=metadata, column_meta=col_meta)


@dataclass
class FeatureFileInfo:
    """What a feature file holds, read from its Parquet footer alone (:func:`describe_feature_file`).

    ``columns`` maps each representation column to its per-sample shape: ``()`` for a float32 scalar,
    ``(D,)`` for a vector, the recorded ``shape`` for a flattened array (feature maps); :meth:`width` gives
    the number of floats per sample. ``metadata`` is the schema metadata without the ``ood_sweep.`` prefix
    (``backbone``, ``dataset``, ``split``, ``role``, ``layers``...). ``complete`` is False when the footer's
    row count differs from the ``ood_sweep.num_rows`` the writer recorded when it closed.
    """

    uri: str
    rows: int
    columns: Dict[str, tuple]
    metadata: Dict[str, str]
    column_meta: Dict[str, Dict[str, str]]
    size_bytes: int
    complete: bool

    def width(self, column: str) -> int:
        return int(np.prod(self.columns[column], dtype=np.int64)) if self.columns[column] else 1


def describe_feature_file(uri: PathLike) -> FeatureFileInfo:
    """Rows, columns (with their widths) and metadata of the feature file at ``uri`` (path or URI), from the
    Parquet footer only: no column is read, so it takes milliseconds whatever the file's size.

    Raises ``FileNotFoundError`` when there is no file at ``uri`` and ``ValueError`` (one line, naming the file)
    when it is not a readable Parquet feature file (truncated, damaged, another format, no ``index`` /
    ``label`` columns).
    """
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no feature file at {uri}")
    try:
        with fs.open_input_file(path) as f:
            md = pq.read_metadata(f)
            schema = md.schema.to_arrow_schema()
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError: every way a footer can be unreadable
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{uri} is not a readable Parquet file ({text[:200]})") from None
    missing = [n for n in (INDEX_COLUMN, LABEL_COLUMN) if n not in schema.names]
    if missing:
        raise ValueError(f"{uri} is a Parquet file but not a feature file (no {' / '.join(missing)} column)")
    columns: Dict[str, tuple] = {}
    column_meta: Dict[str, Dict[str, str]] = {}
    for f in schema:
        if f.name in (INDEX_COLUMN, LABEL_COLUMN):
            continue
        columns[f.name] = sample_shape(f)
        column_meta[f.name] = _decode_meta(f.metadata)
    kv = _decode_meta(md.metadata)
    metadata = {k[len(META_PREFIX):]: v for k, v in kv.items() if k.startswith(META_PREFIX) and k != _NUM_ROWS_KEY}
    return FeatureFileInfo(uri=str(uri), rows=int(md.num_rows), columns=columns, metadata=metadata,
                           column_meta=column_meta, size_bytes=int(info.size or 0),
                           complete=kv.get(_NUM_ROWS_KEY) == str(md.num_rows))


def validate_feature_file(uri: PathLike, expected_columns: Iterable[str] = ()) -> bool:
    """True when ``uri`` is a complete feature file holding ``expected_columns``.

    Checks: the file exists and its Parquet footer is readable; ``index`` / ``label`` are int64;
    every expected column exists and is float32 / float16 or a fixed-size list of them; the row count in the
    footer is positive and equals the ``ood_sweep.num_rows`` recorded when the writer closed. Never
    raises for a missing or corrupt file (returns False).
    """
    try:
        fs, path = resolve(uri)
        with fs.open_input_file(path) as f:
            md = pq.read_metadata(f)
            schema = md.schema.to_arrow_schema()
    except Exception:  # noqa: BLE001 - any unreadable file is simply invalid
        return False
    kv = _decode_meta(md.metadata)
    if _NUM_ROWS_KEY not in kv or str(md.num_rows) != kv[_NUM_ROWS_KEY] or md.num_rows <= 0:
        return False
    if sum(md.row_group(i).num_rows for i in range(md.num_row_groups)) != md.num_rows:
        return False
    for name in (INDEX_COLUMN, LABEL_COLUMN):
        if name not in schema.names or schema.field(name).type != pa.int64():
            return False
    for name in expected_columns:
        if name not in schema.names:
            return False
        t = schema.field(name).type
        value_type = t.value_type if pa.types.is_fixed_size_list(t) else t
        if value_type not in STORAGE_DTYPES.values():
            return False
    return True


def check_feature_file(uri: PathLike, expected_columns: Iterable[str] = ()) -> Cached:
    """The reuse check of a cached feature file: its content hash (:func:`ood_core.storage.verify_cached`:
    a damaged file is set aside and said in ``note``), then its structure (:func:`validate_feature_file`).

    ``ok`` means: reuse it. A file without a hash record (an older ood-sweep) is not reused: it is
    recomputed, and the new file carries a hash.
    """
    cached = verify_cached(uri, "feature file")
    if cached.ok and not validate_feature_file(uri, expected_columns):
        return Cached(False, note="cached feature file lacks the expected columns; recomputing")
    return cached
