r"""Nearest-neighbour search over a memory bank: the engine of KNN and NNGuide.

Three parts, each usable on its own:

* **The bank** (:func:`bank_size`, :func:`draw_bank_rows`, :func:`gather_rows`): a seeded, uniformly random
  subset of :math:`\lceil \alpha N \rceil` of the :math:`N` ID training rows (all of them, in row order, at
  :math:`\alpha = 1`), whose indices are drawn up front from :math:`N`, so that it is collected in one pass over
  row chunks (:class:`ood_core.rows.RowSource`) into one preallocated tensor: the training set is never held
  whole, only the bank.
* **Exact search** (the default), by chunked matmul, described below:
  :func:`kth_nearest_distance` (KNN) and :func:`top_k_mean_similarity` (NNGuide).
* **Approximate search** (an option): :class:`IVFIndex`, a faiss inverted-file index (``IndexIVFFlat``: the bank
  clustered into ``nlist`` cells by k-means, a query compared with the rows of its ``nprobe`` nearest cells
  only), :func:`ivf_kth_nearest_distance` and :func:`ivf_top_k_mean_similarity`, and :func:`recall_at_k`, which
  measures how many of the exact ``k`` nearest rows the index finds. faiss is an optional dependency
  (``pip install faiss-cpu``; :func:`import_faiss` names the extra when it is missing). IVF gives no accuracy
  guarantee: its recall is measured, not bounded.

Exact search. Queries are compared with every bank row, in blocks of at most :data:`CHUNK_ELEMENTS` (query rows x
bank rows) entries, so memory stays bounded for any number of queries. Everything runs in the dtype and on the
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

import math
from fractions import Fraction
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from ..errors import UserCausedError

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


# -- the bank: a seeded subset of the training rows, gathered from a stream of chunks -----------------------
def bank_size(n: int, alpha: float) -> int:
    r""":math:`\lceil \alpha N \rceil` rows of ``n``, at least 1, at most ``n``. ``alpha`` is taken at its decimal
    value (``0.07 * 100`` is 7 here, not the 7.000000000000001 of binary floating point, whose ceiling is 8)."""
    return min(n, max(1, math.ceil(Fraction(repr(float(alpha))) * n)))


def draw_bank_rows(n: int, alpha: float, seed: int) -> Tensor:
    r"""Sorted int64 indices of the bank's rows among ``n`` training rows: a uniformly random subset of
    :func:`bank_size` rows, without replacement (the first :math:`\lceil\alpha N\rceil` of a permutation of
    ``range(n)`` drawn by ``torch.randperm`` from a generator seeded with ``seed``: the same rows for the same
    ``n``, ``alpha``, ``seed``); ``alpha = 1``: all rows, in order (no draw)."""
    m = bank_size(n, alpha)
    if m == n:
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:m].sort().values


def gather_rows(chunks: Iterable[Tuple[Tensor, Tensor]],
                selections: Dict[str, Tuple[Tensor, Optional[Callable[[Tensor], Tensor]]]]) -> Dict[str, Tensor]:
    """Rows picked from a stream of ``(x, y)`` chunks in one pass: ``selections`` maps a name to ``(rows,
    transform)``, ``rows`` sorted int64 indices into the stream's rows (counted across chunks), ``transform`` a
    row-wise function applied to the picked rows of each chunk (``None``: as they are). Returns ``name ->
    (len(rows), ...)`` tensors, preallocated at the first chunk in its dtype and device and filled chunk by
    chunk: the memory is the selections plus one chunk. A row index beyond the stream's end is an error."""
    out: Dict[str, Tensor] = {}
    offset = 0
    for x, _ in chunks:
        n = x.shape[0]
        for name, (rows, transform) in selections.items():
            lo, hi = (int(i) for i in torch.searchsorted(rows, torch.tensor([offset, offset + n])))
            if hi == lo:
                if name not in out and rows.numel() == 0:
                    out[name] = x.new_empty((0, *x.shape[1:]))
                continue
            picked = x if hi - lo == n else x.index_select(0, (rows[lo:hi] - offset).to(x.device))
            picked = transform(picked) if transform is not None else picked
            if name not in out:
                out[name] = picked.new_empty((rows.numel(), *picked.shape[1:]))
            out[name][lo:hi] = picked
        offset += n
    for name, (rows, _) in selections.items():
        if rows.numel() and int(rows[-1]) >= offset:
            raise ValueError(f"gather_rows: row {int(rows[-1])} asked for, the stream has {offset} rows")
    return out


# -- approximate search: an IVF index (faiss), and its recall against exact search -------------------------
class MissingExtraError(UserCausedError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


#: how to install the optional dependency of the IVF index
INSTALL_FAISS = "pip install 'ood-sweep[faiss]' (or pip install faiss-cpu)"


def import_faiss(who: str = "index='ivf'"):
    """The ``faiss`` module, or :class:`MissingExtraError` naming the extra (``ood-sweep[faiss]``)."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise MissingExtraError(f"{who} needs faiss, which is not installed: {INSTALL_FAISS}") from None
    return faiss


def default_nlist(n_bank: int) -> int:
    r"""Cells of an IVF index over ``n_bank`` rows when ``nlist`` is not given: :math:`\mathrm{round}(\sqrt{n})`,
    at most :math:`\lfloor n / 39 \rfloor` (faiss's k-means wants 39 training rows per centroid), at least 1."""
    return max(1, min(round(math.sqrt(n_bank)), n_bank // 39))


def _faiss_input(x: Tensor):
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class IVFIndex:
    r"""An inverted-file index over a bank (faiss ``IndexIVFFlat``, on the CPU): the rows are clustered into
    ``nlist`` cells (k-means, seeded); a search compares a query with the rows of its ``nprobe`` nearest cells
    only, exactly (flat, no compression), in float32. With ``nprobe = nlist`` it compares with every row.

    ``metric``: ``"l2"`` (nearest = smallest Euclidean distance; KNN) or ``"ip"`` (nearest = largest inner
    product; NNGuide). The index holds its own float32 copy of the bank (faiss's inverted lists).

    Reference: Jégou, Douze & Schmid, "Product Quantization for Nearest Neighbor Search", TPAMI 2011 (the IVF
    structure); Douze et al., "The Faiss library", arXiv:2401.08281; code github.com/facebookresearch/faiss.
    """

    def __init__(self, bank: Tensor, metric: str = "l2", nlist: Optional[int] = None, seed: int = 0):
        faiss = import_faiss()
        if metric not in ("l2", "ip"):
            raise ValueError(f"IVFIndex: metric must be 'l2' or 'ip', got {metric!r}")
        n, d = bank.shape
        self.metric, self.nlist = metric, int(nlist or default_nlist(n))
        if not 1 <= self.nlist <= n:
            raise ValueError(f"IVFIndex: nlist={self.nlist} must be in [1, {n}] (the bank's rows)")
        x = _faiss_input(bank)
        self._quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.index = faiss.IndexIVFFlat(self._quantizer, d, self.nlist, kind)
        self.index.cp.seed = int(seed)
        self.index.train(x)
        self.index.add(x)

    def search(self, queries: Tensor, k: int, nprobe: int) -> Tuple[Tensor, Tensor]:
        """``(values, ids)``, each ``(R, k)`` on the CPU, nearest first: squared distances (``"l2"``) or inner
        products (``"ip"``) in float32, and int64 bank rows; ``-1`` where the probed cells hold fewer than ``k``
        rows. ``nprobe`` is clamped to ``[1, nlist]``; queries go in blocks of bounded output."""
        faiss = import_faiss()
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(int(nprobe), self.nlist))
        values, ids = [], []
        step = max(1, CHUNK_ELEMENTS // (4 * k))
        for start in range(0, queries.shape[0], step):
            v, i = self.index.search(_faiss_input(queries[start : start + step]), k, params=params)
            values.append(torch.from_numpy(v))
            ids.append(torch.from_numpy(i))
        if not values:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        return torch.cat(values), torch.cat(ids)

    def __getstate__(self):  # faiss indexes pickle as bytes (older faiss versions cannot pickle them)
        state = dict(self.__dict__)
        state["index"] = import_faiss().serialize_index(self.index)
        state.pop("_quantizer")
        return state

    def __setstate__(self, state):
        state = dict(state)
        state["index"] = import_faiss().deserialize_index(state["index"])
        self.__dict__.update(state)


def ivf_kth_nearest_distance(index: IVFIndex, queries: Tensor, bank: Tensor, k: int, nprobe: int) -> Tensor:
    r""":func:`kth_nearest_distance` through an ``"l2"`` :class:`IVFIndex` over ``bank``: the ``k``-th nearest row
    the index finds, its distance recomputed directly, :math:`\lVert q - t\rVert`, in the queries' dtype and on
    their device. The ``k``-th nearest of a subset of the bank is never nearer than the exact ``k``-th: a missed
    neighbour can only raise the score. Queries whose probed cells hold fewer than ``k`` rows are searched
    exactly."""
    _, ids = index.search(queries, k, nprobe)
    kth = ids[:, k - 1].to(queries.device)
    dist = (queries - bank[kth.clamp(min=0)]).norm(dim=1)
    missing = (kth < 0).nonzero()[:, 0]
    if missing.numel():
        dist[missing] = kth_nearest_distance(queries[missing], bank, k)
    return dist


def ivf_top_k_mean_similarity(index: IVFIndex, queries: Tensor, bank: Tensor, k: int, nprobe: int) -> Tensor:
    """:func:`top_k_mean_similarity` through an ``"ip"`` :class:`IVFIndex` over ``bank``: the mean of the ``k``
    largest inner products the index finds (faiss's float32 values), in the queries' dtype and on their device.
    Queries whose probed cells hold fewer than ``k`` rows are searched exactly."""
    values, ids = index.search(queries, k, nprobe)
    out = values.mean(dim=1).to(device=queries.device, dtype=queries.dtype)
    missing = (ids[:, k - 1] < 0).nonzero()[:, 0].to(queries.device)
    if missing.numel():
        out[missing] = top_k_mean_similarity(queries[missing], bank, k)
    return out


def _without(ids: Tensor, exclude: Tensor, k: int) -> Tensor:
    """The first ``k`` entries of each row of ``ids`` other than ``exclude[row]`` (order kept)."""
    other = ids != exclude[:, None]
    order = (~other).to(torch.int8).argsort(dim=1, stable=True)[:, :k]
    return ids.gather(1, order)


def recall_at_k(index: IVFIndex, bank: Tensor, queries: Tensor, k: int, nprobe: int,
                exclude: Optional[Tensor] = None) -> float:
    r"""Recall@k of ``index``'s search against the exact search of ``bank``, over ``queries``: the fraction of
    the ``k`` rows the index returns per query that are among the exact ``k`` nearest,

    .. math:: \mathrm{recall@}k = \frac{1}{Rk} \sum_{q} \bigl|\{\, t \in \mathcal A_k(q) :
              s(q, t) \ge s_{(k)}(q) \,\}\bigr|

    where :math:`\mathcal A_k(q)` are the rows the index returns (a missing result, ``-1``, is a miss),
    :math:`s` the similarity of the index's metric (``"l2"``: :math:`2q^\top t - \lVert t\rVert^2`, the order of
    :math:`-\lVert q - t\rVert^2`; ``"ip"``: :math:`q^\top t`) and :math:`s_{(k)}(q)` its ``k``-th largest value over
    the whole bank. Both are entries of the same matrix, computed by brute force in blocks of bounded memory in
    the bank's dtype and on its device (the exact search's cost for these queries; ``"l2"``: both sides centred on
    the bank's mean, as in :func:`kth_nearest_distance`), so a returned row counts as
    found exactly when that matrix puts it at least as near as the ``k``-th: rows tied with the ``k``-th count as
    found (with distinct distances, the usual :math:`|\mathcal A_k \cap \mathcal E_k| / k`); rows within the
    rounding of the bank's dtype of the ``k``-th (:math:`\sim 10^{-6}` relative in float32) may count either way.

    ``exclude``: ``(R,)`` bank rows to leave out, one per query (the query's own row when the queries are bank
    rows, "held out"): the index is asked for ``k + 1`` rows and the excluded one dropped, and the exact ``k``
    nearest are taken without it.
    """
    r, m = queries.shape[0], bank.shape[0]
    if r == 0:
        return float("nan")
    extra = 0 if exclude is None else 1
    _, found = index.search(queries, min(k + extra, m), nprobe)
    if exclude is not None:
        exclude = exclude.to("cpu", torch.long)
        found = _without(found, exclude, k)
    dev, dtype = bank.device, bank.dtype
    q_all, found = queries.detach().to(device=dev, dtype=dtype), found.to(dev)
    centre = bank.detach().mean(dim=0) if index.metric == "l2" else None  # l2: both sides centred (rounding)
    if centre is not None:
        q_all = q_all - centre
    exclude = None if exclude is None else exclude.to(dev)
    rows = max(1, min(r, 256))
    cols = max(1, CHUNK_ELEMENTS // rows)
    hits = 0
    for r0 in range(0, r, rows):
        q, f = q_all[r0 : r0 + rows], found[r0 : r0 + rows]
        best = torch.full((q.shape[0], k), -math.inf, dtype=dtype, device=dev)
        val = torch.full(f.shape, -math.inf, dtype=dtype, device=dev)
        for c0 in range(0, m, cols):
            b = bank[c0 : c0 + cols].detach()
            b = b - centre if centre is not None else b
            s = torch.addmm((b * b).sum(dim=1), q, b.T, beta=-1.0, alpha=2.0) if index.metric == "l2" else q @ b.T
            if exclude is not None:
                own = exclude[r0 : r0 + rows] - c0
                inside = ((own >= 0) & (own < b.shape[0])).nonzero()[:, 0]
                s[inside, own[inside]] = -math.inf
            best = torch.cat([best, s.topk(min(k, s.shape[1]), dim=1).values], dim=1).topk(k, dim=1).values
            here = (f >= c0) & (f < c0 + b.shape[0])
            val = torch.where(here, s.gather(1, (f - c0).clamp(0, b.shape[0] - 1)), val)
        hits += int(((val >= best[:, k - 1 : k]) & (f >= 0)).sum())
    return hits / (r * k)
