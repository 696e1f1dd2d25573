"""ReAct: rectified (clipped) penultimate activations, scored through the linear head."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Interval, Param, Percent
from ..quantiles import quantiles_of_stream, top_digits_of_stream
from ..streaming import Chunks, shared
from .head import LOGIT_SCORE, Head, HeadMixin
from .numerics import percentiles


def percentile(x: Tensor, q: float) -> float:
    """``numpy.percentile(x, q)`` (linear interpolation) of all entries of ``x``: exact, any size, on ``x``'s
    device (:func:`~.numerics.percentiles`)."""
    return percentiles(x, [q])[0]


class ReAct(HeadMixin, FeaturesDetector):
    r"""ReAct: clip the penultimate features at :math:`c`, recompute the logits, score them.

    .. math::
        s(x) = S\big(W \min(z, c) + b\big), \qquad c = \text{the } p\text{-th percentile of all ID-train
        activations } z_{ij}

    :math:`S` is ``detector``: energy :math:`-\log\sum_i e^{l_i}` (default), ``"msp"``
    :math:`-\max_i \operatorname{softmax}(l)_i`, ``"maxlogit"`` :math:`-\max_i l_i`, or any function of the logits
    returning outlier scores (pytorch-ood's ``EnergyBased.score``, ...). ``fit`` computes :math:`c` from
    ``percentile`` :math:`p` (in percent; the paper and OpenOOD use the 90th percentile of the flattened
    activations); an absolute ``threshold``, when given, is used instead and no fit is needed. In memory
    :math:`c` is an exact partial selection (:func:`~.numerics.percentiles`); ``fit_rows`` streams the rows
    and selects exactly in two passes of bounded memory (:func:`~ood_core.quantiles.quantiles_of_stream`:
    ``numpy.percentile``'s arithmetic, which can differ from the in-memory interpolation in the last bit of the
    float64 threshold); the first pass does not depend on the percentile and is shared by the percentiles a
    search tries (:func:`~ood_core.streaming.shared`).

    Paper: Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021
    (arXiv:2111.12797); code github.com/deeplearning-wisc/react.

    pytorch-ood 0.4.0: ``ReAct(backbone, head, threshold=None, percentile=0.9, detector=None)`` — the same
    positional order and names here (``backbone=`` for ``model``). Differences: ``percentile`` is in percent
    (``percentile=0.9`` is refused with the hint to write 90); ``head`` must be linear (:mod:`.head`), not any
    callable, and ReAct clips the features the head reads (pooled penultimate features), where pytorch-ood clips
    whatever its backbone returns; a given ``threshold`` is never overwritten by ``fit`` (the fitted value is
    ``threshold_``).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param threshold: absolute clipping threshold :math:`c`; ``None`` = the fitted percentile
    :param percentile: percentile of the ID-train activations giving :math:`c`, in percent
    :param detector: scoring of the clipped logits (:data:`~.head.LOGIT_SCORE`)
    """

    streams_fit: ClassVar[bool] = True
    shared_statistics: ClassVar[Tuple[str, ...]] = ("entry_top_digits",)
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "threshold": Param(Interval(float), None, structural=False, doc="absolute clipping threshold"),
        "percentile": Param(Percent("percentile"), doc="percentile of the ID-train activations, in percent"),
        "detector": LOGIT_SCORE,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"percentile": {"grid": [85, 90, 95, 99]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 threshold: Optional[float] = None, percentile: float = 90.0, detector: Any = "energy"):
        super().__init__(model)
        self._set_head(head)
        self.threshold = threshold
        self.percentile = percentile
        self.detector = detector

    @property
    def requires_fit(self) -> bool:  # an absolute threshold needs no fit
        return self.threshold is None

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._require_head()
        self.threshold_ = percentile(z, self.percentile)

    def _fit_stream(self, chunks: Chunks) -> None:
        self._require_head()
        # exact, in bounded memory: the first pass (counts of the entries' top bits) is shared by every percentile
        # a search tries, the second is this percentile's
        first = shared(chunks, "entry_top_digits", lambda: top_digits_of_stream(chunks))
        self.threshold_ = quantiles_of_stream(chunks, [self.percentile], first=first)[0]

    def _score(self, z: Tensor) -> Tensor:
        c = self.threshold if self.threshold is not None else self.threshold_
        return self._score_logits(self.logits(self._head_input(z).clamp(max=c)), self.detector)
