"""Numerical building blocks shared by the detectors.

* :func:`sum64` / :func:`mean64`: column sums / means as float64 of float32 data without a float64 copy of
  the whole matrix: ``exact=True`` converts cache-sized row blocks to float64; ``exact=False`` sums row
  blocks in their dtype (torch's cascade summation, ~1e-7 relative) and adds the block sums in float64,
  ~3x faster, for centring where nothing downstream depends on the last bits.
* :func:`scatter`: the scatter matrix :math:`\\sum_i (x_i - c)(x_i - c)^\\top` as float64, from cache-sized
  row blocks (no copy of the data: large temporaries cost page faults), computing only the
  lower-triangular panel blocks (the matrix is symmetric): about 0.6x the flops of ``x.T @ x``. In float64
  (:func:`scatter64`, for covariances that get inverted) or in float32: products summed in float32 within
  a block, blocks summed in float64, about a point near the mean (the "shifted data" algorithm) then
  moved to ``c`` exactly in float64.
* :func:`row_slices`: row chunks for predictions whose temporaries would otherwise be large;
  :func:`centred_norms` uses them.
* :func:`ridge_whitener`: ``L^{-1}`` of a covariance plus a relative ridge (Cholesky, eigenvalue clip fallback).
* :func:`one_thread`: small dense factorisations (``eigh``, Cholesky of a D x D matrix) on one CPU thread.
  LAPACK's threaded ``eigh`` of a 512 x 512 matrix took 0.3-2.6 s with 2 threads on 2 busy cores against
  0.03-0.1 s on one thread (this machine, load 4-7): threads waiting on each other dominate at this size.
* :func:`lower_matmul_t`: ``x @ L.T`` for a lower-triangular ``L`` (whitening), skipping the zero blocks.
* :func:`percentiles` / :func:`percentiles_dim0`: ``numpy.percentile`` (linear interpolation) of all
  entries or per column, by partial selection (``numpy.partition`` on CPU, ``kthvalue`` elsewhere), several
  percentiles in one pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

#: rows per block of :func:`sum64` (``exact=True``; 8x that otherwise)
BLOCK_ROWS = 1024
#: rows per float64 block of :func:`float64_blocks` (2048 x 512 float64 = 8 MiB)
SCATTER_ROWS = 2048
#: bytes per row block of the chunked predictions (:func:`row_slices`)
BLOCK_BYTES = 8 << 20
#: columns per panel of :func:`add_scatter_` and :func:`lower_matmul_t`
PANEL = 128


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


def centred_norms(z: Tensor, center: Tensor) -> Tensor:
    """``|z_i - c|`` ``(N,)`` in the dtype of ``z``, by row chunks (no full-size temporary)."""
    c = center.to(device=z.device, dtype=z.dtype)
    out = z.new_empty(z.shape[0])
    for rows in row_slices(z):
        torch.linalg.vector_norm(z[rows] - c, dim=1, out=out[rows])
    return out


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


def add_scatter_(out: Tensor, x: Tensor, beta: float = 1.0) -> Tensor:
    """``out = beta * out + x.T @ x`` on and below the diagonal only (``PANEL``-column panels; about 0.6x
    the flops of the full product for D = 512); :func:`mirror_lower` completes the matrix."""
    d = x.shape[1]
    for a in range(0, d, PANEL):
        b = min(a + PANEL, d)
        out[a:b, :b].addmm_(x[:, a:b].T, x[:, :b], beta=beta)  # rows a:b of the lower triangle
    return out


def mirror_lower(out: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is that of ``out``."""
    return torch.tril(out) + torch.tril(out, -1).T


def scatter(x: Tensor, center: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""``sum_i (x_i - c)(x_i - c)^T`` as float64 ``(D, D)`` for ``x`` ``(N, D)`` (``c = 0`` if ``center`` is
    None), with products in ``dtype`` (default: that of ``x``, float32 at least).

    * float64: :func:`float64_blocks` of ``x - c`` and :func:`add_scatter_`, all in float64.
    * float32: ``SCATTER_ROWS``-row blocks of ``x - p`` in float32, ``p`` the float32-rounded mean of
      the first block (any point near the data's centre serves), multiplied in float32 and summed in
      float64; then the exact move from ``p`` to ``c``,
      :math:`S_c = S_p + s\,\delta^\top + \delta\, s^\top + N \delta\delta^\top` with
      :math:`\delta = p - c`, :math:`s = \sum_i (x_i - p)`, in float64. Centring near the mean keeps
      the float32 partial sums at the spread of the data instead of its offset (the relative error is
      about that of one float32 dot product over a block, ~1e-7 to 1e-6, not of a sum over all of N).
    """
    dtype = dtype or (x.dtype if x.dtype == torch.float64 else torch.float32)
    n, d = x.shape
    out = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    if dtype == torch.float64:
        for _, blk in float64_blocks(x, center):
            add_scatter_(out, blk)
        return mirror_lower(out)
    pivot = mean64(x[:SCATTER_ROWS], exact=False).to(dtype)  # a centre: the first block's mean serves
    total = torch.zeros(d, dtype=torch.float64, device=x.device)  # s = sum_i (x_i - p)
    acc = torch.zeros(d, d, dtype=dtype, device=x.device)  # one block's lower panels (upper stays 0)
    buf = torch.empty(min(SCATTER_ROWS, n), d, dtype=dtype, device=x.device)
    for s in range(0, n, SCATTER_ROWS):
        blk = x[s : s + SCATTER_ROWS]
        xc = buf[: blk.shape[0]]
        torch.sub(blk, pivot, out=xc)
        total += xc.sum(dim=0).to(torch.float64)
        out += add_scatter_(acc, xc, beta=0.0)
    out = mirror_lower(out)
    delta = pivot.to(torch.float64) - (0.0 if center is None else center.to(device=x.device, dtype=torch.float64))
    cross = torch.outer(total, delta)
    return out.add_(cross + cross.T).add_(torch.outer(delta, delta), alpha=n)  # stays exactly symmetric


def scatter64(x: Tensor, center: Optional[Tensor] = None) -> Tensor:
    """``sum_i (x_i - c)(x_i - c)^T`` in float64 throughout, ``(D, D)``: :func:`scatter` in float64."""
    return scatter(x, center, torch.float64)


def lower_matmul_t(x: Tensor, low: Tensor) -> Tensor:
    """``x @ low.T`` for a lower-triangular ``low`` ``(D, D)``: output panel ``a:b`` only needs ``x[:, :b]``
    (``PANEL``-column panels; about 0.6x the flops of the full product for D = 512)."""
    d = low.shape[0]
    if d <= 2 * PANEL:
        return x @ low.T
    out = torch.empty(x.shape[0], d, dtype=x.dtype, device=x.device)
    for a in range(0, d, PANEL):
        b = min(a + PANEL, d)
        out[:, a:b].addmm_(x[:, :b], low[a:b, :b].T, beta=0)  # written in place (beta=0 ignores out)
    return out


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


def ridge_whitener(cov: Tensor, rel_ridge: float, trace_floor: float) -> Tuple[Tensor, float, float]:
    """``(L^{-1}, ridge, log det)`` of ``cov + ridge I`` with ``ridge = rel_ridge * max(tr, floor) / D`` (float64)."""
    d = cov.shape[0]
    cov = 0.5 * (cov + cov.T)
    trace = max(float(torch.diagonal(cov).sum()), trace_floor)
    ridge = rel_ridge * (trace / d if trace > 0 else 1.0)
    cov.diagonal().add_(ridge)
    with one_thread(cov):
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:  # numerically indefinite despite the ridge: clip eigenvalues
            evals, evecs = torch.linalg.eigh(cov)
            chol = torch.linalg.cholesky((evecs * evals.clamp(min=ridge)) @ evecs.T)
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        whitener = torch.linalg.solve_triangular(chol, eye, upper=False)
    return whitener, ridge, float(2.0 * torch.diagonal(chol).log().sum())


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
    return [value[lo] + (value[hi] - value[lo]) * frac if frac else value[lo] for lo, hi, frac in pos]


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
    out = []
    for lo, hi, frac in pos:
        v = value[lo] if not frac else value[lo] + (value[hi] - value[lo]) * frac
        out.append(v.to(x.dtype).reshape(x.shape[1:]).contiguous())
    return out
