r"""CF-OOD: the concentration-free outlier factor (CFOF) of a sample against an ID reference set."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Interval, Param, ParameterError
from .numerics import row_slices
from .pnml import unit_rows

#: bytes of the (rows x reference) temporaries of one block
_BLOCK_BYTES = 64 << 20


def kappa_grid(n: int):
    """The official code's grid of neighbourhood fractions for a reference set of ``n`` points: ``kval``
    (100 values in [0.001, 0.1], 81 in [0.105, 0.5], 49 in [0.51, 0.99]) and their neighbour ranks
    ``kpos = int(kval n - 1)``, keeping the first of each run of equal ranks."""
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    return kval[keep], kpos[keep]


def _sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``(len(a), len(b))``, ``|a|^2 + |b|^2 - 2 a.b`` clamped at 0 (rows of unit norm,
    or zero for a zero feature vector; float64: the cancellation for close points stays far below float32's
    resolution of the official differences)."""
    return (a.square().sum(dim=1)[:, None] + b.square().sum(dim=1)[None, :] - 2.0 * (a @ b.T)).clamp_min(0)


class CFOOD(FeaturesDetector):
    r"""CF-OOD: the smallest neighbourhood fraction :math:`\kappa` for which a sample is among the
    :math:`\kappa n`-nearest neighbours of at least a fraction :math:`\varrho` of the ID reference points.

    Fit: ID-train features scaled to unit norm; the reference set :math:`R` = a random fraction ``alpha`` of them
    (:math:`n = \lfloor \alpha N \rfloor` rows, seeded by ``seed``; all :math:`N` for ``alpha = 1``). For each
    :math:`r \in R` and each fraction :math:`\kappa_j` of the official grid (:func:`kappa_grid`), the squared distance
    :math:`\rho_j(r)` to its :math:`(\lfloor \kappa_j n - 1 \rfloor + 1)`-th nearest other reference point. Score of
    a unit feature vector :math:`v` (the CFOF score; higher = more OOD):

    .. math::
        c_j(v) = \frac1n \big|\{ r \in R : \lVert v - r \rVert^2 \le \rho_j(r) \}\big|, \qquad
        s(x) = \kappa_{j^*},\ \ j^* = \min\{ j : c_j(v) \ge \varrho \} \quad (1 \text{ if there is none})

    :math:`c_j` is the fraction of reference points that count :math:`v` among their :math:`\kappa_j n` nearest
    neighbours (its reverse neighbourhood). Scoring is vectorised: as :math:`\rho_j(r)` grows with :math:`j`, the
    first :math:`j` at which :math:`r` counts :math:`v` is a binary search in :math:`\rho(r)`, and :math:`c_j` a
    cumulative count of those first indices (memory :math:`O(n)` per scored row, in blocks). The comparison
    :math:`c_j \ge \varrho` is made in float32, as in the official code.

    Official code: OpenOOD's ``openood/postprocessors/cfood_postprocessor.py`` (Angiulli, Fassetti & Zupi; added
    in November 2025), whose ``k`` is :math:`\varrho` here (``k=`` is accepted). Differences: the subsample is
    seeded (OpenOOD's is not); distances are :math:`|v|^2 + |r|^2 - 2 v^\top r` (OpenOOD sums squared
    differences in float32; here float64), which can move a tie at the :math:`\le` by a rounding. Memory: the
    reference set in float64, :math:`n D` values, and :math:`n K` radii (:math:`K \le 230`). Default search space:
    OpenOOD's grid (``configs/postprocessors/cfood.yml``) ``alpha`` in {0.1, 0.5, 1} x ``rho`` in
    {0.001, 0.005, 0.01, 0.05}.
    Fitting costs :math:`O(n^2 \log n)` (a sort of each reference point's distances), so ``alpha`` bounds it.

    Paper: Angiulli, Fassetti & Zupi, "CF-OOD: Concentration-Free Density Estimation for Reliable
    Out-of-Distribution Detection" (2026, https://iris.unical.it/handle/20.500.11770/399817), on the CFOF score of
    Angiulli, "CFOF: A Concentration Free Measure for Anomaly Detection", ACM TKDD 2020 (arXiv:1901.04992).

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param alpha: fraction of the ID-train rows kept as the reference set
    :param rho: fraction of reverse neighbours required (OpenOOD's ``k``)
    :param seed: seed of the reference subsample
    """

    requires_fit: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "alpha": Param(Interval(float, 0, 1, closed="right"), doc="fraction of ID-train rows in the reference set"),
        "rho": Param(Interval(float, 0, 1, closed="right"), structural=False,
                     doc="fraction of reference points that must count the sample as a neighbour"),
        "seed": Param(Interval(int, 0, None), doc="seed of the reference subsample"),
    }
    aliases: ClassVar[Dict[str, str]] = {**FeaturesDetector.aliases, "k": "rho"}
    default_search_space: ClassVar[Dict[str, Any]] = {"alpha": {"grid": [0.1, 0.5, 1.0]},
                                                      "rho": {"grid": [0.001, 0.005, 0.01, 0.05]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, alpha: float = 0.1, rho: float = 0.01,
                 seed: int = 0):
        super().__init__(model)
        self.alpha = alpha
        self.rho = rho
        self.seed = seed

    def _fit(self, z: Tensor, y: Tensor) -> None:
        big_n = z.shape[0]
        n = int(self.alpha * big_n) if self.alpha < 1 else big_n
        if n < 2:
            raise ParameterError(type(self).__name__, "alpha", f"{self.alpha!r} keeps {n} of the {big_n} ID training "
                                 "rows; the reference set needs at least 2 (raise alpha)")
        if n < big_n:
            g = torch.Generator().manual_seed(int(self.seed))
            z = z[torch.randperm(big_n, generator=g)[:n].to(z.device)]
        ref = unit_rows(z.double())
        kval, kpos = kappa_grid(n)
        positions = torch.as_tensor(kpos + 1, device=z.device)  # +1 skips the point itself
        radii = []
        for s in row_slices(ref, width=2 * n, block_bytes=_BLOCK_BYTES):
            dist = _sq_distances(ref[s], ref)
            dist[torch.arange(dist.shape[0], device=z.device), torch.arange(n, device=z.device)[s]] = 0.0
            radii.append(dist.sort(dim=1).values[:, positions])
        self.reference = ref  #: (n, D) unit rows, float64
        self.radii = torch.cat(radii)  #: rho_j(r), (n, K) float64, non-decreasing in j
        self.kappas = torch.as_tensor(kval, dtype=torch.float64, device=z.device)  #: (K,)

    def _cfof(self, v: Tensor) -> Tensor:
        n, k = self.radii.shape
        dist = _sq_distances(v, self.reference.to(v.device))  # (B, n)
        # first j with radii[r, j] >= dist[., r], per reference point r: (n, B) in [0, K]
        first = torch.searchsorted(self.radii.to(v.device), dist.T.contiguous(), right=False)
        counts = torch.zeros(v.shape[0], k + 1, dtype=torch.long, device=v.device)
        counts.scatter_add_(1, first.T, torch.ones_like(first.T))
        share = counts[:, :k].cumsum(dim=1).float() / float(n)
        reached = share >= torch.tensor(self.rho, dtype=torch.float32)
        j = reached.float().argmax(dim=1)
        kappa = self.kappas.to(v.device)[j]
        return torch.where(reached.any(dim=1), kappa, torch.ones_like(kappa))

    def _score(self, z: Tensor) -> Tensor:
        v = unit_rows(z.double())
        n = self.reference.shape[0]
        out = [self._cfof(v[s]) for s in row_slices(v, width=4 * n, block_bytes=_BLOCK_BYTES)]
        return torch.cat(out).to(z.dtype) if out else v.new_zeros(0, dtype=z.dtype)
