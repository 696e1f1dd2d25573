"""DICE: the energy of the logits of a sparsified classifier head."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Interval, Param, Percent
from ..streaming import Chunks, mean_of_stream
from .head import LOGIT_SCORE, Head, HeadMixin
from .numerics import percentiles


class DICE(HeadMixin, FeaturesDetector):
    r"""DICE: directed sparsification of the head by the ID contributions of its weights, then the energy.

    Fit: the mean ID-train feature :math:`\bar z` (float64; one pass, which ``fit_rows`` streams), the
    contributions :math:`V_{cj} = \bar z_j W_{cj}`, and the threshold :math:`\tau` = the ``p``-th percentile
    (numpy's linear interpolation) of all :math:`V_{cj}`; the head keeps the weights with :math:`V_{cj} > \tau`, the top
    :math:`(100 - p)\%` contributions: :math:`\tilde W = W \odot \mathbb 1[V > \tau]`. Score:

    .. math:: s(x) = S(\tilde W z + b), \qquad S = \text{energy: } -\log\sum_c e^{l_c} \text{ (default)}

    or ``detector`` (``"msp"``, ``"maxlogit"``, or a function of the logits, :data:`~.head.LOGIT_SCORE`).

    Paper: Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022
    (arXiv:2111.09805); code github.com/deeplearning-wisc/dice. Search grid
    :math:`p \in \{10, 30, 50, 70, 90\}` (percent; OpenOOD's config uses 90), no data-relative bound.

    ``p`` is the sparsity in percent, in :math:`(1, 100)`: a value in :math:`(0, 1]` is refused with a hint
    (pytorch-ood's fraction ``p=0.9`` is written ``p=90`` here), ``p = 100`` too (it drops every weight:
    constant scores). ``p = 0`` is accepted: it means the same in both units, and keeps every weight but the
    smallest contribution(s) (:math:`V > \min V`), i.e. nearly the plain energy score.

    pytorch-ood 0.4.0: ``DICE(encoder, w, b, p, detector=None)`` — the same positional order and names here
    (``encoder=`` for ``model``), ``head=`` (an ``nn.Linear`` or ``(w, b)``, :mod:`.head`) accepted instead of
    ``w``, ``b``. Differences: ``p`` is in percent (above), default 90; ``detector`` also takes
    ``"energy"`` / ``"msp"`` / ``"maxlogit"`` (``None`` = energy, as there); the threshold is computed from
    float64 contributions.

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param w: head weights ``(C, D)`` (or pass ``head``)
    :param b: head bias ``(C,)`` (``None``: zeros)
    :param p: percentage of the weight contributions dropped
    :param detector: scoring of the sparsified logits (:data:`~.head.LOGIT_SCORE`)
    :param head: the classifier, instead of ``w`` and ``b`` (:func:`~.head.parse_head`)
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "p": Param(Interval(float, 1, 100, closed="neither", hint=Percent("p").hint), Interval(float, 0, 0),
                   doc="percentage of the weight contributions dropped (sparsity), in (1, 100), or 0"),
        "detector": LOGIT_SCORE,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"p": {"grid": [10, 30, 50, 70, 90]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, w: Optional[Tensor] = None,
                 b: Optional[Tensor] = None, p: float = 90.0, detector: Any = "energy", head: Head = None):
        super().__init__(model)
        self._set_head(head, w=w, b=b)
        self.p = p
        self.detector = detector

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(z, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        self._require_head()
        mean = mean_of_stream(chunks())  # one pass
        w = self.w.to(mean.device)
        contrib = mean[None, :] * w.double()  # V_cj = mean_i z_ij * W_cj
        self.threshold = percentiles(contrib, [self.p])[0]  #: tau
        self.masked_w = torch.where(contrib > self.threshold, w, torch.zeros_like(w))  #: W masked, (C, D)

    def _score(self, z: Tensor) -> Tensor:
        return self._score_logits(z @ self.masked_w.to(z).T + self.b.to(z), self.detector)
