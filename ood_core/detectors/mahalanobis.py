"""Mahalanobis distance to class-conditional Gaussians with a shared covariance."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Param
from ..streaming import Chunks, ClassMoments, moments_about_mean
from .numerics import by_row_blocks, cholesky_whitener

#: relative ridge: ``RIDGE * tr(Sigma) / D`` is added to the diagonal of a covariance before inversion
RIDGE = 1e-6


def relative_ridge(cov: Tensor, floor: float = 0.0) -> float:
    """The ridge added to ``cov`` before it is inverted: ``RIDGE * tr(cov) / D``; where that is not positive
    (every row on its class mean), ``floor``, else ``RIDGE`` itself."""
    ridge = RIDGE * float(torch.diagonal(cov).sum()) / cov.shape[0]
    return ridge if ridge > 0 else (floor if floor > 0 else RIDGE)


def closest_sq_distance(w: Tensor, means: Tensor) -> Tensor:
    """``min_c |w - m_c|^2`` for whitened ``w`` ``(N, D)`` and means ``(C, D)``: the expanded form picks the
    class, the distance to it is recomputed directly (no cancellation)."""
    d2 = torch.addmm((means * means).sum(dim=1), w, means.T, alpha=-2.0)  # |w - m_c|^2 - |w|^2: same argmin
    diff = w - means[d2.argmin(dim=1)]
    return (diff * diff).sum(dim=1)


class Mahalanobis(FeaturesDetector):
    r"""Minimum squared Mahalanobis distance to the class means, with a shared covariance.

    Fit on ID training features :math:`z_i` with labels :math:`y_i` (float64):

    .. math::
        \mu_c = \operatorname{mean}_{i: y_i = c} z_i, \qquad
        \Sigma = \frac{1}{N} \sum_i (z_i - \mu_{y_i})(z_i - \mu_{y_i})^\top + \lambda I, \qquad
        \lambda = 10^{-6} \operatorname{tr}(\Sigma_0) / D

    Score:

    .. math:: s(x) = \min_c\, (z - \mu_c)^\top \Sigma^{-1} (z - \mu_c)

    The ridge :math:`\lambda` is relative to the average within-class variance, so that rank-deficient or
    constant features and :math:`D > N` stay invertible (the trace is floored at :math:`10^{-10}` of the total
    variance, :math:`\lambda = 10^{-6}` when both are 0). The within-class scatter is the total scatter about
    the mean minus the between-class scatter, summed over float64 row blocks
    (:class:`~ood_core.streaming.ClassMoments`). The fit streams (``fit_rows``): two passes over the rows, the
    mean :math:`\bar\mu` first, then the class counts, sums and the scatter about it; in memory it is the same
    fit on one chunk. Scoring whitens by the
    Cholesky factor :math:`\Sigma = L L^\top`: :math:`s = \min_c \lVert L^{-1}(z - \bar\mu) - m_c \rVert^2`
    with whitened means :math:`m_c = L^{-1}(\mu_c - \bar\mu)`, in the dtype of the input.

    Paper: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018 (arXiv:1807.03888); code https://github.com/pokaxpoka/deep_Mahalanobis_detector.
    The input preprocessing of the paper is :class:`~.model_in_loop.MahalanobisPreprocessed`.

    pytorch-ood 0.4.0 ``Mahalanobis(encoder)``: same signature (``encoder=`` is accepted for ``model``).
    Difference: its score is :math:`\tfrac12 \min_c (z-\mu_c)^\top (N\Sigma_0 + 10^{-6} I)^{-1} (z-\mu_c)`
    (scatter not divided by :math:`N`, absolute ridge), i.e. ours times :math:`1/(2N)` up to the ridge: the
    same ranking.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    shared_statistics: ClassVar[Tuple[str, ...]] = ("moments_about_mean",)
    parameter_constraints: ClassVar[Dict[str, Param]] = {}
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(z, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        self._fit_gaussians(chunks)

    def _fit_gaussians(self, chunks: Chunks) -> ClassMoments:
        r"""Fit the class means and the shared covariance from two passes over ``chunks()``; returns the
        moments about the global mean :math:`\bar\mu` (``scatter()``: the total scatter
        :math:`\sum_i (z_i - \bar\mu)(z_i - \bar\mu)^\top`, :class:`~.feature_stats.RMD`'s background)."""
        stats = moments_about_mean(chunks)  # two passes: the mean, then n_c, sum_c (z - mean), the scatter
        center = stats.center
        n, counts = stats.n, stats.counts
        m = stats.offsets()  # mu_c - center
        within = (stats.total - (m * counts[:, None]).T @ m) / n  # total scatter - between-class scatter
        self.ridge = relative_ridge(within, 1e-10 * float(torch.diagonal(stats.total).sum()) / n)
        self.whitener, _ = cholesky_whitener(within, self.ridge)  #: L^{-1}, (D, D) float64
        self.classes = stats.classes  #: class labels, (C,)
        self.center = center  #: global mean, (D,) float64
        self.mu = m + center  #: class means, (C, D) float64
        self.whitened_mu = m @ self.whitener.T  #: L^{-1}(mu_c - center), (C, D) float64
        return stats

    @property
    def precision(self) -> Tensor:
        """The precision matrix :math:`\Sigma^{-1} = L^{-\top} L^{-1}` (float64)."""
        self._require_fit()
        return self.whitener.T @ self.whitener

    def _whitened(self, z: Tensor) -> Tensor:
        """:math:`L^{-1}(z - \bar\mu)` in the dtype of ``z``."""
        return (z - self.center.to(z)) @ self.whitener.to(z).T

    def _min_distance(self, z: Tensor) -> Tensor:
        return closest_sq_distance(self._whitened(z), self.whitened_mu.to(z))

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._min_distance, z)
