"""Training rows read in chunks: a fit that streams never holds a second full copy of the training set.

:class:`RowSource` wraps the representation columns of one data set, as numpy arrays (memory-mapped files from
:func:`ood_core.feature_store.map_features`, float16 or float32) or tensors, with their labels. Detectors that
fit from a stream (``streams_fit``: sufficient statistics, exact selection, a sampled bank) read it chunk by
chunk, converted to float32 one chunk at a time; the others call :meth:`RowSource.tensor` and get the whole
column, as before.

>>> rows = RowSource({"features": feats}, labels, chunk_rows=65536)  # doctest: +SKIP
>>> for x, y in rows.chunks("features"):  # a new pass on every call  # doctest: +SKIP
...     ...
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["RowSource", "CHUNK_BYTES", "ROW_QUANTUM"]

#: float32 bytes per chunk by default (8,192 rows of 2,048 features): a trial's working set, whatever N
CHUNK_BYTES = 64 << 20
#: chunks hold a multiple of this many rows: the float64 blocks of the statistics (ood_core.streaming) then fall
#: where an in-memory fit puts them, and a streamed fit equals it bit for bit
ROW_QUANTUM = 8192


def _as_tensor(a, rows: slice, device, dtype) -> Tensor:
    part = a[rows]
    if not isinstance(part, Tensor):  # a chunk of a read-only array is copied (torch tensors are writable)
        part = np.ascontiguousarray(part) if part.flags.writeable else np.array(part)
    t = part if isinstance(part, Tensor) else torch.from_numpy(part)
    return t.to(device=device, dtype=dtype)


class RowSource(Mapping):
    """The columns of one data set (``name -> (N, ...)`` array) and its labels ``(N,)``, read in row chunks.

    A :class:`~collections.abc.Mapping` of the column names, so a detector that reads whole columns sees the
    same interface as a dict of tensors (``rows["features"]`` is the whole column as a float32 tensor).

    :param columns: name -> array or tensor of shape ``(N, ...)`` (any float dtype; read-only is fine)
    :param labels: ``(N,)`` integer labels (``-1``: unlabelled / auxiliary outlier)
    :param chunk_rows: rows per chunk of :meth:`chunks` (default: about :data:`CHUNK_BYTES` of float32 rows, a
        multiple of :data:`ROW_QUANTUM`)
    :param device: where the chunks are placed (default: the CPU)
    :param aliases: extra names for columns (``{"features": "penultimate"}``)
    :param share: ``share(key, compute)`` returns what ``compute()`` returns for these rows, computed once for
        every fit that asks (:meth:`shared`); default: kept in this object. The sweep's trials pass a cache
        shared by the processes of a machine.
    """

    def __init__(self, columns: Mapping[str, object], labels, chunk_rows: Optional[int] = None, device=None,
                 aliases: Optional[Mapping[str, str]] = None,
                 share: Optional[Callable[[str, Callable[[], Any]], Any]] = None):
        self._columns = dict(columns)
        self._aliases = dict(aliases or {})
        lab = labels if isinstance(labels, Tensor) else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.labels = lab.to(device=device, dtype=torch.long)  #: ``(N,)`` int64 labels
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
        self._share = share
        self._memo: Dict[str, Any] = {}
        self.device = torch.device("cpu") if device is None else torch.device(device)
        n = int(self.labels.shape[0])
        for name, a in self._columns.items():
            if int(a.shape[0]) != n:
                raise ValueError(f"column {name!r} has {a.shape[0]} rows, the labels {n}")

    # -- Mapping --------------------------------------------------------------------------
    def _column(self, name: str):
        key = self._aliases.get(name, name)
        if key not in self._columns:
            raise KeyError(name)
        return self._columns[key]

    def __getitem__(self, name: str) -> Tensor:
        return self.tensor(name)

    def __iter__(self):
        return iter([*self._columns, *(a for a in self._aliases if self._aliases[a] in self._columns)])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __contains__(self, name) -> bool:
        return self._aliases.get(name, name) in self._columns

    # -- rows -----------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def shape(self, name: str) -> Tuple[int, ...]:
        """Per-sample shape of a column."""
        return tuple(int(s) for s in self._column(name).shape[1:])

    def nbytes(self, name: str) -> int:
        """Bytes of the column as stored (float16 columns: half of float32)."""
        a = self._column(name)
        return int(a.numel() * a.element_size()) if isinstance(a, Tensor) else int(a.nbytes)

    def rows_per_chunk(self, name: str) -> int:
        if self.chunk_rows is not None:
            return self.chunk_rows
        row_bytes = 4 * max(1, int(np.prod(self.shape(name), dtype=np.int64)))
        return max(ROW_QUANTUM, CHUNK_BYTES // row_bytes // ROW_QUANTUM * ROW_QUANTUM)

    def slices(self, name: str) -> Sequence[slice]:
        step = self.rows_per_chunk(name)
        return [slice(s, min(s + step, self.num_rows)) for s in range(0, self.num_rows, step)]

    def chunks(self, name: str, dtype: torch.dtype = torch.float32) -> Iterator[Tuple[Tensor, Tensor]]:
        """``(x, y)`` chunks of column ``name`` in row order, ``x`` converted to ``dtype`` one chunk at a time
        (a new pass on each call)."""
        a = self._column(name)
        for rows in self.slices(name):
            yield _as_tensor(a, rows, self.device, dtype), self.labels[rows]

    def shared(self, column: str, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` for column ``column`` of these rows, computed once and shared by every fit that asks for
        ``name`` (a statistic several detectors need: Mahalanobis and RMD the same class moments, ViM's values of
        ``d`` the same second moment)."""
        key = f"{self._aliases.get(column, column)}/{name}"
        if self._share is not None:
            return self._share(key, compute)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole column as one tensor (a copy unless it is already a ``dtype`` tensor on the device)."""
        a = self._column(name)
        if isinstance(a, Tensor):
            return a.to(device=self.device, dtype=dtype)
        if a.dtype == np.dtype(torch.empty(0, dtype=dtype).numpy().dtype) and self.device.type == "cpu":
            return torch.from_numpy(np.array(a, copy=True)) if not a.flags.writeable else torch.from_numpy(a)
        return _as_tensor(a, slice(None), self.device, dtype)

    def materialise(self, names: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """``{name: whole column}`` (float32 tensors)."""
        return {n: self.tensor(n) for n in (list(self) if names is None else names)}
