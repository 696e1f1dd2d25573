"""Feature-statistics detectors: relative Mahalanobis, class-conditional GMM, NECO, NCI, fDBD."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import D, Boolean, Interval, Param
from ..streaming import Chunks, ClassMoments, mean_of_stream
from .head import Head, HeadMixin
from .mahalanobis import Mahalanobis, closest_sq_distance, relative_ridge
from .numerics import by_row_blocks, cholesky_whitener, one_thread


class RMD(Mahalanobis):
    r"""Relative Mahalanobis distance: the class-conditional Gaussians' distance minus a background one's.

    Fit (float64, from the same two passes over the rows, which :meth:`fit_rows` streams): the class means and
    shared covariance of :class:`~.mahalanobis.Mahalanobis` (same relative ridge), and a background Gaussian
    :math:`\mathcal N(\mu_0, \Sigma_0)` of all ID features,
    :math:`\Sigma_0 = \frac1N \sum_i (z_i - \mu_0)(z_i - \mu_0)^\top + \lambda_0 I`,
    :math:`\lambda_0 = 10^{-6} \operatorname{tr}/D`. Score:

    .. math:: s(x) = \min_c \big[ MD_c(z) - MD_0(z) \big] = \min_c MD_c(z) - MD_0(z)

    with the squared Mahalanobis distances :math:`MD_c(z) = (z - \mu_c)^\top \Sigma^{-1} (z - \mu_c)`,
    :math:`MD_0(z) = (z - \mu_0)^\top \Sigma_0^{-1} (z - \mu_0)`.

    Paper: Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection",
    arXiv:2106.09022 (2021).

    pytorch-ood 0.4.0 ``RMD(encoder)``: same signature (``encoder=`` is accepted for ``model``). Difference:
    its covariances are scatters not divided by :math:`N` (absolute ridge :math:`10^{-6}`), so its score is
    ours :math:`/ N` up to the ridges: the same ranking.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    """

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)

    def _fit_stream(self, chunks: Chunks) -> None:
        stats = self._fit_gaussians(chunks)
        background = stats.scatter() / stats.n  # the background's covariance about mu_0 = center
        self.background_whitener, _ = cholesky_whitener(background, relative_ridge(background))  #: L_0^{-1}

    def _relative_distance(self, z: Tensor) -> Tensor:
        x = z - self.center.to(z)
        w0 = x @ self.background_whitener.to(z).T
        return closest_sq_distance(x @ self.whitener.to(z).T, self.whitened_mu.to(z)) - (w0 * w0).sum(dim=1)

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._relative_distance, z)


class GMM(FeaturesDetector):
    r"""Class-conditional Gaussians, each with its own covariance; the negative mixture log-likelihood.

    Fit (float64, per class :math:`c` with :math:`N_c` ID samples; two passes over the rows, which
    :meth:`fit_rows` streams, the class means first): :math:`\mu_c`, the prior
    :math:`\pi_c = N_c / N` and :math:`\Sigma_c = \frac{1}{N_c} \sum_{i: y_i=c} (z_i - \mu_c)(z_i - \mu_c)^\top
    + \lambda I`, with one ridge for all classes, relative to the pooled within-class covariance
    :math:`\bar\Sigma = \sum_c \pi_c \Sigma_c^0`:

    .. math:: \lambda = \text{reg} \cdot \operatorname{mean}_{j:\, \bar\Sigma_{jj} > 0} \bar\Sigma_{jj}

    (the mean variance of the features that vary; floored at :math:`10^{-10}` of the average total variance,
    and ``reg`` itself when all features are constant). Score:

    .. math:: s(x) = -\log \sum_c \pi_c \, \mathcal N(z \mid \mu_c, \Sigma_c)
               = -\operatorname{logsumexp}_c \big[\log \pi_c - \tfrac12 (MD_c(z) + \log\det \Sigma_c
                 + D \log 2\pi)\big]

    One shared ridge makes the ranking independent of constant (dead) features: each adds the same
    :math:`\tfrac12 \log(2\pi\lambda)` to every class's log-density. A per-class relative ridge does not (it
    adds :math:`\tfrac12 \log \lambda_c`, different per class: 100 zero columns appended to real CNN features
    moved the AUROC from 0.96 to 0.86); ``tests/detectors/test_feature_stats.py`` checks the invariance.

    Memory: :math:`C D^2` float64 (one whitener per class). Paper: none introduced it; a classic generative
    baseline (quadratic discriminant analysis), the per-class-covariance variant of Lee et al., NeurIPS 2018
    (arXiv:1807.03888).

    pytorch-ood 0.4.0 ``GMM(encoder, reg=1e-6)``: same signature (``encoder=`` is accepted for ``model``).
    Difference: its ridge is absolute, ``reg * I`` in squared feature units; ours is ``reg`` times the mean
    pooled variance (the same where that is 1), so scaling the features does not change the ranking. Both
    agree where the ridge is negligible against the class covariances.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param reg: relative ridge
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "reg": Param(Interval(float, 0, None, closed="neither"), doc="ridge, relative to the mean pooled variance"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"reg": {"grid": [1e-6, 1e-4, 1e-2, 1e-1]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, reg: float = 1e-6):
        super().__init__(model)
        self.reg = reg

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(z, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        d = self.n_features_in_
        first = ClassMoments(d, torch.zeros(d), scatter=None).update_all(chunks())  # pass 1: n_c, class means
        classes, counts, n = first.classes, first.counts, first.n
        # pass 2: each class's scatter about its mean
        stats = ClassMoments(d, first.means(), classes, scatter="class").update_all(chunks())
        mu, covs, prior = stats.means(), stats.class_scatters() / counts[:, None, None], counts / n
        pooled_var = torch.einsum("c,cjj->j", prior, covs)  # diagonal of the pooled covariance
        center = prior @ mu
        between = (prior[:, None] * (mu - center) ** 2).sum()
        varying = int((pooled_var > (n * torch.finfo(torch.float64).eps * center) ** 2).sum())  # up to rounding
        trace = max(float(pooled_var.sum()), 1e-10 * float(pooled_var.sum() + between))
        self.ridge = self.reg * (trace / max(varying, 1) if trace > 0 else 1.0)
        whiteners, log_norm = [], []
        for k in range(len(covs)):
            whitener, log_det = cholesky_whitener(covs[k], self.ridge)
            whiteners.append(whitener)
            log_norm.append(math.log(prior[k]) - 0.5 * (log_det + d * math.log(2 * math.pi)))
        self.classes = classes  #: (K,)
        self.mu = mu  #: (K, D) float64
        self.whiteners = torch.stack(whiteners)  #: L_c^{-1}, (K, D, D) float64
        self.log_norm = torch.tensor(log_norm, dtype=torch.float64, device=mu.device)  #: (K,)

    def _neg_log_likelihood(self, z: Tensor) -> Tensor:
        mu, whiteners = self.mu.to(z), self.whiteners.to(z)
        maha = torch.stack([((z - mu[k]) @ whiteners[k].T).square().sum(dim=1) for k in range(len(mu))], dim=1)
        return -torch.logsumexp(self.log_norm.to(z) - 0.5 * maha, dim=1)

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._neg_log_likelihood, z)


class NECO(HeadMixin, FeaturesDetector):
    r"""NECO: the norm ratio of the principal-subspace projection of standardised features.

    Fit on ID-train features (two passes, which :meth:`fit_rows` streams: the mean, then the covariance): a
    StandardScaler :math:`\tilde z = (z - m) / \sigma` (population std; features with :math:`\sigma = 0` keep
    scale 1, as scikit-learn does) and a PCA of :math:`\tilde z`
    (eigenvectors of its covariance, float64, all :math:`D` of them: ``d`` only chooses how many are used);
    :math:`P` = the top-:math:`d` principal directions. Score (the paper's NECO is an ID score, so negated):

    .. math:: s(x) = -\frac{\lVert P^\top \tilde z \rVert_2}{\lVert \tilde z \rVert_2}
              \quad \big(\times \max_c l_c(z) \text{ with } \texttt{use\_max\_logit}\big)

    A zero :math:`\tilde z` scores 0. ``use_max_logit`` (needs the head): the official code multiplies by the
    max logit for ViT-like models (ViT, DeiT, Swin) and not for ResNets; the paper's score is the ratio.

    Default search space: the official code's default ``neco_dim`` is 100; the grid
    :math:`d \in \{5, 10, 20, 50, 100\}` keeps the values below :math:`D` (``d = D`` gives a constant ratio);
    where fewer than two fit, :math:`\{D/4, D/2, 3D/4\}` (rounded down, at least 1).

    Paper: Ammar et al., "NECO: NEural Collapse Based Out-of-distribution detection", ICLR 2024
    (arXiv:2310.06823); code https://github.com/MouinBenAmmar/NECO. Difference to the official code: for
    DeiT / Swin it divides by the norm of the unscaled features; we always divide by :math:`\lVert\tilde z\rVert`.
    No pytorch-ood counterpart.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param d: principal dimension, ``1 <= d <= D``
    :param use_max_logit: multiply the ratio by the max logit of the head
    :param head: the classifier (``nn.Linear``, ``(w, b)``, ...; only used with ``use_max_logit``)
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "d": Param(Interval(int, 1, D), structural=False, doc="principal dimension"),
        "use_max_logit": Param(Boolean(), structural=False, doc="multiply by the max logit (ViT-like models)"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"d": {"grid": [5, 10, 20, 50, 100]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, d: int = 10,
                 use_max_logit: bool = False, head: Head = None):
        super().__init__(model)
        self.d = d
        self.use_max_logit = use_max_logit
        self._set_head(head)

    @classmethod
    def search_space(cls, data: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        """The grid's values below ``D``; ``{D/4, D/2, 3D/4}`` where fewer than two are (see the class)."""
        return _dimension_grid(cls, data, [5, 10, 20, 50, 100], lambda dim: (dim // 4, dim // 2, 3 * dim // 4))

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(z, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        if self.use_max_logit:
            self._require_head()
        mean = mean_of_stream(chunks())  # pass 1
        stats = ClassMoments(mean.shape[0], mean).update_all(z for z, _ in chunks())  # pass 2: scatter about it
        n = stats.n
        cov = stats.scatter() / n
        var = torch.diagonal(cov)
        constant = var <= (n * torch.finfo(torch.float64).eps * mean) ** 2  # scikit-learn's test, up to rounding
        std = torch.where(constant, torch.ones_like(var), var.sqrt())
        with one_thread(cov):
            _, evecs = torch.linalg.eigh(cov / torch.outer(std, std))  # the covariance of the scaled features
        self.mean, self.std = mean, std  #: scaler, (D,) float64 each
        self.components = evecs.flip(1).contiguous()  #: principal directions, descending, (D, D) float64

    def _score(self, z: Tensor) -> Tensor:
        zs = (z - self.mean.to(z)) / self.std.to(z)
        projected = zs @ self.components[:, : self.d].to(z)
        ratio = projected.norm(dim=1) / zs.norm(dim=1).clamp(min=torch.finfo(z.dtype).tiny)
        if self.use_max_logit:
            ratio = ratio * self.logits(z).amax(dim=1)
        return -ratio


class NCI(HeadMixin, FeaturesDetector):
    r"""Neural-collapse inspired: alignment of the centred feature with the predicted class's weights.

    Fit: the ID-train feature mean :math:`\mu_G` (one pass; :meth:`fit_rows` streams it). Score, with
    :math:`\hat c = \arg\max_c l_c(z)`:

    .. math:: s(x) = -\Big(\frac{w_{\hat c}^\top (z - \mu_G)}{\lVert z - \mu_G \rVert_2}
              + \alpha \lVert z \rVert_1\Big)

    (the paper writes :math:`\cos(w_{\hat c}, z - \mu_G)`; the official code, OpenOOD and pytorch-ood leave
    out :math:`\lVert w_{\hat c} \rVert`, and so do we). Default search space: OpenOOD's grid
    :math:`\alpha \in \{10^{-4}, 10^{-3}, 10^{-2}, 0.1\}`.

    Paper: Liu & Qin, "Detecting Out-of-distribution through the Lens of Neural Collapse", CVPR 2025
    (arXiv:2311.01479); code https://github.com/litianliu/NCI-OOD.

    pytorch-ood 0.4.0 ``NCI(encoder, head, alpha=0.0)``: same positional order (``encoder=`` is accepted for
    ``model``; ``head`` an ``nn.Linear`` or ``(w, b)``). Difference: the default ``alpha`` is OpenOOD's 1e-4.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param head: the classifier (``nn.Linear``, ``(w, b)``, ...)
    :param alpha: weight of the L1 feature-norm term
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "alpha": Param(Interval(float, 0, None), structural=False, doc="weight of the L1 feature norm"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"alpha": {"grid": [1e-4, 1e-3, 1e-2, 0.1]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None, alpha: float = 1e-4):
        super().__init__(model)
        self._set_head(head)
        self.alpha = alpha

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(z, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        self._require_head()
        #: mu_G, (D,) float64 (float32 block sums: a centre needs no more)
        self.center = mean_of_stream(chunks(), exact=False)

    def _nci(self, z: Tensor) -> Tensor:
        pred = self.logits(z).argmax(dim=1)
        centred = z - self.center.to(z)
        align = (self.w.to(z)[pred] * centred).sum(dim=1) / centred.norm(dim=1).clamp(min=torch.finfo(z.dtype).tiny)
        return -(align + self.alpha * z.abs().sum(dim=1))

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._nci, z)


class fDBD(HeadMixin, FeaturesDetector):  # noqa: N801 - the paper's spelling
    r"""Fast decision-boundary distance, normalised by the distance to the ID mean.

    Fit: the ID-train feature mean :math:`\mu` (one pass; :meth:`fit_rows` streams it). Score, with
    :math:`\hat c = \arg\max_c l_c(z)`:

    .. math:: s(x) = -\frac{1}{C - 1} \sum_{c \ne \hat c}
              \frac{l_{\hat c}(z) - l_c(z)}{\lVert w_{\hat c} - w_c \rVert_2 \, \lVert z - \mu \rVert_2}

    i.e. the mean distance from :math:`z` to the decision boundaries of the predicted class (closed form for
    a linear head) over the distance to the mean. Hyperparameter-free.

    Paper: Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024
    (arXiv:2312.11536); code https://github.com/litianliu/fDBD-OOD.

    pytorch-ood 0.4.0 ``fDBD(encoder, head)``: same positional order (``encoder=`` is accepted for ``model``).
    Differences: pairs of classes with equal weights (no boundary) contribute 0 here (a division by zero
    there); :math:`\lVert z - \mu\rVert` is clamped at :math:`10^{-8}` in both.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param head: the classifier (``nn.Linear``, ``(w, b)``, ...)
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {}
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None):
        super().__init__(model)
        self._set_head(head)

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(z, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        self._require_head()
        #: mu, (D,) float64 (float32 block sums: a centre needs no more)
        self.center = mean_of_stream(chunks(), exact=False)
        w = self.w.to(self.center.device, torch.float64)
        gaps = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")  # ||w_i - w_j||, no cancellation
        self.inv_gaps = torch.where(gaps > 0, 1.0 / gaps, torch.zeros_like(gaps))  #: (C, C), 0 where no boundary

    def _fdbd(self, z: Tensor) -> Tensor:
        logits = self.logits(z)
        top, pred = logits.max(dim=1)
        boundary = ((top[:, None] - logits) * self.inv_gaps.to(z)[pred]).sum(dim=1) / max(logits.shape[1] - 1, 1)
        return -boundary / (z - self.center.to(z)).norm(dim=1).clamp(min=1e-8)

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._fdbd, z)


def _dimension_grid(cls, data, grid, relative) -> Dict[str, Any]:
    """``{"d": {"grid": ...}}`` for a principal dimension: the values of ``grid`` below ``D``; where fewer than
    two are, those and ``relative(D)`` (rounded down, in ``[1, D - 1]``). Without ``D``, the class's default."""
    space = copy.deepcopy(cls.default_search_space)
    dim = (data or {}).get("D")
    if dim is None:
        return space
    kept = [v for v in grid if v < dim]
    if len(kept) < 2:
        kept = sorted({*kept, *(int(v) for v in relative(dim) if 1 <= int(v) < dim)})
    if kept:
        space["d"] = {"grid": kept}
    else:
        space.pop("d", None)  # D = 1: nothing fits; the constructor's default applies (and fit says why)
    return space
