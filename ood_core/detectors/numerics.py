"""Numerical building blocks shared by the detectors.

* :func:`sum64` / :func:`mean64`: column sums / means as float64 of float32 data without a float64 copy of
  the whole matrix: ``exact=True`` converts row blocks to float64; ``exact=False`` sums row blocks in their
  dtype (torch's cascade summation, ~1e-7 relative) and adds the block sums in float64, for centring where
  nothing downstream depends on the last bits.
* :func:`float64_blocks`: row blocks of ``x - center`` in float64, one reused buffer (no float64 copy of ``x``).
* :func:`scatter` / :func:`scatter64`: the scatter matrix :math:`\\sum_i (x_i - c)(x_i - c)^\\top` as float64,
  from row blocks: in float64 throughout, or with float32 products about a point near the mean ("shifted
  data") summed in float64 (precision of one float32 block product, not of a float32 sum over all rows).
* :func:`cholesky_whitener`: ``L^{-1}`` and ``log det`` of ``cov + ridge I`` (Cholesky, float64).
* :func:`one_thread`: small dense factorisations (``eigh``, Cholesky of a D x D matrix) on one CPU thread:
  LAPACK's threaded ``eigh`` of a 512 x 512 matrix takes 0.2-4 s with 2 threads on 2 busy cores against
  0.03-0.06 s on one thread.
* :func:`row_slices` / :func:`by_row_blocks`: a row-wise score evaluated on row blocks, so that its
  temporaries stay small (on the CPU, large fresh temporaries cost page faults).
* :func:`percentiles` / :func:`percentiles_dim0`: ``numpy.percentile`` (linear interpolation) of all
  entries or per column, by partial selection (``numpy.partition`` on CPU, ``kthvalue`` elsewhere), several
  percentiles in one pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

#: rows per block of :func:`sum64` (``exact=True``; 8x that otherwise)
BLOCK_ROWS = 1024
#: rows per float64 block of :func:`float64_blocks` (2048 x 512 float64 = 8 MiB)
SCATTER_ROWS = 2048
#: bytes per row block of the chunked predictions (:func:`row_slices`)
BLOCK_BYTES = 8 << 20


def sum64(x: Tensor, exact: bool = True) -> Tensor:
    """Column sums of ``x`` ``(N, D)`` as float64 ``(D,)`` (see the module docstring for ``exact``)."""
    if x.dtype == torch.float64 or x.device.type != "cpu":
        return x.sum(dim=0, dtype=torch.float64)
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    rows = BLOCK_ROWS if exact else 8 * BLOCK_ROWS
    for s in range(0, x.shape[0], rows):
        blk = x[s : s + rows]
        out += blk.to(torch.float64).sum(dim=0) if exact else blk.sum(dim=0).to(torch.float64)
    return out


def mean64(x: Tensor, exact: bool = True) -> Tensor:
    """Column means of ``x`` ``(N, D)`` as float64 ``(D,)`` (``N >= 1``)."""
    return sum64(x, exact) / x.shape[0]


def row_slices(x: Tensor, width: Optional[int] = None, block_bytes: int = BLOCK_BYTES):
    """Slices of the rows of ``x`` so that a temporary of ``width`` (default: ``x``'s row size) columns
    per row stays under ``block_bytes``: cache-friendly chunks, and temporaries the allocator reuses
    instead of mapping fresh pages each time (glibc maps blocks above 32 MiB anew on every call)."""
    width = x[0].numel() if width is None and x.shape[0] else max(int(width or 1), 1)
    rows = max(1, block_bytes // (width * x.element_size()))
    return [slice(s, s + rows) for s in range(0, x.shape[0], rows)]


def by_row_blocks(fn: Callable[[Tensor], Tensor], x: Tensor, block_bytes: int = BLOCK_BYTES) -> Tensor:
    """``fn(x)`` for a row-wise ``fn`` (output row ``i`` depends on input row ``i`` only), evaluated on row
    blocks of about ``block_bytes`` of ``x`` on the CPU and concatenated: the temporaries of ``fn`` stay small
    and the allocator reuses them, where full-size ones are mapped afresh on every call (page faults: scoring
    20,000 x 512 features in one piece took 2x the CPU time of Mahalanobis and GMM's blocks). On other devices
    (caching allocators) ``fn(x)`` in one call."""
    slices = row_slices(x, block_bytes=block_bytes) if x.device.type == "cpu" else []
    if len(slices) <= 1:
        return fn(x)
    return torch.cat([fn(x[rows]) for rows in slices])


def float64_blocks(x: Tensor, center: Optional[Tensor] = None, rows: int = SCATTER_ROWS):
    """Yield ``(start, block)``: row blocks of ``x - center`` in float64, in one reused cache-sized buffer
    (a block is only valid until the next one; no float64 copy of the whole of ``x``). Read-only: for
    float64 ``x`` without ``center`` the blocks are views of ``x``."""
    c = None if center is None else center.to(device=x.device, dtype=torch.float64)
    if x.dtype == torch.float64 and c is None:
        for s in range(0, x.shape[0], rows):
            yield s, x[s : s + rows]
        return
    buf = torch.empty(min(rows, x.shape[0]), x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], rows):
        blk = x[s : s + rows]
        out = buf[: blk.shape[0]]
        if c is None:
            out.copy_(blk)
        else:
            torch.sub(blk, c, out=out)
        yield s, out


def scatter(x: Tensor, center: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""``sum_i (x_i - c)(x_i - c)^T`` as float64 ``(D, D)`` for ``x`` ``(N, D)`` (``c = 0`` if ``center`` is
    None), with products in ``dtype`` (default: that of ``x``, float32 at least).

    * float64: float64 row blocks of ``x - c`` (:func:`float64_blocks`), products and sums in float64.
    * float32: ``SCATTER_ROWS``-row blocks of ``x - p`` in float32, ``p`` the mean of the first block (any
      point near the data's centre serves), multiplied in float32 and summed in float64; then the exact move
      from ``p`` to ``c`` in float64,
      :math:`S_c = S_p + s\,\delta^\top + \delta\, s^\top + N \delta\delta^\top` with
      :math:`\delta = p - c`, :math:`s = \sum_i (x_i - p)`. Centring near the mean keeps the float32 partial
      sums at the spread of the data instead of its offset (relative error ~1e-7 to 1e-6: that of one
      float32 product over a block, not of a float32 sum over all of N).
    """
    dtype = dtype or (x.dtype if x.dtype == torch.float64 else torch.float32)
    n, d = x.shape
    out = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    if dtype == torch.float64:
        for _, blk in float64_blocks(x, center):
            out.addmm_(blk.T, blk)
        return 0.5 * (out + out.T)
    pivot = x[:SCATTER_ROWS].to(dtype).mean(dim=0)
    total = torch.zeros(d, dtype=torch.float64, device=x.device)  # s = sum_i (x_i - p)
    for s in range(0, n, SCATTER_ROWS):
        xc = x[s : s + SCATTER_ROWS].to(dtype) - pivot
        total += xc.sum(dim=0, dtype=torch.float64)
        out += (xc.T @ xc).double()
    delta = pivot.double() - (0.0 if center is None else center.to(device=x.device, dtype=torch.float64))
    cross = torch.outer(total, delta)
    out = out.add_(cross + cross.T).add_(torch.outer(delta, delta), alpha=n)
    return 0.5 * (out + out.T)


def scatter64(x: Tensor, center: Optional[Tensor] = None) -> Tensor:
    """``sum_i (x_i - c)(x_i - c)^T`` in float64 throughout, ``(D, D)``: :func:`scatter` in float64."""
    return scatter(x, center, torch.float64)


@contextmanager
def one_thread(t: Tensor) -> Iterator[None]:
    """Within the block, torch runs CPU operations on one thread (nothing changes for ``t`` elsewhere)."""
    threads = torch.get_num_threads()
    if t.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cholesky_whitener(cov: Tensor, ridge: float) -> Tuple[Tensor, float]:
    """``(L^{-1}, log det)`` of ``cov + ridge I = L L^T`` (float64, ``L`` lower triangular), so that
    ``|L^{-1} x|^2 = x^T (cov + ridge I)^{-1} x``. Where the matrix is numerically indefinite despite the
    ridge, its eigenvalues are clipped at ``ridge`` first."""
    d = cov.shape[0]
    cov = 0.5 * (cov + cov.T)
    cov.diagonal().add_(ridge)
    with one_thread(cov):
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            evals, evecs = torch.linalg.eigh(cov)
            chol = torch.linalg.cholesky((evecs * evals.clamp(min=ridge)) @ evecs.T)
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        whitener = torch.linalg.solve_triangular(chol, eye, upper=False)
    return whitener, float(2.0 * torch.diagonal(chol).log().sum())


def _numpy_ok(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float16, torch.float32, torch.float64)


def _positions(n: int, qs: Sequence[float]) -> List[tuple]:
    out = []
    for q in qs:
        pos = (float(q) / 100.0) * (n - 1)
        lo = min(int(pos), n - 1)
        out.append((lo, min(lo + 1, n - 1), pos - lo))
    return out


def percentiles(x: Tensor, qs: Sequence[float]) -> List[float]:
    """``numpy.percentile(x, q)`` (linear interpolation) of all entries of ``x`` for each ``q`` in ``qs``."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    pos = _positions(n, qs)
    kth = sorted({k for lo, hi, _ in pos for k in (lo, hi)})
    if _numpy_ok(flat):
        part = np.partition(flat.numpy(), kth)
        value = {k: float(part[k]) for k in kth}
    else:
        value = {k: float(flat.kthvalue(k + 1).values) for k in kth}
    return _interpolate(value, pos)


def percentiles_of_stream(values: Callable[[], Iterable[Any]], qs: Sequence[float]) -> List[float]:
    """:func:`percentiles` of all entries of the stream ``values()`` (a new pass per call over tensors or
    ``(x, y)`` pairs), never holding them: the same numbers, from the exact order statistics
    (:func:`~ood_core.quantiles.order_statistics_at`)."""
    from ..quantiles import order_statistics_at

    pos: List[tuple] = []
    n, nan, ranks, found = order_statistics_at(values, lambda n: _kth(pos, n, qs))
    if nan:
        return [float("nan")] * len(pos)
    return _interpolate(dict(zip(ranks, found.double().tolist())), pos)


def percentiles_dim0(x: Tensor, qs: Sequence[float]) -> List[Tensor]:
    """``numpy.percentile(x, q, axis=0)`` (linear interpolation) of ``x`` ``(N, ...)`` for each ``q``."""
    x = x.detach()
    n = x.shape[0]
    flat = x.reshape(n, -1)
    pos = _positions(n, qs)
    kth = sorted({k for lo, hi, _ in pos for k in (lo, hi)})
    if _numpy_ok(flat):
        part = torch.from_numpy(np.partition(flat.T.contiguous().numpy(), kth, axis=1))
        value = {k: part[:, k] for k in kth}
    else:
        value = {k: flat.kthvalue(k + 1, dim=0).values for k in kth}
    return _interpolate_columns(value, pos, x.dtype, x.shape[1:])


def percentiles_dim0_of_stream(values: Callable[[], Iterable[Any]], qs: Sequence[float]) -> List[Tensor]:
    """:func:`percentiles_dim0` of the rows of the stream ``values()`` (chunks ``(n_i, ...)`` or ``(x, y)``
    pairs), never holding them: the same tensors, from the exact order statistics of every column
    (:func:`~ood_core.quantiles.column_order_statistics_of_stream`)."""
    from ..quantiles import column_order_statistics_of_stream

    pos: List[tuple] = []
    _, ranks, found = column_order_statistics_of_stream(values, lambda n: _kth(pos, n, qs))
    value = {k: found[i].reshape(-1) for i, k in enumerate(ranks)}
    return _interpolate_columns(value, pos, found.dtype, found.shape[1:])


def _kth(pos: List[tuple], n: int, qs: Sequence[float]) -> List[int]:
    """The order statistics the percentiles ``qs`` of ``n`` values need; fills ``pos`` (:func:`_positions`)."""
    pos[:] = _positions(n, qs)
    return sorted({k for lo, hi, _ in pos for k in (lo, hi)})


def _interpolate(value: Dict[int, float], pos: List[tuple]) -> List[float]:
    return [value[lo] + (value[hi] - value[lo]) * frac if frac else value[lo] for lo, hi, frac in pos]


def _interpolate_columns(value: Dict[int, Tensor], pos: List[tuple], dtype: torch.dtype, shape) -> List[Tensor]:
    out = []
    for lo, hi, frac in pos:
        v = value[lo] if not frac else value[lo] + (value[hi] - value[lo]) * frac
        out.append(v.to(dtype).reshape(shape).contiguous())
    return out
