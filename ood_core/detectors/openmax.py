"""OpenMax (Weibull-recalibrated logits) with a torch Weibull maximum-likelihood fit (no libMR)."""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..api import LogitsDetector
from .probability import _check_logits, _fit_logits


def weibull_mle(x: Tensor, mask: Tensor, iters: int = 60) -> Tuple[Tensor, Tensor]:
    r"""Maximum-likelihood shape :math:`k` and scale :math:`\lambda` of a 2-parameter Weibull per row.

    ``x`` ``(R, T)`` positive values, ``mask`` ``(R, T)`` the valid entries (at least one per row).
    With :math:`u_i = \log x_i - \max_j \log x_j`, the MLE shape is the root of the increasing
    function :math:`g(k) = \sum_i u_i e^{k u_i} / \sum_i e^{k u_i} - 1/k - \bar u`, found by
    bisection on :math:`\log k \in [\log 10^{-6}, \log 10^{12}]` (vectorised over rows, float64);
    then :math:`\lambda = (\operatorname{mean}_i x_i^k)^{1/k}`. Rows whose values are all equal
    have no root and get :math:`k = 10^{12}` (a step at the value).
    """
    x = x.double()
    logx = torch.where(mask, x.clamp(min=1e-300).log(), torch.zeros_like(x))
    n = mask.sum(dim=1).to(x.dtype)
    top = torch.where(mask, logx, torch.full_like(x, -math.inf)).max(dim=1).values
    u = torch.where(mask, logx - top[:, None], torch.zeros_like(x))
    u_mean = u.sum(dim=1) / n

    def weights(k: Tensor) -> Tensor:
        return torch.where(mask, torch.exp(k[:, None] * u), torch.zeros_like(x))

    lo = torch.full_like(n, math.log(1e-6))
    hi = torch.full_like(n, math.log(1e12))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        k = mid.exp()
        e = weights(k)
        g = (e * u).sum(dim=1) / e.sum(dim=1) - 1.0 / k - u_mean
        up = g > 0
        hi = torch.where(up, mid, hi)
        lo = torch.where(up, lo, mid)
    k = (0.5 * (lo + hi)).exp()
    scale = torch.exp(top + torch.log(weights(k).sum(dim=1) / n) / k)
    return k, scale


def weibull_cdf(x: Tensor, k: Tensor, scale: Tensor) -> Tensor:
    """:math:`1 - \\exp(-(x/\\lambda)^k)` (0 for ``x <= 0``), broadcasting ``k`` and ``scale``."""
    z = k * (x.clamp(min=1e-300).log() - scale.log())
    return -torch.expm1(-torch.exp(z))


class OpenMax(LogitsDetector):
    r"""OpenMax: probability of the unknown class after Weibull recalibration of the top logits.

    Fit (float64, ID logits :math:`v` and labels; only correctly classified samples are used):
    per class :math:`c` the mean activation vector :math:`\mu_c`; the distances
    :math:`d(v, \mu_c) = \omega \lVert v - \mu_c\rVert_2 + (1 - \omega)(1 - \cos(v, \mu_c))`
    (``euclid_weight`` :math:`\omega`) of the class's samples; a Weibull fitted by maximum
    likelihood (:func:`weibull_mle`) to the ``tailsize`` largest, translated as libMR does,
    :math:`t = d + 10^4 - \min(\text{tail})`. Predict, for :math:`\alpha` = ``min(alpha, C)``:
    the classes ranked :math:`r = 1..\alpha` by logit get
    :math:`\omega_c = 1 - \frac{\alpha + 1 - r}{\alpha} \operatorname{WeibullCDF}_c(t(d(v, \mu_c)))`
    (other classes :math:`\omega_c = 1`; classes without fit data count as fully outlying,
    CDF = 1), revised logits :math:`\hat v_c = v_c \omega_c`, unknown activation
    :math:`\hat v_0 = \sum_c v_c (1 - \omega_c)`, and

    .. math:: s(x) = \operatorname{softmax}(\hat v_0, \hat v_1, \dots, \hat v_C)_0 .

    Scores do not depend on the batch: pytorch-ood 0.4.0 computes the distances only to the
    classes that are the top prediction of some sample *in the batch* (the others count as
    distance 0, i.e. not revised), so its score for a sample changes with the other samples
    it is scored with; with a batch covering every class as a top prediction both agree up to
    the Weibull fit (scipy's numerical optimiser there, the exact MLE here). pytorch-ood also
    fits on all samples of a label, correct or not, and clips revised logits at 709.

    Paper: Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016 (arXiv:1511.06233);
    code github.com/abhijitbendale/OSDN (libMR).

    :param model: optional callable returning logits (for ``fit``/``predict``)
    :param tailsize: number of largest distances per class the Weibull is fitted to
    :param alpha: number of top classes revised
    :param euclid_weight: :math:`\omega \in [0, 1]`, weight of the Euclidean vs cosine distance
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {
        "tailsize": {"grid": [10, 20, 50, 100]},
        "alpha": {"grid": [1, 2, 3, 5, 10]},
    }
    TRANSLATION = 10000.0  #: libMR's shift of the tail before the Weibull fit

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, tailsize: int = 20, alpha: int = 10,
                 euclid_weight: float = 1.0):
        super().__init__(model)
        for name, value in (("tailsize", tailsize), ("alpha", alpha)):
            if int(value) != value or int(value) < 1:
                raise ValueError(f"OpenMax: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(euclid_weight) <= 1.0:
            raise ValueError(f"OpenMax: euclid_weight must be in [0, 1], got {euclid_weight!r}")
        self.tailsize, self.alpha, self.euclid_weight = int(tailsize), int(alpha), float(euclid_weight)
        self.centers: Optional[Tensor] = None  #: mean activation vectors, (C, C) float64
        self.fitted: Optional[Tensor] = None  #: classes with a Weibull model, (C,) bool
        self.shape: Optional[Tensor] = None  #: Weibull shapes, (C,) float64
        self.scale: Optional[Tensor] = None  #: Weibull scales, (C,) float64
        self.tail_min: Optional[Tensor] = None  #: smallest tail distance per class, (C,) float64

    def _distances(self, v: Tensor, centers: Tensor) -> Tensor:
        """Distance of each row of ``v`` (N, C) to each center (K, C): (N, K), float64."""
        out = torch.zeros(v.shape[0], centers.shape[0], dtype=v.dtype, device=v.device)
        if self.euclid_weight > 0:
            eu = torch.cdist(v, centers, compute_mode="donot_use_mm_for_euclid_dist")
            out += self.euclid_weight * eu
        if self.euclid_weight < 1:
            vn = v / v.norm(dim=1, keepdim=True).clamp(min=1e-300)
            cn = centers / centers.norm(dim=1, keepdim=True).clamp(min=1e-300)
            out += (1.0 - self.euclid_weight) * (1.0 - vn @ cn.T)
        return out

    def _own_distances(self, v: Tensor, centers: Tensor) -> Tensor:
        """Distance of each row of ``v`` to the matching row of ``centers`` (both (N, C)): (N,)."""
        out = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        if self.euclid_weight > 0:
            out += self.euclid_weight * (v - centers).norm(dim=1)
        if self.euclid_weight < 1:
            cos = (v * centers).sum(dim=1) / (v.norm(dim=1) * centers.norm(dim=1)).clamp(min=1e-300)
            out += (1.0 - self.euclid_weight) * (1.0 - cos)
        return out

    @torch.no_grad()
    def fit_logits(self, logits: Tensor, y: Tensor) -> "OpenMax":
        logits, y = _fit_logits(self, logits, y)
        v = logits.detach().double()
        n_classes = v.shape[1]
        correct = v.argmax(dim=1) == y
        v, y = v[correct], y[correct]
        counts = torch.bincount(y, minlength=n_classes)
        centers = torch.zeros(n_classes, n_classes, dtype=v.dtype, device=v.device).index_add_(0, y, v)
        centers /= counts.clamp(min=1)[:, None].to(v.dtype)
        # own-class distances, grouped by class in descending order: rank within class < tailsize
        dist = self._own_distances(v, centers[y])
        order = torch.argsort(dist, descending=True, stable=True)
        order = order[torch.argsort(y[order], stable=True)]
        ys = y[order]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(ys), device=v.device) - starts[ys]
        keep = rank < self.tailsize
        tail = torch.zeros(n_classes, self.tailsize, dtype=v.dtype, device=v.device)
        mask = torch.zeros(n_classes, self.tailsize, dtype=torch.bool, device=v.device)
        tail[ys[keep], rank[keep]] = dist[order][keep]
        mask[ys[keep], rank[keep]] = True
        fitted = counts > 0
        mask[~fitted, 0] = True  # dummy entry, never used (fitted=False)
        tail_min = torch.where(mask, tail, torch.full_like(tail, math.inf)).min(dim=1).values
        k, scale = weibull_mle(tail + self.TRANSLATION - tail_min[:, None], mask)
        self.centers, self.fitted, self.shape, self.scale, self.tail_min = centers, fitted, k, scale, tail_min
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_logits(self, logits: Tensor) -> Tensor:
        self._require_fit()
        logits = _check_logits(self, logits, self.centers.shape[0])
        dtype, device = logits.dtype, logits.device
        v = logits.double()
        n, n_classes = v.shape
        centers = self.centers.to(device)
        rows = max(1, (1 << 22) // max(n_classes, 1))
        dist = torch.cat([self._distances(v[s : s + rows], centers) for s in range(0, n, rows)]) if n else \
            v.new_zeros(0, n_classes)
        t = dist + self.TRANSLATION - self.tail_min.to(device)
        cdf = weibull_cdf(t, self.shape.to(device), self.scale.to(device))
        cdf = torch.where(self.fitted.to(device), cdf, torch.ones_like(cdf))
        a = min(self.alpha, n_classes)
        rank_weight = (a + 1 - torch.arange(1, a + 1, dtype=v.dtype, device=device)) / a
        top = v.topk(a, dim=1).indices
        ranked = torch.zeros_like(v).scatter_(1, top, rank_weight.expand(n, a))
        omega = 1.0 - cdf * ranked
        revised = torch.cat([(v * (1.0 - omega)).sum(dim=1, keepdim=True), v * omega], dim=1)
        return torch.exp(revised[:, 0] - torch.logsumexp(revised, dim=1)).to(dtype)
