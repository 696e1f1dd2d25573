"""Logit-based detectors: maximum softmax probability, maximum logit, energy.

None of them is fitted; each scores a batch of logits ``(N, C)`` (higher = more OOD) on the device and
in the dtype of its input. Their static ``score`` functions are pytorch-ood 0.4.0's (same names and
signatures; like theirs they also take ``(B, C, H, W)`` logits); :data:`LOGIT_SCORES` names them for the
detectors that score the output of a (modified) classifier head (ReAct, ASH, SCALE, VRA, DICE).
Difference to pytorch-ood 0.4.0 common to all three: ``predict_logits`` takes ``(N, C)`` only (segmentation
logits go through ``score``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import LogitsDetector
from ..constraints import Interval, Param

#: a temperature T > 0 (finite); it only changes the scoring
TEMPERATURE = Param(Interval(float, 0, math.inf, closed="neither"), structural=False, doc="temperature T > 0")


class MaxSoftmax(LogitsDetector):
    r"""Maximum softmax probability (MSP), optionally temperature-scaled.

    .. math:: s(x) = -\max_y \operatorname{softmax}(f(x) / T)_y

    Paper: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples
    in Neural Networks", ICLR 2017 (arXiv:1610.02136); code github.com/hendrycks/error-detection.
    Temperature as in ODIN (Liang et al., ICLR 2018, arXiv:1706.02690).

    pytorch-ood 0.4.0: ``MaxSoftmax(model, t=1.0)``; ``temperature=`` is accepted for ``t``.

    :param model: optional callable returning logits (for ``predict(x)``)
    :param t: temperature :math:`T > 0`
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {"t": TEMPERATURE}
    default_search_space: ClassVar[Dict[str, Any]] = {"t": {"grid": [1, 2, 5, 10, 100, 1000]}}
    aliases: ClassVar[Dict[str, str]] = {**LogitsDetector.aliases, "temperature": "t"}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, t: float = 1.0):
        super().__init__(model)
        self.t = t

    @staticmethod
    def score(logits: Tensor, t: float = 1.0) -> Tensor:
        """Negative maximum softmax probability of ``logits / t`` (classes along dim 1)."""
        return -torch.softmax(logits / t, dim=1).amax(dim=1)

    def _score(self, logits: Tensor) -> Tensor:
        return self.score(logits, self.t)


class MaxLogit(LogitsDetector):
    r"""Maximum logit.

    .. math:: s(x) = -\max_y f_y(x)

    Paper: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
    ICML 2022 (arXiv:1911.11132); code github.com/hendrycks/anomaly-seg.

    pytorch-ood 0.4.0: ``MaxLogit(model)``.

    :param model: optional callable returning logits (for ``predict(x)``)
    """

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)

    @staticmethod
    def score(logits: Tensor) -> Tensor:
        """Negative maximum logit (classes along dim 1)."""
        return -logits.amax(dim=1)

    def _score(self, logits: Tensor) -> Tensor:
        return self.score(logits)


class EnergyBased(LogitsDetector):
    r"""Energy score (free energy of the logits).

    .. math:: s(x) = E(x) = -T \log \sum_{i=1}^C e^{f_i(x) / T}

    Paper: Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020
    (arXiv:2010.03759); code github.com/wetliu/energy_ood.

    pytorch-ood 0.4.0: ``EnergyBased(model, t=1.0)``; ``temperature=`` is accepted for ``t``.

    :param model: optional callable returning logits (for ``predict(x)``)
    :param t: temperature :math:`T > 0`
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {"t": TEMPERATURE}
    default_search_space: ClassVar[Dict[str, Any]] = {"t": {"grid": [0.5, 1, 2, 5]}}
    aliases: ClassVar[Dict[str, str]] = {**LogitsDetector.aliases, "temperature": "t"}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, t: float = 1.0):
        super().__init__(model)
        self.t = t

    @staticmethod
    def score(logits: Tensor, t: float = 1.0) -> Tensor:
        """Energy ``-t * logsumexp(logits / t)`` (classes along dim 1)."""
        return -t * torch.logsumexp(logits / t, dim=1)

    def _score(self, logits: Tensor) -> Tensor:
        return self.score(logits, self.t)


#: scoring functions ``f(logits (N, C)) -> scores (N,)`` for the detectors that score a classifier head's
#: output (ReAct, ASH, SCALE, VRA, DICE): their ``detector`` option names one of these
LOGIT_SCORES: Dict[str, Callable[[Tensor], Tensor]] = {
    "energy": EnergyBased.score,
    "msp": MaxSoftmax.score,
    "maxlogit": MaxLogit.score,
}
