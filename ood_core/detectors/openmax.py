"""OpenMax (Weibull-recalibrated logits), with the Weibull fitted by exact maximum likelihood in torch
(no libMR, no scipy)."""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..api import LogitsDetector
from ..constraints import Interval, Param


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
    top = logx.masked_fill(~mask, -math.inf).amax(dim=1)
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
        up = (e * u).sum(dim=1) / e.sum(dim=1) - 1.0 / k - u_mean > 0
        hi = torch.where(up, mid, hi)
        lo = torch.where(up, lo, mid)
    k = (0.5 * (lo + hi)).exp()
    scale = torch.exp(top + torch.log(weights(k).sum(dim=1) / n) / k)
    return k, scale


def weibull_cdf(x: Tensor, k: Tensor, scale: Tensor) -> Tensor:
    """:math:`1 - \\exp(-(x/\\lambda)^k)` (0 for ``x <= 0``), broadcasting ``k`` and ``scale``."""
    z = k * (x.clamp(min=1e-300).log() - scale.log())
    return -torch.expm1(-torch.exp(z))


def largest_per_class(values: Tensor, labels: Tensor, n_classes: int, size: int) -> Tuple[Tensor, Tensor]:
    """The ``size`` largest ``values`` of each class: ``(n_classes, size)`` and the mask of filled entries."""
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # grouped by class, descending within
    cls = labels[order]
    counts = torch.bincount(labels, minlength=n_classes)
    rank = torch.arange(len(cls), device=values.device) - (torch.cumsum(counts, 0) - counts)[cls]
    keep = rank < size
    out = values.new_zeros(n_classes, size)
    mask = torch.zeros(n_classes, size, dtype=torch.bool, device=values.device)
    out[cls[keep], rank[keep]] = values[order][keep]
    mask[cls[keep], rank[keep]] = True
    return out, mask


class OpenMax(LogitsDetector):
    r"""OpenMax: probability of the unknown class after Weibull recalibration of the top logits.

    Fit (float64, ID logits :math:`v` and labels; only correctly classified samples are used): per class
    :math:`c` the mean activation vector :math:`\mu_c`; the distances
    :math:`d(v, \mu_c) = \omega \lVert v - \mu_c\rVert_2 + (1 - \omega)(1 - \cos(v, \mu_c))`
    (``euclid_weight`` :math:`\omega`) of the class's samples; a Weibull fitted by maximum likelihood
    (:func:`weibull_mle`) to the ``tailsize`` largest, translated as libMR does,
    :math:`t = d + 10^4 - \min(\text{tail})`. Score, with :math:`\alpha` = ``min(alpha, C)``: the classes
    ranked :math:`r = 1..\alpha` by logit get
    :math:`\omega_c = 1 - \frac{\alpha + 1 - r}{\alpha} \operatorname{WeibullCDF}_c(t(d(v, \mu_c)))`
    (other classes :math:`\omega_c = 1`; classes without fit data count as fully outlying, CDF = 1),
    revised logits :math:`\hat v_c = v_c \omega_c`, unknown activation
    :math:`\hat v_0 = \sum_c v_c (1 - \omega_c)`, and

    .. math:: s(x) = \operatorname{softmax}(\hat v_0, \hat v_1, \dots, \hat v_C)_0 .

    Paper: Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016 (arXiv:1511.06233);
    code github.com/abhijitbendale/OSDN (libMR).

    Default search space: tailsize in {10, 20, 50, 100}, alpha in {1, 2, 3, 5, 10} without the values
    above C (they revise all C classes, as alpha = C does).

    pytorch-ood 0.4.0: ``OpenMax(model, tailsize=25, alpha=10, euclid_weight=1.0)``. Differences: our
    default tailsize is the paper's (and OpenOOD's) 20; pytorch-ood computes the distances only to the
    classes that are the top prediction of some sample *in the batch* (the others count as distance 0,
    not revised), so its score for a sample changes with the batch, ours does not; with a batch holding
    every class as a top prediction both agree up to the Weibull fit (scipy's numerical optimiser there,
    the exact MLE here). pytorch-ood also fits on all samples of a label, correct or not, and clips
    revised logits at 709.

    :param model: optional callable returning logits (for ``fit``/``predict``)
    :param tailsize: number of largest distances per class the Weibull is fitted to
    :param alpha: number of top classes revised (``alpha > C`` revises all C)
    :param euclid_weight: :math:`\omega \in [0, 1]`, weight of the Euclidean vs the cosine distance
    """

    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "tailsize": Param(Interval(int, 1, None), doc="largest distances per class fitted"),
        "alpha": Param(Interval(int, 1, None), structural=False, doc="top classes revised (min(alpha, C))"),
        "euclid_weight": Param(Interval(float, 0, 1), doc="weight of the Euclidean vs the cosine distance"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {
        "tailsize": {"grid": [10, 20, 50, 100]},
        "alpha": {"grid": [1, 2, 3, 5, 10]},
    }
    TRANSLATION = 10000.0  #: libMR's shift of the tail before the Weibull fit

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, tailsize: int = 20, alpha: int = 10,
                 euclid_weight: float = 1.0):
        super().__init__(model)
        self.tailsize = tailsize
        self.alpha = alpha
        self.euclid_weight = euclid_weight
        self.centers: Optional[Tensor] = None  #: mean activation vectors, (C, C) float64
        self.fitted: Optional[Tensor] = None  #: classes with a Weibull model, (C,) bool
        self.shape: Optional[Tensor] = None  #: Weibull shapes, (C,) float64
        self.scale: Optional[Tensor] = None  #: Weibull scales, (C,) float64
        self.tail_min: Optional[Tensor] = None  #: smallest tail distance per class, (C,) float64

    @classmethod
    def search_space(cls, data: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        space = super().search_space(data)
        if data and data.get("C") and "grid" in space.get("alpha", {}):
            space["alpha"]["grid"] = [a for a in space["alpha"]["grid"] if a <= data["C"]] or [int(data["C"])]
        return space

    def _distance(self, v: Tensor, mu: Tensor) -> Tensor:
        """:math:`d(v, \\mu)` along the last dimension (broadcasting)."""
        w = self.euclid_weight
        cos = torch.nn.functional.cosine_similarity(v, mu, dim=-1, eps=1e-300)
        return w * (v - mu).norm(dim=-1) + (1.0 - w) * (1.0 - cos)

    def _fit(self, logits: Tensor, y: Tensor) -> None:
        v = logits.double()
        n_classes = v.shape[1]
        correct = v.argmax(dim=1) == y
        v, y = v[correct], y[correct]
        counts = torch.bincount(y, minlength=n_classes)
        centers = v.new_zeros(n_classes, n_classes).index_add_(0, y, v) / counts.clamp(min=1)[:, None]
        tail, mask = largest_per_class(self._distance(v, centers[y]), y, n_classes, int(self.tailsize))
        fitted = counts > 0
        mask[~fitted, 0] = True  # a dummy entry keeps their fit finite; unused (CDF = 1 for these classes)
        tail_min = tail.masked_fill(~mask, math.inf).amin(dim=1)
        self.shape, self.scale = weibull_mle(tail + self.TRANSLATION - tail_min[:, None], mask)
        self.centers, self.fitted, self.tail_min = centers, fitted, tail_min

    def _score(self, logits: Tensor) -> Tensor:
        v = logits.double()
        a = min(int(self.alpha), v.shape[1])
        top = v.topk(a, dim=1).indices  # (N, a): the classes ranked r = 1..a
        state = [s.to(v.device) for s in (self.centers, self.fitted, self.shape, self.scale, self.tail_min)]
        centers, fitted, shape, scale, tail_min = (s[top] for s in state)
        t = self._distance(v[:, None, :], centers) + self.TRANSLATION - tail_min
        cdf = torch.where(fitted, weibull_cdf(t, shape, scale), torch.ones_like(t))
        rank_weight = (a - torch.arange(a, dtype=v.dtype, device=v.device)) / a  # (a + 1 - r) / a
        omega = 1.0 - rank_weight * cdf
        v_top = v.gather(1, top)
        unknown = (v_top * (1.0 - omega)).sum(dim=1, keepdim=True)  # 1 - omega_c = 0 outside the top a
        revised = torch.cat([unknown, v.scatter(1, top, v_top * omega)], dim=1)
        return torch.softmax(revised, dim=1)[:, 0].to(logits.dtype)
