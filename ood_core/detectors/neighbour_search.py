r"""Exact nearest-neighbour search by chunked matmul: the engine of KNN and NNGuide.

Queries are compared with every bank row, in blocks of at most :data:`CHUNK_ELEMENTS` (query rows x bank
rows) entries, so memory stays bounded for any number of queries. Everything runs in the dtype and on the
device of the queries (CPU or CUDA): the caller moves the bank there.

* :func:`kth_nearest_distance`: Euclidean distance to the ``k``-th nearest bank row (KNN).
* :func:`top_k_mean_similarity`: mean of the ``k`` largest inner products with the bank (NNGuide).

Exactness of the distances. The squared distance is computed in the expanded form
:math:`\lVert t\rVert^2 - 2 q^\top t` (one matmul; :math:`\lVert q\rVert^2` is the same for every bank row
and does not change the order), on both sides centred on the bank's mean (distances are translation
invariant; smaller norms, smaller rounding). Its rounding error :math:`e(q)` (:func:`expanded_error_bound`)
is relative to the norms, not to the distance, so the selected neighbour's distance is recomputed directly
from the inputs as given, :math:`\lVert q - t\rVert` (the difference of two nearby floating-point numbers is
exact). Where :math:`2 e(q)` is not small against that squared distance (:data:`TIE_TOLERANCE`:
near-duplicates, closer to each other than the precision resolves at their norm), the expanded form cannot
order the neighbours; those queries are searched again: every bank row whose expanded value is within
:math:`2 e(q)` of the ``k``-th smallest (a superset of the true ``k`` nearest) is compared by direct
differences :math:`\sum_j (q_j - t_j)^2`. Scores are therefore accurate relative to the distance itself.
Another batch (other chunk shapes, other rounding) can only pick another neighbour whose squared distance
is within :math:`2 e(q)` of the true ``k``-th one; re-searched queries get the same score in any batch. (The
bound assumes matmuls in the queries' dtype: TF32 CUDA matmuls, ``torch.backends.cuda.matmul.allow_tf32``,
would void it.)
"""
from __future__ import annotations

import torch
from torch import Tensor

#: upper bound on the entries of one (query rows x bank rows) block (64 MiB of float32)
CHUNK_ELEMENTS = 1 << 24
#: re-search a query by direct differences when twice the expanded form's rounding bound exceeds this
#: fraction of its k-th squared distance
TIE_TOLERANCE = 1e-2


def _row_blocks(n_queries: int, n_bank: int):
    """Slices of the query rows so that a (rows x bank) block has at most :data:`CHUNK_ELEMENTS` entries."""
    rows = max(1, CHUNK_ELEMENTS // max(n_bank, 1))
    return [slice(start, start + rows) for start in range(0, n_queries, rows)]


def _kth_smallest(x: Tensor, k: int):
    """``(values, indices)`` of the ``k``-th smallest entry of each row (``topk``: ~5x faster than
    ``kthvalue`` on CPU)."""
    vals, idx = x.topk(k, dim=1, largest=False, sorted=False)
    pos = vals.argmax(dim=1, keepdim=True)
    return vals.gather(1, pos)[:, 0], idx.gather(1, pos)[:, 0]


def expanded_error_bound(queries: Tensor, max_bank_norm: float) -> Tensor:
    r"""Bound (float64, per query) on the rounding error of :math:`\lVert t\rVert^2 - 2 q^\top t` computed in
    the queries' dtype, for any bank row with :math:`\lVert t\rVert \le T`:
    :math:`\gamma_{D+2}\,(T^2 + 2\lVert q\rVert T)`, :math:`\gamma_n = nu/(1 - nu)` (Higham, Accuracy and
    Stability of Numerical Algorithms, 2002, sec. 3.1), valid for any summation order."""
    nu = (queries.shape[1] + 2) * torch.finfo(queries.dtype).eps / 2
    q_norm = torch.linalg.vector_norm(queries, dim=1, dtype=torch.float64)
    return nu / (1 - nu) * (max_bank_norm**2 + 2 * q_norm * max_bank_norm)


def kth_nearest_distance(queries: Tensor, bank: Tensor, k: int) -> Tensor:
    r"""Distance :math:`\lVert q - t_{(k)}\rVert` of each query ``(R, D)`` to its ``k``-th nearest bank row
    ``(N, D)``, ``1 <= k <= N``; ``(R,)`` in the queries' dtype."""
    centre = bank.mean(dim=0)
    q_c, bank_c = queries - centre, bank - centre
    bank_sq = (bank_c * bank_c).sum(dim=1)
    kth = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for rows in _row_blocks(queries.shape[0], bank.shape[0]):
        expanded = torch.addmm(bank_sq, q_c[rows], bank_c.T, alpha=-2.0)  # |t|^2 - 2 q.t
        kth[rows] = _kth_smallest(expanded, k)[1]
    dist = (queries - bank[kth]).norm(dim=1)
    err = expanded_error_bound(q_c, float(bank_sq.max().double().sqrt()))
    unsure = (2 * err > TIE_TOLERANCE * dist.double() ** 2).nonzero()[:, 0]
    for rows in _row_blocks(unsure.numel(), bank.shape[0]):  # near-duplicates: order by direct differences
        dist[unsure[rows]] = _kth_by_direct_differences(queries[unsure[rows]], q_c[unsure[rows]], bank,
                                                        bank_c, bank_sq, k, err[unsure[rows]])
    return dist


def _kth_by_direct_differences(queries: Tensor, q_c: Tensor, bank: Tensor, bank_c: Tensor, bank_sq: Tensor,
                               k: int, err: Tensor) -> Tensor:
    """``k``-th nearest distance of one block of queries, comparing by direct differences the bank rows whose
    expanded value is within ``2 err`` of the ``k``-th smallest: a cluster of near-duplicates costs its size,
    not the bank's. ``q_c``, ``bank_c``, ``bank_sq``: the centred sides of the expanded form."""
    expanded = torch.addmm(bank_sq, q_c, bank_c.T, alpha=-2.0)
    limit = _kth_smallest(expanded, k)[0].double() + 2 * err
    r, c = (expanded.double() <= limit[:, None]).nonzero(as_tuple=True)
    direct = torch.full_like(expanded, float("inf"))
    pairs = max(1, CHUNK_ELEMENTS // bank.shape[1])  # (query, candidate) pairs per block of differences
    for p in range(0, r.numel(), pairs):
        rp, cp = r[p : p + pairs], c[p : p + pairs]
        direct[rp, cp] = (queries[rp] - bank[cp]).square().sum(dim=1)
    return _kth_smallest(direct, k)[0].sqrt()


def top_k_mean_similarity(queries: Tensor, bank: Tensor, k: int) -> Tensor:
    r"""Mean of the ``k`` largest inner products :math:`q^\top b` of each query ``(R, D)`` over the bank rows
    ``(N, D)``, ``1 <= k <= N``; ``(R,)`` in the queries' dtype. (A mean of values: near-ties between bank rows
    change it by at most their difference, so no re-ranking is needed.)"""
    out = queries.new_empty(queries.shape[0])
    for rows in _row_blocks(queries.shape[0], bank.shape[0]):
        out[rows] = (queries[rows] @ bank.T).topk(k, dim=1, sorted=False).values.mean(dim=1)
    return out
