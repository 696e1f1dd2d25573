r"""Exact quantiles of a stream in bounded memory: the :math:`k`-th smallest values and ``numpy.percentile``
(linear interpolation) of all entries of the chunks of a training set (ReAct's clipping threshold), never
holding the entries at once.

A radix selection over the bit patterns of the floats: the floats are mapped to integer keys in the order of
their values, and each pass counts the next :data:`DIGIT_BITS` bits of the keys that share the digits found so
far (65,536 counters per wanted value), so two passes find a float32 value exactly (one for float16 / bfloat16,
four for float64), whatever the number of ties. The interpolation between the two order statistics around a
quantile repeats numpy's arithmetic, so :func:`quantiles_of_stream` equals ``numpy.percentile`` bit for bit.

Pure torch / numpy (no ray, no mlflow).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .streaming import Chunk, _rows

__all__ = ["column_order_statistics_of_stream", "order_statistics_at", "order_statistics_of_stream",
           "quantiles_of_stream", "top_digits_of_stream"]

#: entries per block of the radix selection (each int temporary: 64 MiB)
SELECT_BLOCK = 1 << 24
#: bits per radix digit: 65,536 counters per histogram
DIGIT_BITS = 16


_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


def _keys(flat: Tensor) -> Tensor:
    """Signed integer keys of the floats' bit patterns, in the order of the values (same width): a negative
    float has its magnitude bits flipped (``-0.0`` sorts just below ``+0.0``; both are 0)."""
    bits = flat.element_size() * 8
    ints = flat.view(_INT[flat.dtype])
    key = ints >> (bits - 1)  # 0 or -1
    key &= (1 << (bits - 1)) - 1
    key ^= ints
    return key


def _floats(keys: List[int], dtype: torch.dtype) -> Tensor:
    """The floats of ``keys`` (the inverse of :func:`_keys`: the same flip)."""
    bits = torch.empty(0, dtype=dtype).element_size() * 8
    k = torch.tensor(keys, dtype=torch.int64)
    ints = k ^ ((k >> 63) & ((1 << (bits - 1)) - 1))
    return ints.to(_INT[dtype]).view(dtype)


def order_statistics_of_stream(values: Callable[[], Iterable[Chunk]], ranks: Sequence[int]) -> Tensor:
    r"""The ``ranks``-th smallest (0-based) of all entries of the stream, exactly, in the entries' dtype.

    ``values()`` starts a new pass over chunks (tensors of any shape, or ``(x, y)`` pairs: the entries of
    ``x``), all of one floating dtype. A radix selection: the floats' bit patterns, mapped to integers in the
    order of the values (:func:`_keys`), are counted by their top 16 bits (pass 1, 65,536 counters); the counts
    give the group holding each wanted rank and the rank inside it; pass 2 counts the next 16 bits of the
    entries of that group only, and so on until the whole pattern is known: float32 in 2 passes, float16 and
    bfloat16 in 1, float64 in 4. Memory: 65,536 counters per wanted rank and pass, whatever the number of ties,
    and int temporaries of :data:`SELECT_BLOCK` entries. Values must not be NaN (:func:`quantiles_of_stream`
    returns NaN for them, as numpy)."""
    return _select(values, lambda n: [int(k) for k in ranks])[3]


def order_statistics_at(values: Callable[[], Iterable[Chunk]], ranks_of: Callable[[int], Sequence[int]]
                        ) -> Tuple[int, bool, List[int], Tensor]:
    """:func:`order_statistics_of_stream` for ranks that depend on the number of entries: ``(n, whether an entry
    is NaN, ranks_of(n), the order statistics)``."""
    return _select(values, lambda n: [int(k) for k in ranks_of(n)])


def top_digits_of_stream(values: Callable[[], Iterable[Chunk]]) -> Tuple[torch.dtype, int, bool, Tensor]:
    """The first pass of the exact selection: ``(dtype, n entries, whether one is NaN, counts of the entries' top
    16 key bits)``. It does not depend on the wanted ranks: fits that select several quantiles of one stream
    (ReAct's percentiles in a search) can compute it once and pass it to :func:`quantiles_of_stream`."""
    dtype: Optional[torch.dtype] = None
    n, nan = 0, False
    hist: Optional[Tensor] = None
    for chunk in values():
        x = _rows(chunk).detach()
        if dtype is None:
            dtype = x.dtype
            if dtype not in _INT:
                raise ValueError(f"exact selection: values must be floating, got {dtype}")
        elif x.dtype != dtype:
            raise ValueError(f"exact selection: chunks of {x.dtype} after chunks of {dtype}")
        flat = x.reshape(-1)
        n += flat.numel()
        bits = flat.element_size() * 8
        for s in range(0, flat.numel(), SELECT_BLOCK):
            block = flat[s : s + SELECT_BLOCK]
            nan = nan or bool(torch.isnan(block).any())
            top = (_keys(block) >> (bits - DIGIT_BITS)).to(torch.int32) + (1 << (DIGIT_BITS - 1))  # 0 .. 65535
            hist = _count(hist, top)
    if n == 0:
        raise ValueError("exact selection: no values")
    return dtype, n, nan, hist


def _select(values: Callable[[], Iterable[Chunk]], ranks_of: Callable[[int], List[int]],
            first: Optional[Tuple[torch.dtype, int, bool, Tensor]] = None):
    """``(n, nan, ranks, order statistics)``: pass 1 counts the entries (``n``, whether one is NaN) and their top
    digits (or ``first``, :func:`top_digits_of_stream` of the same stream); ``ranks_of(n)`` says which ranks to
    find; the next passes refine them (see :func:`order_statistics_of_stream`)."""
    dtype, n, nan, hist = top_digits_of_stream(values) if first is None else first
    ranks = ranks_of(n)
    bad = [k for k in ranks if not 0 <= k < n]
    if bad:
        raise ValueError(f"exact selection: rank {bad[0]} outside [0, {n})")
    bits = torch.empty(0, dtype=dtype).element_size() * 8
    # per wanted rank: (the known top digits of its key, as a signed prefix; its rank among the keys with them)
    state = {}
    for k in sorted(set(ranks)):
        digit, r = _locate(hist.cpu(), k)
        state[k] = (digit - (1 << (DIGIT_BITS - 1)), r)
    for level in range(2, bits // DIGIT_BITS + 1):  # float32: one more pass
        shift = bits - level * DIGIT_BITS
        prefixes = sorted({p for p, _ in state.values()})
        hists: Dict[int, Tensor] = {}
        for chunk in values():
            flat = _rows(chunk).detach().reshape(-1)
            for s in range(0, flat.numel(), SELECT_BLOCK):
                keys = _keys(flat[s : s + SELECT_BLOCK])
                high = keys >> (shift + DIGIT_BITS)
                for p in prefixes:
                    digits = ((keys[high == p] >> shift) & ((1 << DIGIT_BITS) - 1)).to(torch.int32)
                    hists[p] = _count(hists.get(p), digits)
        for k, (p, r) in list(state.items()):
            digit, r = _locate(hists[p].cpu(), r)
            state[k] = ((p << DIGIT_BITS) + digit, r)
    return n, nan, ranks, _floats([state[k][0] for k in ranks], dtype)


def _count(hist: Optional[Tensor], digits: Tensor) -> Tensor:
    """``hist`` (65,536 int64 counters, ``None``: zeros) plus the counts of ``digits``: a bincount for large
    blocks, the distinct digits' counts for small ones (a full-width bincount per small chunk costs more than
    the chunk)."""
    if hist is None:
        hist = torch.zeros(1 << DIGIT_BITS, dtype=torch.long, device=digits.device)
    if digits.numel() * 16 < hist.numel():
        found, counts = torch.unique(digits, return_counts=True)
        return hist.index_add_(0, found.long(), counts)
    return hist.add_(torch.bincount(digits, minlength=1 << DIGIT_BITS))


def _locate(hist: Tensor, rank: int):
    """``(bin, rank inside the bin)`` of the ``rank``-th smallest entry counted by ``hist``."""
    cum = torch.cumsum(hist, dim=0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype), right=True)[0])
    return b, rank - (int(cum[b - 1]) if b else 0)


def quantiles_of_stream(values: Callable[[], Iterable[Chunk]], qs: Sequence[float],
                        first: Optional[Tuple[torch.dtype, int, bool, Tensor]] = None) -> List[float]:
    r"""``numpy.percentile(all_values, qs)`` (linear interpolation, ``qs`` a sequence of percents) of all entries
    of the stream ``values()`` (a new pass per call; see :func:`order_statistics_of_stream`), exactly: the same
    float64 numbers, from the exact order statistics (float32: 2 passes) and numpy's arithmetic

    .. math:: v = (n - 1)\,q/100, \quad j = \lfloor v \rfloor, \quad g = v - j, \quad
              Q = \begin{cases} x_{(j)} + (x_{(j+1)} - x_{(j)})\, g & g < 1/2 \\
                                x_{(j+1)} - (x_{(j+1)} - x_{(j)})(1 - g) & g \ge 1/2 \end{cases}

    with the difference :math:`x_{(j+1)} - x_{(j)}` in the values' dtype, as numpy computes it (numpy with a
    scalar ``q`` also rounds the result to the values' dtype; bfloat16 values are interpolated as float32). A NaN
    among the values makes every quantile NaN, as in numpy. ``first``: the stream's first pass, computed before
    (:func:`top_digits_of_stream`), so that this call makes only the refining passes."""
    q = np.true_divide(np.asarray(qs, dtype=np.float64), 100)
    if q.ndim != 1 or not bool(np.all((q >= 0) & (q <= 1))):
        raise ValueError("quantiles_of_stream: qs must be a sequence of percentiles in [0, 100]")
    where = {}

    def ranks_of(n: int) -> List[int]:
        virtual = (n - 1) * q  # numpy's virtual index, previous and next index, gamma
        prev = np.floor(virtual)
        nxt = prev + 1
        above = virtual >= n - 1
        prev[above] = -1
        nxt[above] = -1
        where.update(gamma=virtual - prev, lo=prev.astype(np.int64) % n, hi=nxt.astype(np.int64) % n)
        return sorted({*where["lo"].tolist(), *where["hi"].tolist()})

    _, nan, ranks, found = _select(values, ranks_of, first)
    if nan:
        return [float("nan")] * len(q)
    found = (found.float() if found.dtype == torch.bfloat16 else found).numpy()
    value = dict(zip(ranks, found))
    a = np.array([value[k] for k in where["lo"]], dtype=found.dtype)
    b = np.array([value[k] for k in where["hi"]], dtype=found.dtype)
    gamma = where["gamma"]
    diff = b - a  # numpy's _lerp, the difference in the values' dtype
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe", dtype=out.dtype)
    return [float(v) for v in out]


#: bits per digit of the per-column selection: 256 counters per column and wanted rank
COLUMN_DIGIT_BITS = 8
#: entries per block of the per-column selection (its int temporaries: 4 MiB each for float32)
COLUMN_BLOCK = 1 << 20


def column_order_statistics_of_stream(values: Callable[[], Iterable[Chunk]],
                                      ranks_of: Callable[[int], Sequence[int]]) -> Tuple[int, List[int], Tensor]:
    r"""Per column, the ``ranks``-th smallest (0-based) over the rows of the stream, exactly:
    ``(n rows, ranks, values (len(ranks), *sample shape))``, ``ranks = ranks_of(n)``, in the rows' dtype.

    ``values()`` starts a new pass over chunks ``(n_i, ...)`` (or ``(x, y)`` pairs); every entry of a row is a
    column (``numpy.partition(x, ranks, axis=0)`` of all rows, never holding them). The radix selection of
    :func:`order_statistics_of_stream`, one per column at once, with digits of :data:`COLUMN_DIGIT_BITS` bits so
    that the counters stay small (256 per column and wanted rank): pass 1 counts the rows and the top digit of
    every entry, each further pass the next digit of the entries whose column's known digits match (float32: 4
    passes, float16 / bfloat16: 2, float64: 8). Memory: the counters and int temporaries of
    :data:`COLUMN_BLOCK` entries. NaN is refused (``ValueError``)."""
    dtype: Optional[torch.dtype] = None
    shape: Optional[Tuple[int, ...]] = None
    n, hist = 0, None
    base = 1 << (COLUMN_DIGIT_BITS - 1)
    mask = (1 << COLUMN_DIGIT_BITS) - 1

    def blocks(chunk: Chunk, check: bool = False):
        """``(keys, counter offset of each column)`` of row blocks of the chunk (``check``: refuse NaN, pass 1)."""
        x = _rows(chunk).detach()
        flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        width = flat.shape[1]
        offsets = torch.arange(width, dtype=torch.int32, device=flat.device) << COLUMN_DIGIT_BITS
        step = max(1, COLUMN_BLOCK // max(1, width))
        for s in range(0, flat.shape[0], step):
            block = flat[s : s + step]
            if check and bool(torch.isnan(block).any()):
                raise ValueError("exact selection: NaN among the values")
            yield _keys(block), offsets

    for chunk in values():
        x = _rows(chunk)
        if dtype is None:
            dtype, shape = x.dtype, tuple(x.shape[1:])
            if dtype not in _INT:
                raise ValueError(f"exact selection: values must be floating, got {dtype}")
            hist = torch.zeros(math.prod(shape) << COLUMN_DIGIT_BITS, dtype=torch.long, device=x.device)
        elif x.dtype != dtype or tuple(x.shape[1:]) != shape:
            raise ValueError(f"exact selection: chunks of {x.dtype} {tuple(x.shape[1:])} after chunks of {dtype} "
                             f"{shape}")
        n += x.shape[0]
        bits = x.element_size() * 8
        for keys, offsets in blocks(chunk, check=True):
            top = (keys >> (bits - COLUMN_DIGIT_BITS)).to(torch.int32) + base  # 0 .. 255
            hist += torch.bincount((offsets + top).reshape(-1), minlength=hist.numel())
    if n == 0:
        raise ValueError("exact selection: no values")
    ranks = [int(k) for k in ranks_of(n)]
    bad = [k for k in ranks if not 0 <= k < n]
    if bad:
        raise ValueError(f"exact selection: rank {bad[0]} outside [0, {n})")
    bits = torch.empty(0, dtype=dtype).element_size() * 8
    width = math.prod(shape)
    state = {}  # rank -> (known top digits of each column's key, as signed prefixes (E,); rank inside them (E,))
    for k in sorted(set(ranks)):
        digit, r = _locate_columns(hist.view(width, -1), torch.full((width,), k, dtype=torch.long,
                                                                     device=hist.device))
        state[k] = (digit - base, r)
    for level in range(2, bits // COLUMN_DIGIT_BITS + 1):
        shift = bits - level * COLUMN_DIGIT_BITS
        prefixes = {k: p.to(_INT[dtype]) for k, (p, _) in state.items()}  # compared in the keys' width
        hists = {k: torch.zeros_like(hist) for k in state}
        for chunk in values():
            for keys, offsets in blocks(chunk):
                high = keys >> (shift + COLUMN_DIGIT_BITS)
                index = offsets + ((keys >> shift) & mask).to(torch.int32)
                for k, prefix in prefixes.items():
                    hists[k] += torch.bincount(index[high == prefix], minlength=hist.numel())
        for k, (prefix, r) in list(state.items()):
            digit, r = _locate_columns(hists[k].view(width, -1), r)
            state[k] = ((prefix << COLUMN_DIGIT_BITS) + digit, r)
    found = torch.stack([_floats(state[k][0].tolist(), dtype) for k in ranks]) if ranks else \
        torch.empty(0, width, dtype=dtype)
    return n, ranks, found.reshape(len(ranks), *shape)


def _locate_columns(hist: Tensor, rank: Tensor) -> Tuple[Tensor, Tensor]:
    """Per column, ``(digit, rank inside it)`` of the ``rank``-th smallest entry counted by ``hist`` ``(E, 256)``."""
    cum = torch.cumsum(hist, dim=1)
    b = torch.searchsorted(cum, rank[:, None], right=True)[:, 0]
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(b))
    return b, rank - before
