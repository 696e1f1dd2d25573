"""Deep nearest neighbours (KNN) on penultimate features."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector, InvalidInputError
from .mahalanobis import check_features, id_training_set
from .numerics import mean64

#: upper bound on the elements of one (test chunk x train) distance block
CHUNK_ELEMENTS = 1 << 24


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
    is in the input dtype: with ``normalize=False`` and feature norms many orders of magnitude
    above the neighbour distances, float32 can misorder near neighbours (pass float64 then).
    Memory stays bounded for any number of test samples; runs on the device of the input.

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
        offset = mean64(z).to(z.dtype)
        bank = (z - offset).contiguous()
        self.offset = offset
        self.bank = bank
        self.bank_sq = (bank * bank).sum(dim=1)
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
        n_train = bank.shape[0]
        k = min(self.k, n_train)
        rows = max(1, CHUNK_ELEMENTS // max(n_train, 1))
        out = torch.empty(q.shape[0], dtype=dtype, device=device)
        for start in range(0, q.shape[0], rows):
            block = q[start : start + rows]
            d2 = (block * block).sum(dim=1, keepdim=True) - 2.0 * (block @ bank.T) + bank_sq
            kth = d2.topk(k, dim=1, largest=False, sorted=True).indices[:, -1]
            out[start : start + rows] = (block - bank[kth]).norm(dim=1)
        return out
