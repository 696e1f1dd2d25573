"""ReAct: rectified (clipped) penultimate activations, scored through the linear head."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector, InvalidInputError
from .head import Head, HeadMixin
from .logits import LOGIT_SCORES
from .mahalanobis import check_features, id_training_set
from .numerics import percentiles, row_slices


def percentile(x: Tensor, q: float) -> float:
    """``numpy.percentile(x, q)`` (linear interpolation) of all entries of ``x``, without sorting.

    Partial selection (``numpy.partition`` on CPU, two ``kthvalue`` calls elsewhere), so it works for any
    size (``torch.quantile`` is limited to 2^24 entries) and on the device of ``x``.
    """
    return percentiles(x, [q])[0]


class ReAct(HeadMixin, FeaturesDetector):
    r"""ReAct: clip penultimate features at :math:`c`, recompute logits, score them.

    .. math::
        s(x) = S\big(W \min(z, c) + b\big), \qquad
        S = \text{energy: } -\log\sum_i e^{l_i} \;|\; \text{msp: } -\max_i \operatorname{softmax}(l)_i
        \;|\; \text{maxlogit: } -\max_i l_i

    The threshold :math:`c` is either the absolute ``threshold`` or the ``percentile``-th
    percentile (in percent, 0-100) of all ID-train feature activations, computed by ``fit``
    (the paper and OpenOOD use the 90th percentile of the flattened activations). When neither
    is given, ``percentile=90``. ``requires_fit`` is an instance attribute: True only when the
    threshold comes from a percentile.

    Paper: Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
    NeurIPS 2021 (arXiv:2111.12797). Difference to pytorch-ood 0.4.0: there ``percentile`` is a
    fraction in [0, 1]; here it is in percent, like OpenOOD's search grid.

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (C, D), b (C,))`` tuple
    :param threshold: absolute clipping threshold :math:`c`
    :param percentile: percentile of ID-train activations used as :math:`c` (fitted)
    :param detector: scoring of the clipped logits: ``"energy"``, ``"msp"`` or ``"maxlogit"``
    """

    requires_fit: bool = True
    default_search_space: ClassVar[Dict[str, Any]] = {"percentile": {"grid": [85, 90, 95, 99]}}

    def __init__(
        self,
        model: Optional[Callable[[Tensor], Tensor]] = None,
        head: Head = None,
        threshold: Optional[float] = None,
        percentile: Optional[float] = None,
        detector: str = "energy",
    ):
        super().__init__(model)
        if threshold is not None and percentile is not None:
            raise ValueError("ReAct: give either threshold or percentile, not both")
        if threshold is None and percentile is None:
            percentile = 90.0
        if percentile is not None:
            percentile = float(percentile)
            if not 0 <= percentile <= 100:
                raise ValueError(f"ReAct: percentile must be in [0, 100] (percent), got {percentile!r}")
        if threshold is not None:
            threshold = float(threshold)
            if threshold != threshold:
                raise ValueError("ReAct: threshold is NaN")
        key = str(detector).lower()
        if key not in LOGIT_SCORES:
            raise ValueError(f"ReAct: detector must be one of {sorted(LOGIT_SCORES)}, got {detector!r}")
        self.detector = key
        self.percentile = percentile
        self.threshold = threshold
        self.requires_fit = percentile is not None
        self._set_head(head)

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "ReAct":
        if self.percentile is None:  # absolute threshold: nothing to fit
            self._mark_fitted()
            return self
        z, _ = id_training_set(self, z, y)
        self.threshold = percentile(z.detach(), self.percentile)
        self._mark_fitted()
        return self

    def logits(self, z: Tensor) -> Tensor:
        """Logits of the clipped features ``W min(z, c) + b``."""
        return super().logits(z.clamp(max=self.threshold))

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        self._require_head()
        z = check_features(self, z, self.w.shape[1])
        if self.threshold is None:  # pragma: no cover - guarded by requires_fit
            raise InvalidInputError("ReAct: no threshold")
        score = LOGIT_SCORES[self.detector]
        out = z.new_empty(z.shape[0])
        for rows in row_slices(z):  # the clipped features are cache-sized temporaries
            out[rows] = score(self.logits(z[rows]))
        return out
