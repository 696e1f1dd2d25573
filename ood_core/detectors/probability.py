"""Probability-based detectors on logits: temperature scaling, KL matching, entropy, GEN, weighted energy.

OpenMax, the other probability-based detector, lives in :mod:`.openmax`.

Each scores a batch of logits ``(N, C)`` (higher = more OOD) on the device of the input; a sample's
score depends only on that sample and the fitted state (never on the batch). Difference to pytorch-ood
0.4.0 common to all: ``predict_logits`` takes ``(N, C)`` only; segmentation logits ``(B, C, H, W)`` go
through the static ``score`` functions (Entropy, GEN, WeightedEBO: pytorch-ood's names and signatures).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import LogitsDetector
from ..constraints import C, Constraint, Interval, Param
from ..streaming import Chunks, ClassMoments
from .logits import MaxSoftmax


def _minimise_convex(slope: Callable[[float], Tuple[float, float]], start: float, lo: float, hi: float,
                     rtol: float = 1e-10, iters: int = 100) -> float:
    """Minimiser in ``[lo, hi]`` of a convex function of one variable, given ``slope(x) -> (f'(x), f''(x))``:
    Newton steps inside a shrinking bracket, a geometric bisection when a step leaves it. A flat function
    (``f'(start) = 0``) stays at ``start``; a minimum at or beyond a bound returns that bound."""
    g, h = slope(start)
    if g == 0.0:
        return start
    if slope(hi)[0] <= 0.0:
        return hi
    if slope(lo)[0] >= 0.0:
        return lo
    x = start
    for _ in range(iters):
        lo, hi = (x, hi) if g < 0 else (lo, x)
        new = x - g / h if h > 0 else math.nan
        if not lo < new < hi:
            new = math.sqrt(lo * hi)
        if abs(new - x) <= rtol * x or hi <= lo * (1 + rtol):
            return new
        x = new
        g, h = slope(x)
        if g == 0.0:
            return x
    return x


class TemperatureScaling(LogitsDetector):
    r"""Maximum softmax probability at the temperature that calibrates the ID logits.

    .. math::
        T^\ast = \arg\min_{T \in [10^{-2}, 10^3]} -\frac1N \sum_i \log \operatorname{softmax}(f(x_i)/T)_{y_i},
        \qquad s(x) = -\max_y \operatorname{softmax}(f(x)/T^\ast)_y

    The NLL is convex in :math:`\beta = 1/T`, with slope :math:`\operatorname{mean}_i(E_{p_i}[f] - f_{y_i})`
    and curvature :math:`\operatorname{mean}_i \operatorname{Var}_{p_i}[f]`
    (:math:`p_i = \operatorname{softmax}(\beta f(x_i))`): its minimiser is found by safeguarded Newton steps
    (float64), so the fitted :math:`T` is the optimum (``t``; ``nll`` is the ID NLL there).

    Fit data: the paper (and pytorch-ood's docs) fit :math:`T` on held-out ID validation data; like
    pytorch-ood, this class fits on what ``fit`` is given — in a sweep, the ID training set. On the training
    set of a network that separates it, the NLL keeps falling as :math:`T \to 0`, and :math:`T^\ast` ends
    at the lower bound (many tied scores).

    Paper: Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (arXiv:1706.04599);
    code github.com/gpleiss/temperature_scaling.

    pytorch-ood 0.4.0: ``TemperatureScaling(model)``. Difference: pytorch-ood runs at most 50 L-BFGS
    iterations of step 0.01 on :math:`T` itself (an approximate optimum) and stores ``t`` as a
    ``Parameter``; ours converges to the optimum, so :math:`T` (and the scores) can differ.

    :param model: optional callable returning logits (for ``fit``/``predict``)
    """

    requires_fit: ClassVar[bool] = True
    T_MIN, T_MAX = 1e-2, 1e3

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)
        self.t: Optional[float] = None  #: fitted temperature
        self.nll: Optional[float] = None  #: ID NLL at the fitted temperature

    def _fit(self, logits: Tensor, y: Tensor) -> None:
        f = logits.double()
        f_y = f.gather(1, y[:, None])[:, 0]

        def slope(beta: float) -> Tuple[float, float]:
            p = torch.softmax(beta * f, dim=1)
            mean = (p * f).sum(dim=1)  # E_p[f]
            var = (p * (f - mean[:, None]) ** 2).sum(dim=1)  # Var_p[f]
            return float((mean - f_y).mean()), float(var.mean())

        beta = _minimise_convex(slope, 1.0, 1.0 / self.T_MAX, 1.0 / self.T_MIN)
        self.t = 1.0 / beta
        self.nll = float(F.cross_entropy(f * beta, y))

    def _score(self, logits: Tensor) -> Tensor:
        return MaxSoftmax.score(logits, self.t)


class KLMatching(LogitsDetector):
    r"""KL divergence of the posterior to the closest typical posterior of a predicted class.

    Fit (no labels needed; labels < 0 drop rows; one pass, which ``fit_rows`` streams): for each class
    :math:`k` predicted for at least one ID sample, the typical posterior
    :math:`d_k = \operatorname{mean}_{i: \arg\max p(x_i) = k} p(x_i)`, :math:`p = \operatorname{softmax}(f)`
    (float64). Score:

    .. math:: s(x) = \min_k D_{KL}\big[p(x) \,\Vert\, d_k\big]
                   = \min_k \sum_y p_y(x) \big(\log p_y(x) - \log d_{k,y}\big)

    (the test posterior first, as in the paper), with :math:`\log p` from ``log_softmax`` and
    :math:`\log d_{k,y}` floored at the log of the smallest normal number of the input dtype.

    Paper: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
    ICML 2022 (arXiv:1911.11132); code github.com/hendrycks/anomaly-seg.

    pytorch-ood 0.4.0: ``KLMatching(model)``; equal scores up to float rounding. Difference: pytorch-ood
    replaces :math:`\log 0` by the dtype's lowest finite value (a term that can overflow to inf), ours by
    the log of its smallest normal number (a large, finite term).

    :param model: optional callable returning logits (for ``fit``/``predict``)
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)
        self.templates: Optional[Tensor] = None  #: typical posteriors d_k, (K, C) float64
        self.template_classes: Optional[Tensor] = None  #: predicted class k of each template, (K,)

    def _fit(self, logits: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(logits, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        n_classes = self.n_features_in_
        classes = torch.arange(n_classes)
        posteriors = ClassMoments(n_classes, torch.zeros(n_classes), classes, scatter=None)
        for logits, _ in chunks():  # one pass: the count and float64 sum of p per predicted class
            p = torch.softmax(logits.double(), dim=1)
            posteriors.update(p, p.argmax(dim=1))
        present = posteriors.counts > 0
        self.templates = posteriors.sums[present] / posteriors.counts[present, None]
        self.template_classes = present.nonzero().flatten()

    def _score(self, logits: Tensor) -> Tensor:
        floor = math.log(torch.finfo(logits.dtype).tiny)
        log_d = self.templates.to(logits.device).log().clamp(min=floor).to(logits.dtype)
        log_p = torch.log_softmax(logits, dim=1)
        p = log_p.exp()
        kl = (p * log_p).sum(dim=1, keepdim=True) - p @ log_d.T  # (N, K)
        return kl.amin(dim=1)


class Entropy(LogitsDetector):
    r"""Shannon entropy of the softmax posterior.

    .. math:: s(x) = H(p(x)) = -\sum_{y=1}^C p_y \log p_y, \qquad p = \operatorname{softmax}(f(x))

    with :math:`\log p` from ``log_softmax`` (exact also for :math:`p_y \to 0`, where the term is 0).

    Paper: the classic uncertainty baseline; as OOD score e.g. Chan et al., "Entropy Maximization and
    Meta Classification for Out-of-Distribution Detection in Semantic Segmentation", ICCV 2021
    (arXiv:2012.06575).

    pytorch-ood 0.4.0: ``Entropy(model)``, ``Entropy.score(logits)``. Difference: pytorch-ood clips
    :math:`p` to :math:`[10^{-7}, 1]` (a difference below :math:`1.7 \cdot 10^{-6}` per clipped class).

    :param model: optional callable returning logits (for ``predict(x)``)
    """

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)

    @staticmethod
    def score(logits: Tensor) -> Tensor:
        """Entropy of ``softmax(logits)`` (classes along dim 1)."""
        log_p = torch.log_softmax(logits, dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)

    def _score(self, logits: Tensor) -> Tensor:
        return self.score(logits)


class GEN(LogitsDetector):
    r"""Generalized entropy of the top-:math:`M` softmax probabilities.

    .. math:: s(x) = G_\gamma(p) = \sum_{j=1}^{M} p_{(j)}^\gamma \, (1 - p_{(j)})^\gamma

    where :math:`p_{(1)} \ge p_{(2)} \ge \dots` are the sorted probabilities of
    :math:`\operatorname{softmax}(f(x))`, :math:`M \le C` (``M=None``: all classes) and :math:`\gamma > 0`.
    For a probability above 1/2, :math:`1 - p` is computed as the sum of the other probabilities, so that
    confident samples keep distinct scores in float32 (where :math:`p_{(1)}` rounds to 1).

    Paper: Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
    CVPR 2023 (no arXiv); code github.com/XixiLiu95/GEN.

    Default search space: OpenOOD's grid, :math:`\gamma \in \{0.01, 0.1, 0.5, 1, 2, 5, 10\}` and
    :math:`M \in \{10, 50, 100, 200, 500, 1000\}`, adapted to the class count: values of :math:`M`
    above :math:`C` are dropped, and :math:`M = C` is used when none is left.

    pytorch-ood 0.4.0: ``GEN(model, gamma=0.1, M=None)``, ``GEN.score(logits, gamma, M)``. Differences:
    pytorch-ood averages instead of summing (a factor :math:`1/\min(M, C)`), clamps :math:`p` to
    :math:`[10^{-7}, 1 - 10^{-7}]`, and takes :math:`M > C` as :math:`C`; our detector refuses
    :math:`M > C` (a declared bound; the static ``score`` takes it as :math:`C`, like theirs).

    :param model: optional callable returning logits (for ``predict(x)``)
    :param gamma: exponent :math:`\gamma > 0`
    :param M: number of largest probabilities summed, :math:`1 \le M \le C` (``None`` = all classes)
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "gamma": Param(Interval(float, 0, math.inf, closed="neither"), structural=False, doc="exponent"),
        "M": Param(Interval(int, 1, C), None, structural=False, doc="top probabilities summed; None = all"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {
        "gamma": {"grid": [0.01, 0.1, 0.5, 1, 2, 5, 10]},
        "M": {"grid": [10, 50, 100, 200, 500, 1000]},
    }

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, gamma: float = 0.1,
                 M: Optional[int] = None):
        super().__init__(model)
        self.gamma = gamma
        self.M = M

    @classmethod
    def search_space(cls, data: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        space = super().search_space(data)
        if data and data.get("C") and "M" not in space:
            space["M"] = {"grid": [int(data["C"])]}  # every grid value exceeds C: the top C are all classes
        return space

    @staticmethod
    def score(logits: Tensor, gamma: float = 0.1, M: Optional[int] = None) -> Tensor:
        """``G_gamma`` of the ``M`` largest probabilities of ``softmax(logits)`` (classes along dim 1)."""
        p = torch.softmax(logits, dim=1)
        big = p > 0.5  # at most one class per sample: its 1 - p as the sum of the others (no cancellation)
        one_minus = torch.where(big, p.masked_fill(big, 0.0).sum(dim=1, keepdim=True), 1.0 - p)
        terms = p.pow(gamma) * one_minus.pow(gamma)
        if M is not None and M < p.shape[1]:
            terms = terms.gather(1, p.topk(int(M), dim=1).indices)  # the M largest probabilities
        return terms.sum(dim=1)

    def _score(self, logits: Tensor) -> Tensor:
        return self.score(logits, self.gamma, self.M)


class ClassWeights(Constraint):
    """Class weights: a 1-D (or ``1 x C``) finite tensor or sequence with a positive entry; ``C`` entries."""

    def problem(self, value, data=None):
        try:
            w = torch.as_tensor(value).detach().double()
        except (TypeError, ValueError, RuntimeError):
            return "must be a tensor or sequence of numbers"
        if w.ndim > 2 or (w.ndim == 2 and w.shape[0] != 1):
            return f"must have shape (C,) or (1, C), got {tuple(w.shape)}"
        w = w.reshape(-1)
        if not bool(torch.isfinite(w).all()) or not bool((w > 0).any()):
            return "must be finite with at least one positive entry"
        if data and data.get("C") is not None and w.numel() != data["C"]:
            return f"must have C={data['C']} entries (one per class), got {w.numel()}"
        return None


class WeightedEBO(LogitsDetector):
    r"""Energy of the logits with per-class weights.

    .. math:: s(x) = -\log \sum_{c=1}^C \max(w_c, 0)\, e^{f_c(x)}
                   = -\operatorname{logsumexp}_c \big(f_c(x) + \log \max(w_c, 0)\big)

    (the second, stable form is computed; classes with :math:`w_c \le 0` drop out). With ``weights``
    given (e.g. VOS's learned ``weight_energy`` layer) nothing is fitted; with ``weights=None`` the weights
    are fitted as the ID class frequencies :math:`w_c = N_c / N` (our choice: VOS learns them jointly with
    the network), i.e. the energy of a class-prior weighted mixture.

    Paper: Du et al., "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", ICLR 2022
    (arXiv:2202.01197); code github.com/deeplearning-wisc/vos.

    pytorch-ood 0.4.0: ``WeightedEBO(model, weights)``, ``WeightedEBO.score(logits, weights)``; equal
    scores. Differences: pytorch-ood requires ``weights`` and sums :math:`w_c e^{f_c}` directly
    (overflowing for logits > 88 in float32); ours also fits them when ``weights=None``.

    :param model: optional callable returning logits (for ``fit``/``predict``)
    :param weights: class weights ``(C,)`` or ``(1, C)`` (negative entries count as 0), or ``None`` to fit
    """

    requires_fit: ClassVar[bool] = True  # when weights=None (a given ``weights`` needs no fit)
    streams_fit: ClassVar[bool] = True  # the class counts, one pass
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "weights": Param(ClassWeights(), None, doc="class weights (C,); None = fitted class frequencies"),
    }

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None,
                 weights: Optional[Sequence[float]] = None):
        super().__init__(model)
        self.weights = weights
        self.class_weights: Optional[Tensor] = None  #: fitted weights (C,) float64 (weights=None)

    @staticmethod
    def score(logits: Tensor, weights: Tensor) -> Tensor:
        """Weighted energy of ``logits`` (classes along dim 1) with class ``weights`` ``(C,)``."""
        w = torch.as_tensor(weights).detach().to(logits.device, torch.float64).reshape(-1, *[1] * (logits.ndim - 2))
        log_w = w.clamp(min=0).log().to(logits.dtype)  # log 0 = -inf: the class drops out
        return -torch.logsumexp(logits + log_w, dim=1)

    def _require_fit(self) -> None:
        if self.weights is None:
            super()._require_fit()

    def _fit(self, logits: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(logits, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        if self.weights is None:
            counts = sum(torch.bincount(y, minlength=self.n_features_in_) for _, y in chunks()).double()
            self.class_weights = counts / counts.sum()

    def _score(self, logits: Tensor) -> Tensor:
        return self.score(logits, self.class_weights if self.weights is None else self.weights)
