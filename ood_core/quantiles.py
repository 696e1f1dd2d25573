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

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .streaming import Chunk, _rows

__all__ = ["order_statistics_of_stream", "quantiles_of_stream"]

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


def _select(values: Callable[[], Iterable[Chunk]], ranks_of: Callable[[int], List[int]]):
    """``(n, nan, ranks, order statistics)``: pass 1 counts the entries (``n``, whether one is NaN) and their top
    digits; ``ranks_of(n)`` says which ranks to find; the next passes refine them (see
    :func:`order_statistics_of_stream`)."""
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


def quantiles_of_stream(values: Callable[[], Iterable[Chunk]], qs: Sequence[float]) -> List[float]:
    r"""``numpy.percentile(all_values, qs)`` (linear interpolation, ``qs`` a sequence of percents) of all entries
    of the stream ``values()`` (a new pass per call; see :func:`order_statistics_of_stream`), exactly: the same
    float64 numbers, from the exact order statistics (float32: 2 passes) and numpy's arithmetic

    .. math:: v = (n - 1)\,q/100, \quad j = \lfloor v \rfloor, \quad g = v - j, \quad
              Q = \begin{cases} x_{(j)} + (x_{(j+1)} - x_{(j)})\, g & g < 1/2 \\
                                x_{(j+1)} - (x_{(j+1)} - x_{(j)})(1 - g) & g \ge 1/2 \end{cases}

    with the difference :math:`x_{(j+1)} - x_{(j)}` in the values' dtype, as numpy computes it (numpy with a
    scalar ``q`` also rounds the result to the values' dtype; bfloat16 values are interpolated as float32). A NaN
    among the values makes every quantile NaN, as in numpy."""
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

    _, nan, ranks, found = _select(values, ranks_of)
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
