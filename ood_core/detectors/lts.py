r"""LTS: logit scaling by the ratio of a sample's total activation to its top activations (no fit)."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Param, Percent
from .head import LOGIT_SCORE, Head, HeadMixin
from .shaping import kept_count


def lts_scale(z: Tensor, percentile: float) -> Tensor:
    r"""The per-sample factor :math:`S(z) = (s_1 / s_2)^2` ``(N,)`` of :class:`LTS` (``s_1 / s_2 := 1`` where
    :math:`s_2 = 0`, i.e. where no activation is positive)."""
    a = torch.relu(z)
    s1 = a.sum(dim=1)
    s2 = a.topk(kept_count(a.shape[1], percentile), dim=1, sorted=False).values.sum(dim=1)
    zero = s2 == 0
    return torch.where(zero, torch.ones_like(s1), s1 / torch.where(zero, torch.ones_like(s2), s2)).square()


class LTS(HeadMixin, FeaturesDetector):
    r"""LTS (logit scaling): the logits multiplied by a per-sample factor from the penultimate features, then scored.

    With :math:`a = \max(0, z)` the rectified features (:math:`D` entries), :math:`p` = ``percentile`` and
    :math:`k = D - \operatorname{round}(D p / 100)` (at least 1), :math:`s_1 = \sum_j a_j`, :math:`s_2` = the sum of
    the :math:`k` largest :math:`a_j`:

    .. math:: S(z) = \Big(\frac{s_1}{s_2}\Big)^2, \qquad s(x) = \mathrm{score}\big(S(z)\,(W z + b)\big)

    with ``score`` = ``detector`` (energy by default: :math:`-\log \sum_c e^{S(z) l_c(z)}`; higher = more OOD).
    The head receives the unrectified :math:`z`. :math:`s_1/s_2 := 1` where :math:`s_2 = 0` (no positive activation:
    the official code divides by zero there).

    Official code (https://github.com/andrijazz/lts, ``lts.py``): the ReLU before the sums (not in the paper's
    formula; it matters for features that can be negative, e.g. transformers) and ``percentile=95`` in every
    configuration it ships, followed here. Not in OpenOOD; default search space: {65, 80, 90, 95}, from OpenOOD's
    ASH/SCALE percentile grid, with the official 95.

    Paper: Djurisic, Liu & Nikolic, "Logit Scaling for Out-of-Distribution Detection", Machine Vision and
    Applications 2025 (arXiv:2409.01175).

    pytorch-ood 0.4.0 ``LTS(encoder, head, p=0.05, detector=None)``: the same order here, but ``percentile`` is in
    percent of the activations left out of :math:`s_2` (the official code's unit): pytorch-ood's ``p`` is the
    fraction kept, ``percentile = 100 (1 - p)`` (``p=0.05`` is ``percentile=95``); ``head`` linear (``parse_head``).
    Same scores (``tests/detectors/test_lts_pnml.py``).

    :param model: optional callable returning penultimate features (for ``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param percentile: percent of the rectified activations left out of :math:`s_2`
    :param detector: scoring of the scaled logits (:data:`~.head.LOGIT_SCORE`)
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "percentile": Param(Percent("percentile"), structural=False, doc="percent of activations left out of s2"),
        "detector": LOGIT_SCORE,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"percentile": {"grid": [65, 80, 90, 95]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 percentile: float = 95.0, detector: Any = "energy"):
        super().__init__(model)
        self._set_head(head)
        self.percentile = percentile
        self.detector = detector

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._head_input(z)

    def _score(self, z: Tensor) -> Tensor:
        z = self._head_input(z)
        return self._score_logits(self.logits(z) * lts_scale(z, self.percentile)[:, None], self.detector)
