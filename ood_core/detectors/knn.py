"""Deep nearest neighbours (KNN) on penultimate features."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector, InvalidInputError
from .mahalanobis import check_features, id_training_set
from .numerics import mean64

#: upper bound on the elements of one (test chunk x train) distance block (16 MiB of float32: blocks
#: up to 32 MiB are reused by the allocator, larger ones are mapped anew each time)
CHUNK_ELEMENTS = 1 << 22
#: bfloat16 screening (CPUs with fast bfloat16 matmuls): for k <= SCREEN_MAX_K and banks of >= SCREEN_MIN_BANK rows
SCREEN_MAX_K = 16
SCREEN_MIN_BANK = 4096
#: candidates per query kept by the screen and re-ranked in float32: max(SCREEN_CANDIDATES, 4k + 24)
SCREEN_CANDIDATES = 32
#: upper bound on the elements of one (test chunk x train) bfloat16 screening block
SCREEN_CHUNK_ELEMENTS = 1 << 23
#: relative error of the k-th squared distance (rounding bound / distance^2) above which a query's
#: neighbours are re-ordered by direct differences (:meth:`KNN._resolved_kth`): near-duplicates
TIE_TOLERANCE = 1e-2
_U16, _U32 = 2.0**-8, 2.0**-24  # unit roundoffs of bfloat16 and float32


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are much faster than float32 ones here: a CPU with AMX tiles (Intel
    Sapphire Rapids and later) or AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake);
    measured on a Zen 4 core: 2.4x the float32 throughput."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except Exception:  # pragma: no cover - older torch
        return False


def matmul_error_bound(q: Tensor, max_norm: float) -> Tensor:
    r"""Bound (float64, per query) on the rounding error of the expanded squared distance
    ``|t|^2 - 2 q.t`` in the dtype of ``q`` (``|t| <= max_norm``): :math:`\gamma_{D+2}(T^2 + 2|q|T)`,
    :math:`\gamma_n = n u / (1 - n u)` (Higham), valid for any summation order."""
    nu = (q.shape[1] + 2) * torch.finfo(q.dtype).eps / 2
    qn = torch.linalg.vector_norm(q, dim=1, dtype=torch.float64)
    return nu / (1 - nu) * (max_norm * max_norm + 2 * qn * max_norm)


def screen_in_chunks(q: Tensor, bank_rows: int, out: Tensor, screen: Callable, exact: Callable) -> Tensor:
    """Fill ``out`` (one entry per query row of ``q``) from ``screen(rows) -> (values, certified)`` over chunks
    of at most ``SCREEN_CHUNK_ELEMENTS`` (query x bank) entries, then ``exact(rows)`` for the queries left
    uncertified. When under half of the first chunk is certified the screen does not separate these data,
    and the rest is searched exactly."""
    rows = max(1, SCREEN_CHUNK_ELEMENTS // bank_rows)
    certified = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    for start in range(0, q.shape[0], rows):
        sl = slice(start, start + rows)
        out[sl], certified[sl] = screen(q[sl])
        if start == 0 and q.shape[0] > rows and float(certified[sl].float().mean()) < 0.5:
            break
    retry = (~certified).nonzero().flatten()
    if retry.numel():
        out[retry] = exact(q[retry])
    return out


def _bf16_hi_lo(x: Tensor) -> Tensor:
    """``x`` (float32, ``(N,)``) as two bfloat16 columns whose sum is ``x`` to ~2^-16 relative."""
    hi = x.to(torch.bfloat16)
    return torch.stack([hi, (x - hi.float()).to(torch.bfloat16)], dim=1)


def screen_bank(bank: Tensor, bank_sq: Tensor) -> Tensor:
    """``[t, hi/lo(-|t|^2 / 2), 1, 1]`` in bfloat16, ``(N, D + 4)``: the bank side of :func:`screened_kth`."""
    ones = torch.ones(bank.shape[0], 2, dtype=torch.bfloat16, device=bank.device)
    return torch.cat([bank.to(torch.bfloat16), _bf16_hi_lo(-0.5 * bank_sq), ones], dim=1)


def screened_kth(q: Tensor, bank: Tensor, bank_sq: Tensor, aug_bank: Tensor, max_norm: float, k: int):
    """Squared distance of each query (float32 ``(R, D)``, centred like ``bank``) to its ``k``-th nearest
    bank row, through a bfloat16 screen with a certificate.

    One bfloat16 matmul gives ``v ~ -|q - t|^2 / 2`` for every bank row (the norms enter as extra
    hi/lo columns); the ``m`` largest are re-ranked in float32. The rounding of the screen is bounded
    rigorously: inputs ``(2u + u^2)|q||t|``, float32 accumulation, the split norms, and the output rounding
    (relative ``u``), with ``|t| <= max_norm``. A row is certified when every bank row outside its ``m``
    candidates is provably farther than the ``k``-th candidate; returns ``(kth index, certified)``.
    """
    r, d = q.shape
    m = min(max(SCREEN_CANDIDATES, 4 * k + 24), bank.shape[0])
    qn2 = (q * q).sum(dim=1)
    aug_q = torch.cat([q.to(torch.bfloat16), torch.ones(r, 2, dtype=torch.bfloat16, device=q.device),
                       _bf16_hi_lo(-0.5 * qn2)], dim=1)
    vals, idx = (aug_q @ aug_bank.T).topk(m, dim=1, sorted=False)  # largest v = nearest
    cand = bank.index_select(0, idx.reshape(-1)).reshape(r, m, d)
    ex = torch.baddbmm(bank_sq[idx][:, None, :], q[:, None, :], cand.transpose(1, 2), alpha=-2.0)[:, 0]
    kth_val, kth_pos = (ex.min(dim=1) if k == 1 else ex.kthvalue(k, dim=1))
    # certificate (float64): bank rows outside the candidates have v <= a (the m-th largest v)
    qn = qn2.double().sqrt() * (1 + d * _U32)  # upper bounds on |q| and |t| (float32 sums of squares)
    t = max_norm * (1 + d * _U32)
    a = vals.amin(dim=1).double()
    a = torch.where(a <= 0, a / (1 + _U16), a / (1 - _U16))
    err = ((2 * _U16 + _U16**2) * qn * t + _U16**2 * (t * t + qn * qn)
           + 1.02 * (d + 4) * _U32 * (qn * t + t * t + qn * qn) * (1 + _U16) ** 2)
    lower = -2.0 * a - 2.0 * 1.05 * err  # lower bound on |q - t|^2 outside the candidates
    upper = (qn2.double() + kth_val.double()) + 4.0 * (d + 2) * _U32 * (qn + t) ** 2  # >= the k-th candidate's
    return idx.gather(1, kth_pos[:, None])[:, 0], lower > upper


class KNN(FeaturesDetector):
    r"""Distance to the :math:`k`-th nearest ID training feature.

    .. math::
        s(x) = \lVert \hat z - \hat z_{(k)} \rVert_2, \qquad \hat z = z / \lVert z \rVert_2

    where :math:`\hat z_{(k)}` is the :math:`k`-th nearest of the (normalised) ID training
    features; with ``normalize=False`` the raw features are used (:math:`\hat z = z`).

    Exact search by chunked matmul: squared distances
    :math:`\lVert q\rVert^2 - 2 q^\top t + \lVert t\rVert^2` for blocks of at most
    ``CHUNK_ELEMENTS`` (test x train) entries, then ``topk``; both sides are centred on the
    training mean first (distances are translation invariant; this limits cancellation), and the
    distance to the selected :math:`k`-th neighbour is recomputed directly as a norm. Computation
    is in the input dtype. Memory stays bounded for any number of test samples; runs on the device
    of the input.

    On CPUs with fast bfloat16 matmuls (:func:`fast_bf16_matmul`), float32 inputs,
    ``k <= SCREEN_MAX_K`` and banks of at least ``SCREEN_MIN_BANK`` rows, a bfloat16 matmul first
    screens candidates, which are re-ranked in float32 (:func:`screened_kth`); a rigorous bound on
    the screen's rounding certifies per query that no other bank row can be closer, and uncertified
    queries take the exact path above, so the result is that of the exact search.

    Near-duplicates: where the rounding bound of the expanded form (:func:`matmul_error_bound`) exceeds
    ``TIE_TOLERANCE`` times the selected squared distance, the expanded form cannot order the
    neighbours (e.g. a query among training features closer to each other than float32 resolves at
    their norm); those queries are searched again, ordering by direct differences
    (:meth:`_resolved_kth`). Scores are thus accurate relative to the distance itself, and scoring one
    sample at a time gives the batch's scores.

    Paper: Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors",
    ICML 2022 (arXiv:2204.06507). pytorch-ood 0.4.0 computes the same quantity with
    scikit-learn's ``NearestNeighbors``.

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param k: neighbour rank, ``1 <= k <= N_train`` (checked in ``fit``)
    :param normalize: L2-normalise features before the search (the paper's choice)
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {"k": {"grid": [50, 100, 200, 500, 1000]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, k: int = 50, normalize: bool = True):
        super().__init__(model)
        if int(k) != k or int(k) < 1:
            raise ValueError(f"KNN: k must be a positive integer, got {k!r}")
        self.k = int(k)
        self.normalize = bool(normalize)
        self.bank: Optional[Tensor] = None  #: centred (normalised) training features, (N, D)
        self.bank_sq: Optional[Tensor] = None  #: squared norms of ``bank``, (N,)
        self.offset: Optional[Tensor] = None  #: training mean subtracted from both sides, (D,)
        self.max_norm: float = 0.0  #: upper bound on the norms of ``bank``'s rows
        self._screen: Optional[Tensor] = None  #: bfloat16 screening bank (:func:`screen_bank`), built on demand

    def _prepare(self, z: Tensor) -> Tensor:
        if self.normalize:
            z = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return z

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "KNN":
        z, _ = id_training_set(self, z, y)
        if self.k > z.shape[0]:
            raise InvalidInputError(
                f"KNN: k={self.k} exceeds the number of ID training samples ({z.shape[0]})"
            )
        z = self._prepare(z.detach())
        offset = mean64(z, exact=False).to(z.dtype)  # a translation: any centre near the mean works
        bank = (z - offset).contiguous()
        self.offset = offset
        self.bank = bank
        self.bank_sq = (bank * bank).sum(dim=1)
        self.max_norm = float(self.bank_sq.max().sqrt()) * (1 + bank.shape[1] * torch.finfo(bank.dtype).eps)
        self._screen = None
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.bank.shape[1])
        dtype, device = z.dtype, z.device
        bank = self.bank.to(device=device, dtype=dtype)
        bank_sq = self.bank_sq.to(device=device, dtype=dtype)
        q = self._prepare(z) - self.offset.to(device=device, dtype=dtype)
        k = min(self.k, bank.shape[0])
        if (dtype == torch.float32 and k <= SCREEN_MAX_K and bank.shape[0] >= SCREEN_MIN_BANK
                and fast_bf16_matmul(device)):
            kth = self._screened(q, bank, bank_sq, k)
        else:
            kth = self._exact_kth(q, bank, bank_sq, k)
        dist = (q - bank[kth]).norm(dim=1)  # the selected neighbour's distance, recomputed directly
        # near-ties the expanded form cannot order: search those queries again, by direct differences
        err = matmul_error_bound(q, self.max_norm)
        unsure = (2 * err > TIE_TOLERANCE * dist.double() ** 2).nonzero().flatten()
        if unsure.numel():
            kth[unsure] = self._resolved_kth(q[unsure], bank, bank_sq, k, err[unsure])
            dist[unsure] = (q[unsure] - bank[kth[unsure]]).norm(dim=1)
        return dist

    @staticmethod
    def _exact_kth(q: Tensor, bank: Tensor, bank_sq: Tensor, k: int) -> Tensor:
        """Index of the ``k``-th nearest bank row of each query, by chunked float32 matmul (``|t|^2 - 2 q.t``)."""
        rows = max(1, CHUNK_ELEMENTS // max(bank.shape[0], 1))
        out = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
        for start in range(0, q.shape[0], rows):
            d2 = torch.addmm(bank_sq, q[start : start + rows], bank.T, alpha=-2.0)
            if k == 1:
                out[start : start + rows] = d2.argmin(dim=1)
            else:  # the k-th smallest is the largest of the k smallest
                vals, idx = d2.topk(k, dim=1, largest=False, sorted=False)
                out[start : start + rows] = idx.gather(1, vals.argmax(dim=1, keepdim=True))[:, 0]
        return out

    @staticmethod
    def _resolved_kth(q: Tensor, bank: Tensor, bank_sq: Tensor, k: int, err: Tensor) -> Tensor:
        r"""Index of the ``k``-th nearest bank row of each query, ordered by direct squared differences
        :math:`\sum_j (q_j - t_j)^2` (accurate relative to the distance itself).

        Candidates are the rows whose expanded value is within ``2 err`` of the ``k``-th smallest one
        (``err``: :func:`matmul_error_bound`), a superset of the true ``k`` nearest; only they are
        compared directly, so a cluster of near-duplicates costs its size, not the bank's."""
        n = bank.shape[0]
        rows = max(1, CHUNK_ELEMENTS // max(n, 1))
        pairs = max(1, CHUNK_ELEMENTS // max(bank.shape[1], 1))
        out = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
        for start in range(0, q.shape[0], rows):
            qs = q[start : start + rows]
            d2 = torch.addmm(bank_sq, qs, bank.T, alpha=-2.0)
            limit = d2.kthvalue(k, dim=1).values.double() + 2 * err[start : start + rows]
            r, c = (d2.double() <= limit[:, None]).nonzero(as_tuple=True)
            direct = d2.new_full(d2.shape, float("inf"))
            for p in range(0, r.numel(), pairs):
                rp, cp = r[p : p + pairs], c[p : p + pairs]
                direct[rp, cp] = (qs[rp] - bank[cp]).square().sum(dim=1)
            vals, idx = direct.topk(k, dim=1, largest=False, sorted=False)
            out[start : start + rows] = idx.gather(1, vals.argmax(dim=1, keepdim=True))[:, 0]
        return out

    def _screened(self, q: Tensor, bank: Tensor, bank_sq: Tensor, k: int) -> Tensor:
        """:func:`screened_kth` in chunks; rows without a certificate are searched exactly."""
        if self._screen is None or self._screen.device != q.device:
            self._screen = screen_bank(bank, bank_sq)
        out = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
        return screen_in_chunks(q, bank.shape[0], out,
                                lambda rows: screened_kth(rows, bank, bank_sq, self._screen, self.max_norm, k),
                                lambda rows: self._exact_kth(rows, bank, bank_sq, k))
