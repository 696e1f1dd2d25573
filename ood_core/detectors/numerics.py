"""Numerical building blocks shared by the detectors.

* :func:`sum64` / :func:`mean64`: column sums / means in float64 of float32 data, without a float64 copy
  of the whole matrix (cache-sized row blocks converted and summed in float64).
* :func:`scatter64`: the float64 scatter matrix :math:`\\sum_i (x_i - c)(x_i - c)^\\top`, computing only the
  lower-triangular panel blocks (the matrix is symmetric): about 0.6x the flops of a full ``x.T @ x``.
* :func:`lower_matmul_t`: ``x @ L.T`` for a lower-triangular ``L`` (whitening), skipping the zero blocks.
* :func:`percentiles` / :func:`percentiles_dim0`: ``numpy.percentile`` (linear interpolation) of all
  entries or per column, by partial selection (``numpy.partition`` on CPU, ``kthvalue`` elsewhere), several
  percentiles in one pass.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

#: rows per block of :func:`sum64`
BLOCK_ROWS = 1024
#: columns per panel of :func:`scatter64`
PANEL = 128


def sum64(x: Tensor) -> Tensor:
    """Column sums of ``x`` ``(N, D)`` as float64 ``(D,)``."""
    if x.dtype == torch.float64 or x.device.type != "cpu":
        return x.sum(dim=0, dtype=torch.float64)
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], BLOCK_ROWS):
        out += x[s : s + BLOCK_ROWS].to(torch.float64).sum(dim=0)
    return out


def mean64(x: Tensor) -> Tensor:
    """Column means of ``x`` ``(N, D)`` as float64 ``(D,)`` (``N >= 1``)."""
    return sum64(x) / x.shape[0]


def scatter64(x: Tensor, center: Optional[Tensor] = None) -> Tensor:
    """``sum_i (x_i - c)(x_i - c)^T`` in float64, ``(D, D)``, for ``x`` ``(N, D)`` (``c = 0`` if ``center`` is None).

    ``x`` is converted to float64 and centred in one pass; then only the panel blocks on and below the
    diagonal are multiplied (``PANEL`` columns each, about 0.6x the flops of ``x.T @ x`` for D = 512) and
    the upper triangle is mirrored.
    """
    if center is not None:
        x = torch.sub(x, center.to(device=x.device, dtype=torch.float64))
    elif x.dtype != torch.float64:
        x = x.to(torch.float64)
    d = x.shape[1]
    if d <= 2 * PANEL:
        return x.T @ x
    out = torch.empty(d, d, dtype=torch.float64, device=x.device)
    for a in range(0, d, PANEL):
        b = min(a + PANEL, d)
        out[a:b, :b] = x[:, a:b].T @ x[:, :b]  # rows a:b of the lower triangle
    return torch.tril(out) + torch.tril(out, -1).T


def lower_matmul_t(x: Tensor, low: Tensor) -> Tensor:
    """``x @ low.T`` for a lower-triangular ``low`` ``(D, D)``: output panel ``a:b`` only needs ``x[:, :b]``
    (``PANEL``-column panels; about 0.6x the flops of the full product for D = 512)."""
    d = low.shape[0]
    if d <= 2 * PANEL:
        return x @ low.T
    out = torch.empty(x.shape[0], d, dtype=torch.promote_types(x.dtype, low.dtype), device=x.device)
    for a in range(0, d, PANEL):
        b = min(a + PANEL, d)
        out[:, a:b] = x[:, :b] @ low[a:b, :b].T
    return out


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
    if flat.device.type == "cpu":
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
    if flat.device.type == "cpu":
        part = torch.from_numpy(np.partition(flat.T.contiguous().numpy(), kth, axis=1))
        value = {k: part[:, k] for k in kth}
    else:
        value = {k: flat.kthvalue(k + 1, dim=0).values for k in kth}
    out = []
    for lo, hi, frac in pos:
        v = value[lo] if not frac else value[lo] + (value[hi] - value[lo]) * frac
        out.append(v.to(x.dtype).reshape(x.shape[1:]).contiguous())
    return out
