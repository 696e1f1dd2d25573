"""Feature-statistics detectors: relative Mahalanobis, class-conditional GMM, NECO, NCI, fDBD."""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector, InvalidInputError
from .mahalanobis import (Mahalanobis, check_features, closest_sq_distance, id_training_set, require_finite,
                          whiten)
from .head import Head, HeadMixin
from .numerics import centred_norms, lower_matmul_t, mean64, one_thread, ridge_whitener, row_slices, scatter64


class RMD(Mahalanobis):
    r"""Relative Mahalanobis distance: class-conditional minus background Gaussian.

    Fit (float64): the class-conditional Gaussians with shared covariance of
    :class:`Mahalanobis` (same relative ridge) and a background Gaussian
    :math:`\mathcal N(\mu_0, \Sigma_0)` fitted to all ID features,
    :math:`\Sigma_0 = \frac1N \sum_i (z_i - \mu_0)(z_i - \mu_0)^\top + \lambda_0 I`,
    :math:`\lambda_0 = 10^{-6} \operatorname{tr}/D`. Score:

    .. math:: s(x) = \min_c \big[ MD_c(z) - MD_0(z) \big] = \min_c MD_c(z) - MD_0(z)

    with squared Mahalanobis distances :math:`MD`. Paper: Ren et al., "A Simple Fix to
    Mahalanobis Distance for Improving Near-OOD Detection", arXiv:2106.09022 (2021).
    pytorch-ood 0.4.0 uses covariances not divided by :math:`N` (ridge :math:`10^{-6}`), so its
    score is ours :math:`/ N` up to the ridges.

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)
        self.background_center: Optional[Tensor] = None  #: mu_0, (D,) float64
        self.background_whitener: Optional[Tensor] = None  #: L_0^{-1}, (D, D) float64

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "RMD":
        z, y = id_training_set(self, z, y)
        total = self._fit_gaussians(z, y)  # the background's scatter is the total scatter about the mean
        cov = total / z.shape[0]
        self.background_whitener, _, _ = ridge_whitener(cov, 1e-6, 1e-10 * float(torch.diagonal(cov).sum()))
        self.background_center = self.center
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.mu.shape[1])
        center, whitener, means = self._params(z)  # center == background_center
        background = self.background_whitener.to(device=z.device, dtype=z.dtype)
        out = z.new_empty(z.shape[0])
        for rows in row_slices(z):  # cache-sized temporaries
            x = z[rows] - center
            w0 = whiten(x, background)
            out[rows] = closest_sq_distance(whiten(x, whitener), means) - (w0 * w0).sum(dim=1)
        return out


class GMM(FeaturesDetector):
    r"""Class-conditional Gaussians, each with its own covariance; negative mixture log-likelihood.

    Fit (float64, per class :math:`c` with :math:`N_c` ID samples): :math:`\mu_c`,
    :math:`\Sigma_c = \frac{1}{N_c} \sum_{i: y_i=c} (z_i - \mu_c)(z_i - \mu_c)^\top + \lambda_c I`
    with the relative ridge :math:`\lambda_c = \text{reg} \cdot \operatorname{tr}(\Sigma_c^0) / D`
    (trace floored at :math:`10^{-10}` of the average total variance, so single-sample / constant
    classes stay invertible), and the prior :math:`\pi_c = N_c / N`. Score:

    .. math:: s(x) = -\log \sum_c \pi_c \, \mathcal N(z \mid \mu_c, \Sigma_c)
               = -\operatorname{logsumexp}_c \big[\log \pi_c - \tfrac12 (MD_c(z) + \log\det \Sigma_c
                 + D \log 2\pi)\big]

    Paper: none introduced it; a classic generative baseline (quadratic discriminant analysis),
    the per-class-covariance variant of Lee et al., NeurIPS 2018 (arXiv:1807.03888).
    Equal to pytorch-ood 0.4.0's ``GMM`` up to its absolute (not relative) ridge ``reg``, which
    matters for near-singular class covariances. Memory: :math:`C \cdot D^2` float64 (whiteners).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param reg: relative ridge :math:`> 0`
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {"reg": {"grid": [1e-6, 1e-4, 1e-2, 1e-1]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, reg: float = 1e-6):
        super().__init__(model)
        reg = float(reg)
        if not (reg > 0 and math.isfinite(reg)):
            raise ValueError(f"GMM: reg must be a positive finite number, got {reg!r}")
        self.reg = reg
        self.classes: Optional[Tensor] = None  #: (K,)
        self.mu: Optional[Tensor] = None  #: (K, D) float64
        self.whiteners: Optional[Tensor] = None  #: L_c^{-1}, (K, D, D) float64
        self.log_norm: Optional[Tensor] = None  #: log pi_c - (log det Sigma_c + D log 2 pi) / 2, (K,) float64

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "GMM":
        z, y = id_training_set(self, z, y)
        z = z.detach()
        n, d = z.shape
        classes, inverse = torch.unique(y, return_inverse=True)
        counts = torch.bincount(inverse, minlength=classes.shape[0])
        grouped = z.index_select(0, torch.argsort(inverse, stable=True))  # rows grouped by class
        mus, covs = [], []
        for xc in torch.split(grouped, counts.tolist()):  # one Gaussian per class (a loop over classes)
            mu = mean64(xc)
            mus.append(mu)
            covs.append(scatter64(xc, mu).div_(xc.shape[0]))
        mu = torch.stack(mus)
        weight = counts.to(mu.dtype)
        # average total variance = within-class + between-class parts (no cancellation)
        center = (weight[:, None] * mu).sum(dim=0) / n
        total_var = float(sum(w * torch.diagonal(c).sum() for w, c in zip(weight, covs))
                          + (weight * ((mu - center) ** 2).sum(dim=1)).sum()) / n
        whiteners, log_norm = [], []
        for k, cov in enumerate(covs):
            whitener, _, log_det = ridge_whitener(cov, self.reg, 1e-10 * total_var)
            whiteners.append(whitener)
            log_norm.append(math.log(float(weight[k]) / n) - 0.5 * (log_det + d * math.log(2 * math.pi)))
        del covs
        self.classes = classes
        self.mu = mu
        self.whiteners = torch.stack(whiteners)
        self.log_norm = torch.tensor(log_norm, dtype=torch.float64, device=z.device)
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.mu.shape[1])
        dtype, device = z.dtype, z.device
        mu = self.mu.to(device=device, dtype=dtype)
        whiteners = self.whiteners.to(device=device, dtype=dtype)
        maha = torch.empty(z.shape[0], mu.shape[0], dtype=dtype, device=device)
        for rows in row_slices(z):  # cache-sized temporaries; classes inside
            zc = z[rows]
            for k in range(mu.shape[0]):
                w = lower_matmul_t(zc - mu[k], whiteners[k])
                maha[rows, k] = (w * w).sum(dim=1)
        return -torch.logsumexp(self.log_norm.to(device=device, dtype=dtype) - 0.5 * maha, dim=1)


class NECO(HeadMixin, FeaturesDetector):
    r"""NECO: norm ratio of the principal-subspace projection of standardised features.

    Fit on ID-train features: a StandardScaler (:math:`\tilde z = (z - m) / \sigma`, population
    std; features with :math:`\sigma = 0` keep scale 1, as scikit-learn does) and a PCA of
    :math:`\tilde z` (eigenvectors of its covariance, float64); :math:`P` = the top-:math:`d`.
    Score (the paper's NECO is an ID score, so negated):

    .. math:: s(x) = -\frac{\lVert P^\top \tilde z \rVert_2}{\lVert \tilde z \rVert_2}
              \quad \big(\times \max_c l_c(z) \text{ with } \texttt{use\_max\_logit}\big)

    The official code (github.com/MouinBenAmmar/NECO) multiplies by the max logit only for
    ViT-like models and leaves it out for ResNets; ``use_max_logit`` needs the head.
    A zero :math:`\tilde z` scores 0. Search grid :math:`d \in \{5, 10, 20, 50, 100\}`
    (``1 <= d < D``, checked in ``fit``). No pytorch-ood counterpart.

    Paper: Ammar et al., "NECO: NEural Collapse Based Out-of-distribution detection",
    ICLR 2024 (arXiv:2310.06823).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param d: principal dimension
    :param use_max_logit: multiply the ratio by the max logit of the head ``(w, b)``
    :param head: the classifier, an ``nn.Linear`` or a ``(w (C, D), b (C,))`` tuple
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {"d": {"grid": [5, 10, 20, 50, 100]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, d: int = 10,
                 use_max_logit: bool = False, head: Head = None):
        super().__init__(model)
        if int(d) != d or int(d) < 1:
            raise ValueError(f"NECO: d must be a positive integer, got {d!r}")
        self.d = int(d)
        self.use_max_logit = bool(use_max_logit)
        self._set_head(head)
        self.mean: Optional[Tensor] = None  #: scaler mean, (D,) float64
        self.std: Optional[Tensor] = None  #: scaler std (1 where constant), (D,) float64
        self.components: Optional[Tensor] = None  #: P, (D, d) float64

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "NECO":
        if self.use_max_logit:
            z, _ = self._head_features(z, y)
        else:
            z, _ = id_training_set(self, z, y)
        dim = z.shape[1]
        if self.d >= dim:
            raise InvalidInputError(f"NECO: principal dimension d={self.d} must be smaller than the feature "
                                    f"dimension D={dim}")
        x = z.detach().double()
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        xs = (x - mean) / std
        xs = xs - xs.mean(dim=0)
        cov = xs.T @ xs / xs.shape[0]
        with one_thread(cov):
            _, evecs = torch.linalg.eigh(cov)  # ascending
        self.mean, self.std = mean, std
        self.components = evecs[:, -self.d:].flip(1).contiguous()
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.mean.shape[0])
        dtype, device = z.dtype, z.device
        zs = (z - self.mean.to(device=device, dtype=dtype)) / self.std.to(device=device, dtype=dtype)
        proj = (zs @ self.components.to(device=device, dtype=dtype)).norm(dim=1)
        ratio = proj / zs.norm(dim=1).clamp(min=torch.finfo(dtype).tiny)
        if self.use_max_logit:
            ratio = ratio * self.logits(z).max(dim=1).values
        return -ratio


class NCI(HeadMixin, FeaturesDetector):
    r"""Neural-collapse inspired: alignment of the centred feature with the predicted class's weights.

    Fit: the ID-train feature mean :math:`\mu_G`. Score, with :math:`\hat c = \arg\max_c l_c(z)`:

    .. math:: s(x) = -\Big(\frac{w_{\hat c}^\top (z - \mu_G)}{\lVert z - \mu_G \rVert_2}
              + \alpha \lVert z \rVert_1\Big)

    (the paper writes :math:`\cos(w_{\hat c}, z - \mu_G)`; the official code, OpenOOD and
    pytorch-ood leave out :math:`\lVert w_{\hat c} \rVert`, and so do we). Search grid
    :math:`\alpha \in \{10^{-4}, 10^{-3}, 10^{-2}, 0.1\}` (OpenOOD). Equal to pytorch-ood 0.4.0.

    Paper: Liu & Qin, "Detecting Out-of-distribution through the Lens of Neural Collapse",
    CVPR 2025 (arXiv:2311.01479).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (C, D), b (C,))`` tuple
    :param alpha: weight of the L1 feature-norm term (>= 0)
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {"alpha": {"grid": [1e-4, 1e-3, 1e-2, 0.1]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None, alpha: float = 1e-4):
        super().__init__(model)
        alpha = float(alpha)
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"NCI: alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = alpha
        self._set_head(head)
        self.center: Optional[Tensor] = None  #: mu_G, (D,)

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "NCI":
        z, _ = self._head_features(z, y)
        self.center = mean64(z.detach(), exact=False)  # a centre: ~1e-7 is plenty
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.w.shape[1])
        dtype, device = z.dtype, z.device
        # w_c.(z - mu_G) = l_c(z) - (w_c.mu_G + b_c): the numerator from the logits, no (N, D) gather
        top, pred = self.logits(z).max(dim=1)
        offset = (self.w.to(device).double() @ self.center.to(device) + self.b.to(device).double()).to(dtype)
        dist = centred_norms(z, self.center)
        align = (top - offset[pred]) / dist.clamp(min=torch.finfo(dtype).tiny)
        return -(align + self.alpha * torch.linalg.vector_norm(z, ord=1, dim=1)) if self.alpha else -align


class fDBD(HeadMixin, FeaturesDetector):  # noqa: N801 - the paper's spelling
    r"""Fast decision-boundary distance, normalised by the distance to the ID mean.

    Fit: the ID-train feature mean :math:`\mu`. Score, with :math:`\hat c = \arg\max_c l_c(z)`:

    .. math:: s(x) = -\frac{1}{C - 1} \sum_{c \ne \hat c}
              \frac{l_{\hat c}(z) - l_c(z)}{\lVert w_{\hat c} - w_c \rVert_2 \, \lVert z - \mu \rVert_2}

    i.e. the mean distance from :math:`z` to the decision boundaries of the predicted class
    (closed form for a linear head) over the distance to the mean. Pairs with
    :math:`w_{\hat c} = w_c` (no boundary) contribute 0; :math:`\lVert z - \mu\rVert` is clamped
    at :math:`10^{-8}`. Hyperparameter-free. Equal to pytorch-ood 0.4.0.

    Paper: Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024
    (arXiv:2312.11536).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (C, D), b (C,))`` tuple
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None):
        super().__init__(model)
        self._set_head(head)
        self.center: Optional[Tensor] = None  #: mu, (D,) float64
        self.inv_gaps: Optional[Tensor] = None  #: 1 / ||w_i - w_j|| (0 on the diagonal / equal rows), (C, C)

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "fDBD":
        z, _ = self._head_features(z, y, finite=False)  # the mean is the value check (one pass fewer)
        self.center = mean64(z.detach(), exact=False)  # a centre: ~1e-7 is plenty
        if not require_finite(self, z, self.center):  # finite features, float32 block sums overflowed
            self.center = mean64(z.detach())
        w = self.w.to(z.device).double()
        gaps = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")  # exact, no cancellation
        self.inv_gaps = torch.where(gaps > 0, 1.0 / gaps, torch.zeros_like(gaps)).fill_diagonal_(0.0)
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.w.shape[1], finite=False)  # checked through the norms below
        dtype, device = z.dtype, z.device
        logits = self.logits(z)
        top, pred = logits.max(dim=1)
        n_classes = logits.shape[1]
        inv = self.inv_gaps.to(device=device, dtype=dtype)[pred]
        dist = ((top[:, None] - logits) * inv).sum(dim=1) / max(n_classes - 1, 1)
        norm = centred_norms(z, self.center)
        require_finite(self, z, norm)
        norm = norm.clamp(min=1e-8)
        return -dist / norm
