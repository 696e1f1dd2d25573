r"""Activation shaping before the linear head: ASH, SCALE, VRA (penultimate features or feature maps), RankFeat.

Each detector changes the activations :math:`a` that enter the classifier head, recomputes the logits and
scores them: :math:`s(x) = S(W \operatorname{pool}(a') + b)`, with :math:`S` = ``detector`` (energy by default;
:data:`~.head.LOGIT_SCORE`). The activations of one sample are either its pooled penultimate features
``z (D,)`` (``pool`` = identity; the registry runs ASH, SCALE and VRA on the cached ``"features"``, where the
ASH and SCALE papers apply them on ResNet-50) or its feature map ``(C, H, W)`` (``pool`` = global average
pooling; on ``(N, D)`` this is the same as on ``(N, D, 1, 1)``). Both ``fit_features`` / ``predict_features``
and ``fit_feature_maps`` / ``predict_feature_maps`` take either form.

pytorch-ood 0.4.0 has all four, as ``Name(backbone, head, ..., detector=None)`` on feature maps, with ``head``
any callable on the shaped maps. Here ``head`` must be linear (:func:`~.head.parse_head`; a
``nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)`` is read as ``fc``), which is the same computation
for pytorch-ood's usual head (average pooling + linear layer); percentiles are in percent, where pytorch-ood
takes fractions (``percentile=0.65`` is refused, with a hint how to write it in percent).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Mapping, Optional

import torch
from torch import Tensor

from ..api import FeatureMapsDetector, FeaturesDetector, InvalidInputError
from ..constraints import Boolean, Interval, Options, Param, ParameterError, Percent
from ..streaming import Chunks
from .head import LOGIT_SCORE, Head, HeadMixin
from .numerics import percentiles, percentiles_dim0, percentiles_dim0_of_stream, percentiles_of_stream

OPENOOD_PERCENTILES = [65, 70, 75, 80, 85, 90, 95]


def kept_count(n: int, percentile: float) -> int:
    """Activations kept per sample when the lowest ``percentile`` percent are pruned (at least 1), as in the
    ASH and SCALE code: ``k = n - round(n * percentile / 100)``."""
    return max(1, n - int(round(n * percentile / 100.0)))


def _exp_ratio(s1: Tensor, s2: Tensor) -> Tensor:
    """``exp(s1 / s2)`` per sample, with ``s1 / s2 := 1`` where ``s2 = 0`` (all-zero samples stay finite)."""
    zero = s2 == 0
    return torch.exp(torch.where(zero, torch.ones_like(s1), s1 / torch.where(zero, torch.ones_like(s2), s2)))


class _HeadShaper(HeadMixin, FeaturesDetector, FeatureMapsDetector):
    """Shaping + head + logit score. Subclasses implement :meth:`shape` (and VRA :meth:`_fit`)."""

    head_pooling: ClassVar[bool] = True
    _ndim: ClassVar[Optional[int]] = None  # (N, D) features or (N, C, H, W) maps, checked in _activations
    _input_name: ClassVar[str] = "activations"

    def shape(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Shaped activations: ``x`` is ``(N, D)`` or ``(N, C, H, W)``; same shape out."""
        raise NotImplementedError

    def _activations(self, x: Tensor) -> Tensor:
        if x.ndim not in (2, 4):
            raise InvalidInputError(f"{type(self).__name__}: activations must be features (N, D) or feature maps "
                                    f"(N, C, H, W), got shape {tuple(x.shape)}")
        return self._head_input(x, "activations")

    def _fit(self, x: Tensor, y: Tensor) -> None:
        self._activations(x)

    def _score(self, x: Tensor) -> Tensor:
        shaped = self.shape(self._activations(x))
        pooled = shaped.mean(dim=(2, 3)) if shaped.ndim == 4 else shaped
        return self._score_logits(self.logits(pooled), self.detector)


class ASH(_HeadShaper):
    r"""ASH: prune the lowest activations of each sample, then shape the rest (no fit).

    With :math:`a \in R^n` the activations of one sample (``n = D`` for features, ``C*H*W`` for feature maps),
    :math:`p` = ``percentile``, :math:`k = n - \operatorname{round}(n p / 100)` the number kept (:math:`\ge 1`)
    and :math:`T_k(a)` = :math:`a` with all but its :math:`k` largest entries set to 0:

    * ``ash-p``: :math:`a' = T_k(a)`
    * ``ash-b``: the :math:`k` kept entries all set to :math:`s_1 / k`, :math:`s_1 = \sum_j a_j`
    * ``ash-s``: :math:`a' = T_k(a) \exp(s_1 / s_2)`, :math:`s_2 = \sum_j T_k(a)_j` (:math:`s_1/s_2 := 1` when
      :math:`s_2 = 0`)

    Paper: Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection", ICLR 2023
    (arXiv:2209.09858); code github.com/andrijazz/ash.

    pytorch-ood 0.4.0: ``ASH(backbone, head, variant="ash-s", percentile=0.65, detector=None)`` — the same order
    here; ``percentile`` in percent (as in the paper's code and OpenOOD's grid), ``head`` linear (module doc).

    :param model: optional callable returning features or feature maps (for ``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param variant: ``"ash-p"``, ``"ash-b"`` or ``"ash-s"``
    :param percentile: percent of each sample's activations pruned
    :param detector: scoring of the logits (:data:`~.head.LOGIT_SCORE`)
    """

    VARIANTS = ("ash-p", "ash-b", "ash-s")
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "variant": Param(Options(*VARIANTS), structural=False),
        "percentile": Param(Percent("percentile"), structural=False, doc="percent of activations pruned"),
        "detector": LOGIT_SCORE,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"percentile": {"grid": list(OPENOOD_PERCENTILES)}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 variant: str = "ash-s", percentile: float = 65.0, detector: Any = "energy"):
        super().__init__(model)
        self._set_head(head)
        self.variant = variant
        self.percentile = percentile
        self.detector = detector

    def shape(self, x: Tensor) -> Tensor:
        a = x.reshape(x.shape[0], -1)
        k = kept_count(a.shape[1], self.percentile)
        kept, index = a.topk(k, dim=1, sorted=False)
        s1 = a.sum(dim=1, keepdim=True)
        if self.variant.lower() == "ash-b":
            kept = (s1 / k).expand_as(kept)
        out = torch.zeros_like(a).scatter_(1, index, kept)
        if self.variant.lower() == "ash-s":
            out = out * _exp_ratio(s1, kept.sum(dim=1, keepdim=True))
        return out.reshape(x.shape)


class SCALE(_HeadShaper):
    r"""SCALE: scale all activations of a sample by :math:`\exp(s_1 / s_2)`, without pruning (no fit).

    :math:`a' = a \exp(s_1 / s_2)`, :math:`s_1 = \sum_j a_j` over all :math:`n` activations of the sample,
    :math:`s_2` = the sum of its :math:`k = n - \operatorname{round}(n p / 100)` largest (as in :class:`ASH`;
    :math:`s_1/s_2 := 1` when :math:`s_2 = 0`).

    Paper: Xu et al., "Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
    ICLR 2024 (arXiv:2310.00227); code github.com/kai422/SCALE.

    pytorch-ood 0.4.0: ``SCALE(backbone, head, percentile=0.65, detector=None)`` — the same order here;
    ``percentile`` in percent, ``head`` linear (module doc).

    :param model: optional callable returning features or feature maps (for ``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param percentile: percent of the activations left out of :math:`s_2`
    :param detector: scoring of the logits (:data:`~.head.LOGIT_SCORE`)
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "percentile": Param(Percent("percentile"), structural=False, doc="percent of activations left out of s2"),
        "detector": LOGIT_SCORE,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"percentile": {"grid": list(OPENOOD_PERCENTILES)}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 percentile: float = 65.0, detector: Any = "energy"):
        super().__init__(model)
        self._set_head(head)
        self.percentile = percentile
        self.detector = detector

    def shape(self, x: Tensor) -> Tensor:
        a = x.reshape(x.shape[0], -1)
        k = kept_count(a.shape[1], self.percentile)
        factor = _exp_ratio(a.sum(dim=1), a.topk(k, dim=1, sorted=False).values.sum(dim=1))
        return x * factor.reshape(-1, *([1] * (x.ndim - 1)))


class VRA(_HeadShaper):
    r"""VRA-P: zero the activations below :math:`\alpha`, clip those above :math:`\beta` (fitted thresholds).

    .. math::
        a'_j = \begin{cases} 0 & a_j < \alpha \\ a_j & \alpha \le a_j \le \beta \\ \beta & a_j > \beta
        \end{cases}

    :math:`\alpha`, :math:`\beta` are the ``lower_percentile`` / ``upper_percentile`` percentiles (in percent) of
    the ID-train activations, over all entries (``per_dimension=False``) or per activation entry
    (``per_dimension=True``: thresholds of shape ``D`` or ``C x H x W``). ``below="clip"`` sets the entries below
    :math:`\alpha` to :math:`\alpha` instead of 0. The defaults 60 / 90 are the quantiles of the paper's CIFAR-10
    command (``--q1 0.6 --q2 0.9``).

    Paper: Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for Out-of-distribution Detection",
    NeurIPS 2023 (arXiv:2302.11716); code github.com/zeroQiaoba/VRA.

    pytorch-ood 0.4.0: ``VRA(backbone, head, lower_percentile=0.01, upper_percentile=0.99, detector=None)`` — the
    same order here, then ``per_dimension``, ``below``. Differences: percentiles in percent; its VRA clamps each
    entry into per-entry quantiles, which is ``VRA(..., per_dimension=True, below="clip")`` here (the defaults here
    are the paper's VRA-P); ``head`` linear (module doc). ``lower_percentile`` may be 1 (the 1st percentile):
    as a fraction 1.0 would be a lower threshold at the maximum.

    :param model: optional callable returning features or feature maps (for ``fit``/``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param lower_percentile: percentile giving :math:`\alpha`, in percent
    :param upper_percentile: percentile giving :math:`\beta` (>= ``lower_percentile``), in percent
    :param detector: scoring of the logits (:data:`~.head.LOGIT_SCORE`)
    :param per_dimension: thresholds per activation entry instead of two scalars
    :param below: ``"zero"`` (VRA-P) or ``"clip"`` (pytorch-ood's variant)
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "lower_percentile": Param(Interval(float, 1, 100, hint="it is in percent: write lower_percentile=1 for the "
                                           "1st percentile (pytorch-ood's lower_percentile=0.01)"),
                                  doc="percentile giving alpha, in percent"),
        "upper_percentile": Param(Percent("upper_percentile"), doc="percentile giving beta, in percent"),
        "detector": LOGIT_SCORE,
        "per_dimension": Param(Boolean(), doc="thresholds per activation entry"),
        "below": Param(Options("zero", "clip"), structural=False, doc="entries below alpha: 0 or alpha"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {
        "lower_percentile": {"grid": [40, 50, 60, 70]},
        "upper_percentile": {"grid": [85, 90, 95, 99]},
    }

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 lower_percentile: float = 60.0, upper_percentile: float = 90.0, detector: Any = "energy",
                 per_dimension: bool = False, below: str = "zero"):
        super().__init__(model)
        self._set_head(head)
        self.lower_percentile = lower_percentile
        self.upper_percentile = upper_percentile
        self.detector = detector
        self.per_dimension = per_dimension
        self.below = below

    @classmethod
    def check_params(cls, params: Mapping[str, Any], data: Optional[Mapping[str, int]] = None) -> None:
        super().check_params(params, data)
        lo, hi = params.get("lower_percentile"), params.get("upper_percentile")
        if lo is not None and hi is not None and lo > hi:
            raise ParameterError(cls.__name__, "lower_percentile", f"{lo!r} must not exceed upper_percentile={hi!r}")

    def _fit(self, x: Tensor, y: Tensor) -> None:
        a = self._activations(x).reshape(x.shape[0], -1)
        qs = [self.lower_percentile, self.upper_percentile]
        if self.per_dimension:
            self.lower_, self.upper_ = (q.reshape(x.shape[1:]) for q in percentiles_dim0(a, qs))
        else:
            self.lower_, self.upper_ = percentiles(a, qs)
        self.sample_shape_ = tuple(x.shape[1:])

    def _fit_stream(self, chunks: Chunks) -> None:
        """The same thresholds from the rows' chunks, by exact selection in bounded memory: two passes for the
        two scalars (:func:`~.numerics.percentiles_of_stream`), four per entry (float32;
        :func:`~.numerics.percentiles_dim0_of_stream`)."""
        shapes = []

        def activations():
            for x, _ in chunks():
                shapes.append(tuple(x.shape[1:]))
                yield self._activations(x)

        qs = [self.lower_percentile, self.upper_percentile]
        if self.per_dimension:
            self.lower_, self.upper_ = percentiles_dim0_of_stream(activations, qs)
        else:
            self.lower_, self.upper_ = percentiles_of_stream(activations, qs)
        self.sample_shape_ = shapes[0]

    def shape(self, x: Tensor) -> Tensor:
        if self.per_dimension and tuple(x.shape[1:]) != self.sample_shape_:
            raise InvalidInputError(f"VRA: per-dimension thresholds were fitted for activations of shape "
                                    f"{self.sample_shape_}, got {tuple(x.shape[1:])}")
        lo, hi = self.lower_, self.upper_
        if isinstance(lo, Tensor):
            lo, hi = lo.to(device=x.device, dtype=x.dtype), hi.to(device=x.device, dtype=x.dtype)
        clipped = x.clamp(max=hi)
        if self.below.lower() == "clip":
            return clipped.clamp(min=lo)
        return torch.where(x < lo, torch.zeros_like(x), clipped)


def remove_rank1(f: Tensor, method: str = "svd", iterations: int = 20) -> Tensor:
    r"""``X - \sigma_1 u_1 v_1^\top`` for each sample's ``X (C, H*W)``; ``f`` is ``(N, C, H, W)``.

    ``"svd"``: exact (batched ``torch.linalg.svd``); ``"power"``: ``iterations`` steps of batched power iteration
    (the official code's "power iteration as SVD substitute for acceleration", 20 steps there, from a random
    start; here from a fixed one, so scores are deterministic).
    """
    n, c, h, w = f.shape
    m = f.reshape(n, c, h * w)
    if method.lower() == "svd":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return (m - s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])).reshape(f.shape)
    tiny = torch.finfo(f.dtype).tiny
    v = 1.0 + torch.arange(h * w, device=f.device, dtype=f.dtype) / (10.0 * h * w)
    v = (v / v.norm()).expand(n, h * w)
    for _ in range(iterations):
        u = (m @ v[:, :, None])[:, :, 0]
        u = u / u.norm(dim=1, keepdim=True).clamp_min(tiny)
        v = (m.transpose(1, 2) @ u[:, :, None])[:, :, 0]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(tiny)
    sigma = (u[:, None, :] @ m @ v[:, :, None]).reshape(n, 1, 1)
    return (m - sigma * (u[:, :, None] @ v[:, None, :])).reshape(f.shape)


class RankFeat(_HeadShaper):
    r"""RankFeat: remove the rank-1 component of each sample's feature map, then head + score (no fit).

    With :math:`X \in R^{C \times HW}` the feature map of one sample and :math:`\sigma_1, u_1, v_1` its largest
    singular value and singular vectors:

    .. math:: X' = X - \sigma_1 u_1 v_1^\top, \qquad s(x) = S\big(W \operatorname{mean}_{hw}(X') + b\big)

    Feature maps only (``(N, C, H, W)``, e.g. the last block's output); a pooled feature vector is a rank-1
    matrix and would be removed entirely.

    Paper: Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection", NeurIPS 2022
    (arXiv:2209.08590); code github.com/KingJamesSong/RankFeat.

    pytorch-ood 0.4.0: ``RankFeat(backbone, head, detector=None)`` (exact SVD) — the same order here, then
    ``method``, ``iterations``; ``head`` linear (module doc).

    :param model: optional callable returning feature maps (for ``predict``)
    :param head: the classifier, reading the maps' channels (:func:`~.head.parse_head`)
    :param detector: scoring of the logits (:data:`~.head.LOGIT_SCORE`)
    :param method: ``"svd"`` (exact) or ``"power"`` (power iteration, :func:`remove_rank1`)
    :param iterations: power-iteration steps
    """

    representation: ClassVar[str] = "feature_maps"
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "detector": LOGIT_SCORE,
        "method": Param(Options("svd", "power"), structural=False),
        "iterations": Param(Interval(int, 1, None), structural=False, doc="power-iteration steps"),
    }

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 detector: Any = "energy", method: str = "svd", iterations: int = 20):
        super().__init__(model)
        self._set_head(head)
        self.detector = detector
        self.method = method
        self.iterations = iterations

    def shape(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise InvalidInputError(f"RankFeat: works on feature maps (N, C, H, W), got shape {tuple(x.shape)}")
        return remove_rank1(x, self.method, int(self.iterations))
