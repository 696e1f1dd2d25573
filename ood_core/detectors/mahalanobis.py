"""Mahalanobis distance to class-conditional Gaussians with a shared covariance.

Also holds the small input helpers shared by the feature-based detectors of this package.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..api import FeaturesDetector, InvalidInputError, check_input
from .numerics import add_scatter_, float64_blocks, lower_matmul_t, mean64, mirror_lower, ridge_whitener, row_slices

#: relative ridge added to the shared covariance: ``RIDGE * trace(Sigma) / D`` (``RIDGE`` when the trace is 0)
RIDGE = 1e-6


# -- helpers shared by the feature detectors --------------------------------------------------
def id_training_set(detector, z, y, name: str = "features", finite: bool = True) -> Tuple[Tensor, Tensor]:
    """Validate training features ``(N, D)`` and labels ``(N,)``; drop OOD rows (label < 0).

    Returns ``(z, y)`` with ``y`` as int64 on the device of ``z``. Raises
    :class:`InvalidInputError` naming the detector on bad shapes / values or when no ID row is left.
    """
    label = type(detector).__name__
    z = check_input(detector, z, ndim=2, name=name, finite=finite)
    y = torch.as_tensor(y, device=z.device)
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise InvalidInputError(
            f"{label}: labels must have shape ({z.shape[0]},) to match {name}, got {tuple(y.shape)}"
        )
    if torch.is_floating_point(y):
        if y.numel() and not (torch.isfinite(y).all() and (y == y.round()).all()):
            raise InvalidInputError(f"{label}: labels must be integers")
    y = y.long()
    known = y >= 0
    if not bool(known.all()):
        z, y = z[known], y[known]
    if z.shape[0] == 0:
        raise InvalidInputError(f"{label}: no in-distribution samples (labels >= 0) to fit on")
    if z.shape[1] == 0:
        raise InvalidInputError(f"{label}: {name} have zero dimensions")
    return z, y


def check_features(detector, z, dim: int, name: str = "features", finite: bool = True) -> Tensor:
    """Validate features ``(N, dim)`` for prediction (``dim`` is the dimension seen in ``fit``); ``finite``
    as in :func:`~ood_core.api.check_input` (then call :func:`require_finite` on a reduction)."""
    z = check_input(detector, z, ndim=2, name=name, finite=finite)
    if z.shape[1] != dim:
        raise InvalidInputError(
            f"{type(detector).__name__}: {name} have dimension {z.shape[1]}, but the detector "
            f"was fitted / built for dimension {dim}"
        )
    return z


def whiten(x: Tensor, whitener: Tensor) -> Tensor:
    """``x @ L^{-T}`` for centred ``x`` and lower-triangular ``L^{-1}`` (panels skip its zero blocks outside
    autograd)."""
    return x @ whitener.T if torch.is_grad_enabled() and x.requires_grad else lower_matmul_t(x, whitener)


def closest_sq_distance(w: Tensor, means: Tensor) -> Tensor:
    """``min_c |w - m_c|^2`` for whitened ``w`` ``(N, D)`` and means ``(C, D)``: the expansion picks the class,
    the distance is recomputed directly (no cancellation)."""
    d2 = torch.addmm((means * means).sum(dim=1), w, means.T, alpha=-2.0)  # |w - m_c|^2 - |w|^2: same argmin
    diff = w - means[d2.argmin(dim=1)]
    return (diff * diff).sum(dim=1)


def require_finite(detector, z: Tensor, reduced: Tensor, name: str = "features") -> bool:
    """For inputs checked with ``finite=False``: True when ``reduced`` (a reduction of ``z`` that is
    non-finite whenever an entry of ``z`` is) is all finite; otherwise validates ``z`` (raising
    :class:`InvalidInputError` on NaN / inf) and returns False (finite ``z`` that overflowed)."""
    if reduced.numel() == 0 or bool(torch.isfinite(reduced).all()):
        return True
    check_input(detector, z, name=name)
    return False


class Mahalanobis(FeaturesDetector):
    r"""Minimum squared Mahalanobis distance to the class means (shared covariance).

    Fit (float64, on ID training features :math:`z_i` with labels :math:`y_i`):

    .. math::
        \mu_c = \operatorname{mean}_{i: y_i = c} z_i, \qquad
        \Sigma_0 = \frac{1}{N} \sum_i (z_i - \mu_{y_i})(z_i - \mu_{y_i})^\top, \qquad
        \Sigma = \Sigma_0 + \lambda I, \qquad \lambda = 10^{-6} \operatorname{tr}(\Sigma_0) / D

    (the ridge :math:`\lambda` is relative to the average within-class variance, so
    rank-deficient or constant features and :math:`D > N` stay invertible; the trace is floored at
    :math:`10^{-10}` of the total scatter's, and :math:`\lambda = 10^{-6}` if both are 0).
    :math:`\Sigma_0` is computed as total scatter minus between-class scatter of the centred
    features (float64 row blocks, symmetric panel products).

    Score:

    .. math:: s(x) = \min_c (z - \mu_c)^\top \Sigma^{-1} (z - \mu_c)

    computed by Cholesky whitening :math:`\Sigma = L L^\top`, :math:`w = L^{-1}(z - \bar\mu)`,
    :math:`s = \min_c \lVert w - m_c \rVert^2` with whitened means :math:`m_c`: the closest class
    from one matmul (:math:`\lVert w\rVert^2 - 2 w^\top m_c + \lVert m_c\rVert^2`), its distance
    then recomputed directly; in the dtype of the input.

    With ``eps > 0`` and a ``model`` (that outputs features), :meth:`predict` first applies the
    paper's input preprocessing :math:`\tilde x = x - \varepsilon\, \operatorname{sign}
    \nabla_x s(x)` (ODIN-style, a step towards the closest class) and scores :math:`\tilde x`.
    Representation methods (``predict_features``) never preprocess.

    Paper: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018 (arXiv:1807.03888). Relation to pytorch-ood 0.4.0:
    its score is :math:`\tfrac12 \min_c (z-\mu_c)^\top (N\Sigma_0 + 10^{-6} I)^{-1} (z-\mu_c)`,
    i.e. ours times :math:`1/(2N)` up to the ridge.

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param eps: input-preprocessing step (only used by ``predict`` with a model)
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, eps: float = 0.0):
        super().__init__(model)
        self.eps = float(eps)
        if not self.eps >= 0:
            raise ValueError(f"Mahalanobis: eps must be >= 0, got {eps!r}")
        self.classes: Optional[Tensor] = None  #: class labels, (C,)
        self.mu: Optional[Tensor] = None  #: class means, (C, D) float64
        self.center: Optional[Tensor] = None  #: global mean, (D,) float64
        self.whitener: Optional[Tensor] = None  #: L^{-1}, (D, D) float64, lower triangular
        self.whitened_mu: Optional[Tensor] = None  #: L^{-1}(mu_c - center), (C, D) float64
        self.ridge: Optional[float] = None

    @property
    def precision(self) -> Tensor:
        """Precision matrix :math:`\\Sigma^{-1} = L^{-\\top} L^{-1}` (float64)."""
        self._require_fit()
        return self.whitener.T @ self.whitener

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "Mahalanobis":
        z, y = id_training_set(self, z, y)
        self._fit_gaussians(z, y)
        return self

    def _fit_gaussians(self, z: Tensor, y: Tensor) -> Tensor:
        """Fit on validated ``(z, y)``; returns the total scatter ``sum_i (z_i - center)(z_i - center)^T``
        (float64, for subclasses: :class:`~.feature_stats.RMD` reuses it for its background Gaussian)."""
        n, d = z.shape
        center = mean64(z.detach())
        classes, inverse = torch.unique(y, return_inverse=True)
        n_classes = classes.shape[0]
        counts = torch.bincount(inverse, minlength=n_classes).to(torch.float64)
        # one pass over float64 blocks of the centred features (centring limits the cancellation below):
        # class sums relative to the centre, and the total scatter (symmetric panels)
        m = torch.zeros(n_classes, d, dtype=torch.float64, device=z.device)
        total = torch.zeros(d, d, dtype=torch.float64, device=z.device)
        for start, x in float64_blocks(z.detach(), center):
            m.index_add_(0, inverse[start : start + x.shape[0]], x)
            add_scatter_(total, x)
        total = mirror_lower(total)
        m /= counts[:, None]  # m_c = mu_c - center
        # within-class scatter = total scatter - between-class scatter
        cov = (total - (m * counts[:, None]).T @ m) / n
        cov = 0.5 * (cov + cov.T)
        mu = m + center
        # the subtraction is accurate to ~1e-16 of the total scatter: floor the trace there, so
        # that classes with (numerically) zero spread still get a meaningful ridge
        whitener, self.ridge, _ = ridge_whitener(cov, RIDGE, 1e-10 * float(torch.diagonal(total).sum()) / n)
        self.classes = classes
        self.mu = mu
        self.center = center
        self.whitener = whitener
        self.whitened_mu = m @ whitener.T
        self._mark_fitted()
        return total

    def _min_distance(self, z: Tensor) -> Tensor:
        """``min_c`` squared Mahalanobis distance, ``(N,)`` (differentiable in ``z``).

        The expansion ``-2 w.m_c + |m_c|^2`` (one matmul) picks the closest class; the
        distance to it is then recomputed directly as ``|w - m_c|^2``, which avoids the
        cancellation of the expansion when the classes are far apart relative to their spread.
        """
        center, whitener, means = self._params(z)
        return closest_sq_distance(whiten(z - center, whitener), means)

    def _params(self, z: Tensor):
        """``(center, L^{-1}, whitened means)`` in the dtype and on the device of ``z``."""
        return tuple(t.to(device=z.device, dtype=z.dtype) for t in (self.center, self.whitener, self.whitened_mu))

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.mu.shape[1])
        center, whitener, means = self._params(z)
        out = z.new_empty(z.shape[0])
        for rows in row_slices(z):  # cache-sized temporaries
            out[rows] = closest_sq_distance(whiten(z[rows] - center, whitener), means)
        return out

    def predict(self, x: Tensor) -> Tensor:
        model = self._require_model()
        self._require_fit()
        if self.eps > 0:
            x = self._preprocess(model, x)
        with torch.no_grad():
            return self.predict_features(model(x))

    def _preprocess(self, model, x: Tensor) -> Tensor:
        """``x - eps * sign(grad_x min_c d2(model(x), mu_c))`` (gradients per sample via a sum)."""
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            z = model(x)
            z = check_features(self, z.reshape(z.shape[0], -1), self.mu.shape[1])
            loss = self._min_distance(z).sum()
            (grad,) = torch.autograd.grad(loss, x)
        return (x - self.eps * grad.sign()).detach()
