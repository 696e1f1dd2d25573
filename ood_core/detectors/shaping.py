"""Activation shaping before the linear head: ASH, SCALE, VRA (penultimate features or feature maps), RankFeat.

Each detector changes the activations that enter the classifier head, recomputes the logits and scores
them (energy by default, ``detector="msp"`` / ``"maxlogit"`` as in :class:`~.react.ReAct`).

* On pooled penultimate features ``z (N, D)`` (``predict_features``; the registry runs ASH, SCALE and
  VRA on the cached ``"features"``) the shaping acts on the ``D`` activations of each sample, then
  ``logits = W z' + b``. This is where the ASH and SCALE papers apply them on ResNet-50 (after the last
  average pooling).
* On feature maps ``f (N, C, H, W)`` (``predict_feature_maps``) the shaping acts on all ``C*H*W``
  activations of each sample, then global average pooling, then the head:
  ``logits = W mean_{hw} f' + b``. On ``(N, D)`` this is the same as above (``H = W = 1``).

``head`` is an ``nn.Linear`` or a ``(w (K, D), b (K,))`` tuple. Everything runs in the dtype and on the
device of the input.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ..api import FeatureMapsDetector, FeaturesDetector, InvalidInputError, check_input
from .head import Head, HeadMixin
from .logits import LOGIT_SCORES
from .mahalanobis import id_training_set
from .numerics import percentiles, percentiles_dim0, row_slices

OPENOOD_PERCENTILES = [65, 70, 75, 80, 85, 90, 95]


def _check_percentile(name: str, key: str, value, upper_open: bool = False) -> float:
    value = float(value)
    ok = 0 <= value < 100 if upper_open else 0 <= value <= 100
    if not ok:
        raise ValueError(f"{name}: {key} must be in [0, 100{')' if upper_open else ']'} (percent), got {value!r}")
    return value


def kept_count(n: int, percentile: float) -> int:
    """Activations kept per sample when the lowest ``percentile`` percent are pruned (at least 1), as in ASH:
    ``k = n - round(n * percentile / 100)``."""
    return max(1, n - int(round(n * percentile / 100.0)))


def _sum_ratio(total: Tensor, kept: Tensor) -> Tensor:
    """``total / kept`` with 1 where ``kept == 0`` (all-zero samples), so the scaling stays finite."""
    safe = torch.where(kept == 0, torch.ones_like(kept), kept)
    return torch.where(kept == 0, torch.ones_like(total), total / safe)


class _HeadShaper(HeadMixin, FeaturesDetector, FeatureMapsDetector):
    """Shared machinery: head, input checks, pooling, logit scoring. Subclasses implement :meth:`shape`."""

    maps_only: ClassVar[bool] = False

    def __init__(self, model=None, head: Head = None, detector: str = "energy"):
        super().__init__(model)
        name = type(self).__name__
        key = str(detector).lower()
        if key not in LOGIT_SCORES:
            raise ValueError(f"{name}: detector must be one of {sorted(LOGIT_SCORES)}, got {detector!r}")
        self.detector = key
        self._set_head(head)

    def shape(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Shaped activations: ``x`` is ``(N, D)`` or ``(N, C, H, W)``; same shape out."""
        raise NotImplementedError

    def _check(self, x, feature_maps: bool) -> Tensor:
        name = type(self).__name__
        self._require_fit()
        self._require_head()
        if feature_maps:
            x = check_input(self, x, ndim=4, name="feature maps")
            dim = x.shape[1]
        else:
            x = check_input(self, x, ndim=2, name="features")
            dim = x.shape[1]
        if dim != self.w.shape[1]:
            raise InvalidInputError(
                f"{name}: {'feature maps have' if feature_maps else 'features have'} {dim} channels, but the "
                f"head expects dimension {self.w.shape[1]}"
            )
        return x

    def logits(self, shaped: Tensor) -> Tensor:
        """Head output of shaped activations (global average pooling first for feature maps)."""
        return super().logits(shaped.mean(dim=(2, 3)) if shaped.ndim == 4 else shaped)

    def _score(self, x: Tensor) -> Tensor:
        score = LOGIT_SCORES[self.detector]
        out = x.new_empty(x.shape[0])
        for rows in row_slices(x):  # the shaped activations are cache-sized temporaries
            out[rows] = score(self.logits(self.shape(x[rows])))
        return out

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        if self.maps_only:
            raise InvalidInputError(f"{type(self).__name__}: works on feature maps (N, C, H, W) only")
        return self._score(self._check(z, feature_maps=False))

    @torch.no_grad()
    def predict_feature_maps(self, feature_maps: Tensor) -> Tensor:
        return self._score(self._check(feature_maps, feature_maps=True))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Score raw inputs: ``model(x)`` gives features ``(N, D)`` or feature maps ``(N, C, H, W)``."""
        out = self._require_model()(x)
        return self.predict_feature_maps(out) if out.ndim == 4 else self.predict_features(out)

    def fit(self, data_loader):
        if not self.requires_fit:
            return self
        out, y = self._collect(data_loader, self._require_model())
        return self.fit_feature_maps(out, y) if out.ndim == 4 else self.fit_features(out, y)

    def fit_features(self, z: Tensor, y: Tensor):
        self._mark_fitted()
        return self

    def fit_feature_maps(self, feature_maps: Tensor, y: Tensor):
        self._mark_fitted()
        return self


class ASH(_HeadShaper):
    r"""ASH: prune the lowest activations of each sample, then shape the rest (no fit).

    With :math:`a \in R^n` the activations of one sample (``n = D`` for features, ``C*H*W`` for feature
    maps), :math:`p` = ``percentile`` and :math:`k = n - \operatorname{round}(n p / 100)` the number kept
    (:math:`\ge 1`), :math:`T_k(a)` = ``a`` with all but its :math:`k` largest entries set to 0:

    * ``ash-p``: :math:`a' = T_k(a)`
    * ``ash-b``: the kept entries all set to :math:`s_1 / k`, :math:`s_1 = \sum_j a_j`
    * ``ash-s``: :math:`a' = T_k(a) \cdot \exp(s_1 / s_2)`, :math:`s_2 = \sum_j T_k(a)_j`
      (:math:`s_1/s_2 := 1` for an all-zero sample)

    Score: :math:`s(x) = -\log \sum_i e^{l_i}`, :math:`l = W\,\operatorname{pool}(a') + b` (energy;
    ``detector`` selects msp / maxlogit instead); ``pool`` is global average pooling for feature maps,
    the identity for features.

    Paper: Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection",
    ICLR 2023 (arXiv:2209.09858). Relation to pytorch-ood 0.4.0: its ``percentile`` is a fraction in
    [0, 1] (here percent, as in the paper's code and OpenOOD's grid) and it passes the shaped maps to a
    user-given head; with head = average pooling + linear the scores are equal.

    :param model: optional callable returning features or feature maps (for ``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (K, D), b (K,))`` tuple
    :param percentile: percent of each sample's activations pruned, in [0, 100)
    :param variant: ``"ash-p"``, ``"ash-b"`` or ``"ash-s"``
    :param detector: scoring of the logits: ``"energy"``, ``"msp"`` or ``"maxlogit"``
    """

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {"percentile": {"grid": list(OPENOOD_PERCENTILES)}}
    VARIANTS = ("ash-p", "ash-b", "ash-s")

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 percentile: float = 65.0, variant: str = "ash-s", detector: str = "energy"):
        super().__init__(model, head, detector)
        self.percentile = _check_percentile("ASH", "percentile", percentile, upper_open=True)
        variant = str(variant).lower()
        if variant not in self.VARIANTS:
            raise ValueError(f"ASH: variant must be one of {self.VARIANTS}, got {variant!r}")
        self.variant = variant

    def shape(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        k = kept_count(flat.shape[1], self.percentile)
        values, index = flat.topk(k, dim=1, sorted=False)  # order is irrelevant: half the time
        total = flat.sum(dim=1)
        if self.variant == "ash-b":
            values = (total / k)[:, None].expand_as(values)
        out = torch.zeros_like(flat).scatter_(1, index, values)
        if self.variant == "ash-s":
            out = out * torch.exp(_sum_ratio(total, values.sum(dim=1)))[:, None]
        return out.reshape(x.shape)


class SCALE(_HeadShaper):
    r"""SCALE: scale all activations of a sample by :math:`\exp(s_1 / s_2)`, without pruning (no fit).

    :math:`s_1 = \sum_j a_j` over all activations of the sample, :math:`s_2` = the sum of its :math:`k`
    largest, :math:`k = n - \operatorname{round}(n p / 100)` (as in :class:`ASH`);
    :math:`a' = a \exp(s_1 / s_2)` (:math:`s_1/s_2 := 1` for an all-zero sample). Score: energy of
    :math:`W\,\operatorname{pool}(a') + b`.

    Paper: Xu et al., "Scaling for Training Time and Post-hoc Out-of-distribution Detection
    Enhancement", ICLR 2024 (arXiv:2310.00227). pytorch-ood 0.4.0: same, ``percentile`` as a fraction.

    :param model: optional callable returning features or feature maps (for ``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (K, D), b (K,))`` tuple
    :param percentile: percent of activations treated as pruned for :math:`s_2`, in [0, 100)
    :param detector: scoring of the logits: ``"energy"``, ``"msp"`` or ``"maxlogit"``
    """

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {"percentile": {"grid": list(OPENOOD_PERCENTILES)}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 percentile: float = 65.0, detector: str = "energy"):
        super().__init__(model, head, detector)
        self.percentile = _check_percentile("SCALE", "percentile", percentile, upper_open=True)

    def scale_factor(self, x: Tensor) -> Tensor:
        """Per-sample factor :math:`\\exp(s_1 / s_2)`, ``(N,)``."""
        flat = x.reshape(x.shape[0], -1)
        k = kept_count(flat.shape[1], self.percentile)
        return torch.exp(_sum_ratio(flat.sum(dim=1), flat.topk(k, dim=1, sorted=False).values.sum(dim=1)))

    def shape(self, x: Tensor) -> Tensor:
        return x * self.scale_factor(x).reshape(-1, *([1] * (x.ndim - 1)))


class VRA(_HeadShaper):
    r"""VRA-P: zero the activations below :math:`\alpha`, clip those above :math:`\beta` (fitted thresholds).

    .. math::
        a'_j = \begin{cases} 0 & a_j < \alpha \\ a_j & \alpha \le a_j \le \beta \\ \beta & a_j > \beta
        \end{cases}, \qquad s(x) = -\log \sum_i e^{l_i}, \quad l = W\,\operatorname{pool}(a') + b

    :math:`\alpha`, :math:`\beta` are the ``lower_percentile`` / ``upper_percentile`` percentiles (in
    percent) of the ID-train activations, over all entries (``per_dimension=False``, default) or per
    activation entry (``per_dimension=True``: thresholds of shape ``D`` or ``C x H x W``). The defaults
    60 / 90 are the quantiles of the paper's CIFAR-10 command (``--q1 0.6 --q2 0.9``).

    Paper: Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for Out-of-distribution
    Detection", NeurIPS 2023 (arXiv:2302.11716). Relation to pytorch-ood 0.4.0: its VRA clamps each
    entry into ``[q_low, q_high]`` with per-entry quantiles (fractions); that is
    ``VRA(per_dimension=True, below="clip")`` with the percentiles times 100.

    :param model: optional callable returning features or feature maps (for ``fit``/``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (K, D), b (K,))`` tuple
    :param lower_percentile: percentile (0-100) giving :math:`\alpha`
    :param upper_percentile: percentile (0-100) giving :math:`\beta` (>= ``lower_percentile``)
    :param per_dimension: thresholds per activation entry instead of global scalars
    :param below: ``"zero"`` (VRA-P) or ``"clip"`` (set to :math:`\alpha`, pytorch-ood's variant)
    :param detector: scoring of the logits: ``"energy"``, ``"msp"`` or ``"maxlogit"``
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {
        "lower_percentile": {"grid": [40, 50, 60, 70]},
        "upper_percentile": {"grid": [85, 90, 95, 99]},
    }

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 lower_percentile: float = 60.0, upper_percentile: float = 90.0, per_dimension: bool = False,
                 below: str = "zero", detector: str = "energy"):
        super().__init__(model, head, detector)
        self.lower_percentile = _check_percentile("VRA", "lower_percentile", lower_percentile)
        self.upper_percentile = _check_percentile("VRA", "upper_percentile", upper_percentile)
        if self.lower_percentile > self.upper_percentile:
            raise ValueError("VRA: lower_percentile must not exceed upper_percentile")
        if below not in ("zero", "clip"):
            raise ValueError(f"VRA: below must be 'zero' or 'clip', got {below!r}")
        self.per_dimension = bool(per_dimension)
        self.below = below
        self.lower: Union[float, Tensor, None] = None  #: alpha (float, or per-entry tensor)
        self.upper: Union[float, Tensor, None] = None  #: beta
        self.sample_shape: Optional[Tuple[int, ...]] = None

    def _fit(self, x: Tensor, y: Tensor) -> "VRA":
        flat, _ = id_training_set(self, x.reshape(x.shape[0], -1), y, name="activations")
        flat = flat.detach()
        qs = [self.lower_percentile, self.upper_percentile]
        if self.per_dimension:  # both percentiles from one partial selection
            self.lower, self.upper = (v.reshape(x.shape[1:]) for v in percentiles_dim0(flat, qs))
        else:
            self.lower, self.upper = percentiles(flat, qs)
        self.sample_shape = tuple(x.shape[1:])
        self._mark_fitted()
        return self

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "VRA":
        return self._fit(check_input(self, z, ndim=2, name="features"), y)

    @torch.no_grad()
    def fit_feature_maps(self, feature_maps: Tensor, y: Tensor) -> "VRA":
        return self._fit(check_input(self, feature_maps, ndim=4, name="feature maps"), y)

    def shape(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.sample_shape and self.per_dimension:
            raise InvalidInputError(
                f"VRA: per-dimension thresholds were fitted for shape {self.sample_shape}, got {tuple(x.shape[1:])}"
            )
        lo, hi = self.lower, self.upper
        if isinstance(lo, Tensor):
            lo, hi = lo.to(device=x.device, dtype=x.dtype), hi.to(device=x.device, dtype=x.dtype)
        clipped = x.clamp(max=hi)
        if self.below == "clip":
            return clipped.clamp(min=lo)
        return torch.where(x < lo, torch.zeros_like(x), clipped)


def remove_rank1(f: Tensor, method: str = "svd", iterations: int = 20) -> Tensor:
    r"""Subtract :math:`\sigma_1 u_1 v_1^\top` from each sample's ``(C, H*W)`` matrix; ``f`` is ``(N, C, H, W)``.

    ``method="svd"``: exact (batched ``torch.linalg.svd``); ``"power"``: ``iterations`` steps of
    batched power iteration from a fixed start vector (the RankFeat code's fast approximation).
    """
    n, c, h, w = f.shape
    m = f.reshape(n, c, h * w)
    if method == "svd":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        rank1 = s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    else:
        hw = h * w
        v = 1.0 + torch.arange(hw, device=f.device, dtype=f.dtype) / (10.0 * max(hw, 1))
        v = (v / v.norm()).expand(n, hw).clone()
        tiny = torch.finfo(f.dtype).tiny
        u = torch.zeros(n, c, device=f.device, dtype=f.dtype)
        for _ in range(max(1, int(iterations))):
            u = (m @ v[:, :, None]).squeeze(2)
            u = u / u.norm(dim=1, keepdim=True).clamp_min(tiny)
            v = (m.transpose(1, 2) @ u[:, :, None]).squeeze(2)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(tiny)
        sigma = (u[:, None, :] @ m @ v[:, :, None]).reshape(n, 1, 1)
        rank1 = sigma * (u[:, :, None] @ v[:, None, :])
    return (m - rank1).reshape(n, c, h, w)


class RankFeat(_HeadShaper):
    r"""RankFeat: remove the rank-1 component of each sample's feature map, then head + energy (no fit).

    With :math:`X \in R^{C \times HW}` the feature map of one sample and :math:`\sigma_1, u_1, v_1` its
    largest singular value and singular vectors:

    .. math:: X' = X - \sigma_1 u_1 v_1^\top, \qquad
              s(x) = -\log \sum_i e^{l_i}, \quad l = W \operatorname{mean}_{hw}(X') + b

    Feature maps only (``(N, C, H, W)``, e.g. the last block's output, extracted with reduction
    ``"none"``); pooled features have rank 1 and would be removed entirely.

    Paper: Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection",
    NeurIPS 2022 (arXiv:2209.08590). pytorch-ood 0.4.0: same (exact SVD), with a user-given head.

    :param model: optional callable returning feature maps (for ``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (K, C), b (K,))`` tuple
    :param method: ``"svd"`` (exact) or ``"power"`` (power iteration)
    :param iterations: power-iteration steps
    :param detector: scoring of the logits: ``"energy"``, ``"msp"`` or ``"maxlogit"``
    """

    representation: ClassVar[str] = "feature_maps"
    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {}
    maps_only: ClassVar[bool] = True

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 method: str = "svd", iterations: int = 20, detector: str = "energy"):
        super().__init__(model, head, detector)
        if method not in ("svd", "power"):
            raise ValueError(f"RankFeat: method must be 'svd' or 'power', got {method!r}")
        if int(iterations) < 1:
            raise ValueError(f"RankFeat: iterations must be >= 1, got {iterations!r}")
        self.method = method
        self.iterations = int(iterations)

    def shape(self, x: Tensor) -> Tensor:
        return remove_rank1(x, self.method, self.iterations)
