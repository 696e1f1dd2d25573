r"""Mahalanobis++ and RMDS++: the Mahalanobis detectors on :math:`\ell_2`-normalised penultimate features.

Müller & Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization", ICML 2025
(arXiv:2505.18032); code https://github.com/mueller-mp/maha-norm. The paper observes that the norms of
penultimate features vary strongly within a class (against the shared-covariance Gaussian model of
:class:`~.mahalanobis.Mahalanobis`) and that scaling every feature vector to unit length, in fit and in
scoring, makes the Gaussian fit better; the improvement is largest for ViT / Swin / ConvNeXt backbones.

The classes are thin subclasses: the normalisation :math:`\hat z = z / \lVert z \rVert_2` is applied to the rows
before the parent's fit and scoring, everything else (float64 statistics, relative ridge, Cholesky whitening)
is the parent's.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

from torch import Tensor

from .feature_stats import RMD
from .knn import normalise
from .mahalanobis import Mahalanobis


class _L2Normalized:
    """Rows scaled to unit :math:`\\ell_2` norm before the parent detector fits and scores (zero rows stay 0)."""

    shared_statistics: Tuple[str, ...] = ()  # the parent's statistics of other rows: not shared

    def _fit_stream(self, chunks) -> None:  # the parent's fit, in memory or streamed, on normalised rows
        super()._fit_stream(lambda: ((normalise(z), y) for z, y in chunks()))

    def _score(self, z: Tensor) -> Tensor:
        return super()._score(normalise(z))


class MahalanobisPP(_L2Normalized, Mahalanobis):
    r"""Mahalanobis++: :class:`~.mahalanobis.Mahalanobis` on :math:`\ell_2`-normalised features.

    With :math:`\hat z = z / \lVert z \rVert_2` for the training rows and the scored rows alike:

    .. math::
        \mu_c = \operatorname{mean}_{i: y_i = c} \hat z_i, \qquad
        \Sigma = \frac1N \sum_i (\hat z_i - \mu_{y_i})(\hat z_i - \mu_{y_i})^\top + \lambda I, \qquad
        s(x) = \min_c\, (\hat z - \mu_c)^\top \Sigma^{-1} (\hat z - \mu_c)

    (:math:`\lambda` the relative ridge of :class:`~.mahalanobis.Mahalanobis`). Hyperparameter-free.

    Paper: Müller & Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization", ICML 2025
    (arXiv:2505.18032); code https://github.com/mueller-mp/maha-norm (``evaluate_Mahalanobis_norm`` and the
    OpenOOD ``mdsn`` postprocessor there). Differences to the official code: it inverts the covariance without
    a ridge (scikit-learn's ``EmpiricalCovariance``) and divides by the norm without a guard; here the relative
    ridge :math:`10^{-6} \operatorname{tr}(\Sigma)/D` keeps :math:`\Sigma` invertible and zero rows stay zero.
    Not in OpenOOD or pytorch-ood 0.4.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    """

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)


class RMDPP(_L2Normalized, RMD):
    r"""RMDS++: the relative Mahalanobis distance :class:`~.feature_stats.RMD` on :math:`\ell_2`-normalised
    features (the paper's "RMDS++").

    With :math:`\hat z = z / \lVert z \rVert_2` for the training rows and the scored rows alike, the class
    Gaussians (shared covariance :math:`\Sigma`) and the background Gaussian
    :math:`\mathcal N(\mu_0, \Sigma_0)` of all training rows are fitted on :math:`\hat z`:

    .. math:: s(x) = \min_c\, (\hat z - \mu_c)^\top \Sigma^{-1} (\hat z - \mu_c)
                     - (\hat z - \mu_0)^\top \Sigma_0^{-1} (\hat z - \mu_0)

    Hyperparameter-free.

    Paper: Müller & Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization", ICML 2025
    (arXiv:2505.18032); code https://github.com/mueller-mp/maha-norm (``evaluate_Relative_Mahalanobis_norm``
    and the OpenOOD ``rmdsn`` postprocessor there); RMD: Ren et al., arXiv:2106.09022. Differences to the
    official code: as :class:`MahalanobisPP` (relative ridges instead of unregularised inverses, zero rows stay
    zero). Not in OpenOOD or pytorch-ood 0.4.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    """

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)
