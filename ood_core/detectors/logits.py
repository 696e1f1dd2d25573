"""Logit-based detectors: maximum softmax probability, maximum logit, energy.

All three need no fitting and score a batch of logits ``(N, C)``; higher = more OOD.
They run on the device and in the dtype of their input.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import InvalidInputError, LogitsDetector, check_input


def _shifted_exp(logits: Tensor, t: float = 1.0):
    """``(exp((f - m) / t), m)`` with the row maxima ``m`` ``(N, 1)``: the stable core of softmax / logsumexp.

    ``amax`` (no indices) and an in-place ``exp``: fewer passes than ``softmax(...).max(...)`` or
    ``logsumexp``, which matters for the cheap logit detectors.
    """
    if logits.shape[1] == 0:
        raise InvalidInputError("logits have no classes")
    m = logits.amax(dim=1, keepdim=True)
    e = logits - m
    if t != 1.0:
        e.div_(t)
    # exp is up to 30x slower on arguments that underflow; terms below exp(-80) (float32) are far
    # below the resolution of sums that contain the row maximum's exp(0) = 1
    return e.clamp_(min=-700.0 if e.dtype == torch.float64 else -80.0).exp_(), m


def _positive(detector: str, name: str, value) -> float:
    value = float(value)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{detector}: {name} must be a positive finite number, got {value!r}")
    return value


class MaxSoftmax(LogitsDetector):
    r"""Maximum softmax probability (MSP), optionally temperature-scaled.

    .. math:: s(x) = -\max_y \operatorname{softmax}(f(x) / T)_y

    computed stably as :math:`-\exp(\max_y f_y/T - \operatorname{logsumexp}(f/T))`.

    Paper: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", ICLR 2017 (arXiv:1610.02136).
    Temperature scaling as in ODIN (Liang et al., ICLR 2018).

    :param model: optional callable returning logits (for ``predict(x)``)
    :param t: temperature :math:`T > 0`
    """

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {"t": {"grid": [1, 2, 5, 10, 100, 1000]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, t: float = 1.0):
        super().__init__(model)
        self.t = _positive("MaxSoftmax", "t", t)

    @staticmethod
    def score(logits: Tensor, t: float = 1.0) -> Tensor:
        """Negative maximum softmax probability of ``logits / t`` (``(N, C)`` -> ``(N,)``).

        ``-1 / sum_y exp((f_y - max f) / t)`` (the largest term is exactly 1, so no overflow and no
        cancellation).
        """
        return -1.0 / _shifted_exp(logits, t)[0].sum(dim=1)

    @torch.no_grad()
    def predict_logits(self, logits: Tensor) -> Tensor:
        logits = check_input(self, logits, ndim=2, name="logits")
        return self.score(logits, self.t)


class MaxLogit(LogitsDetector):
    r"""Maximum logit.

    .. math:: s(x) = -\max_y f_y(x)

    Paper: Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
    ICML 2022 (arXiv:1911.11132).

    :param model: optional callable returning logits (for ``predict(x)``)
    """

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)

    @staticmethod
    def score(logits: Tensor) -> Tensor:
        """Negative maximum logit (``(N, C)`` -> ``(N,)``)."""
        return -logits.amax(dim=1)

    @torch.no_grad()
    def predict_logits(self, logits: Tensor) -> Tensor:
        logits = check_input(self, logits, ndim=2, name="logits")
        return self.score(logits)


class EnergyBased(LogitsDetector):
    r"""Energy score (free energy of the logits).

    .. math:: s(x) = E(x) = -T \log \sum_i e^{f_i(x) / T}

    Paper: Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020
    (arXiv:2010.03759).

    :param model: optional callable returning logits (for ``predict(x)``)
    :param t: temperature :math:`T > 0`
    """

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {"t": {"grid": [0.5, 1, 2, 5]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, t: float = 1.0):
        super().__init__(model)
        self.t = _positive("EnergyBased", "t", t)

    @staticmethod
    def score(logits: Tensor, t: float = 1.0) -> Tensor:
        """Energy ``-t * logsumexp(logits / t)`` (``(N, C)`` -> ``(N,)``).

        ``-t log sum exp(f / t)`` directly (no shift: one pass fewer); rows where the sum overflows or is
        too small for full precision are recomputed shifted by their maximum (each row's path depends
        only on that row).
        """
        x = logits if t == 1.0 else logits / t
        total = torch.exp(x).sum(dim=1)
        out = total.log().mul_(-t)
        if total.numel():
            lo, hi = torch.aminmax(total)
            finfo = torch.finfo(total.dtype)
            if not (bool(lo > finfo.tiny ** 0.5) and bool(hi < finfo.max)):  # NaN fails too
                rows = ~((total > finfo.tiny ** 0.5) & (total < finfo.max))
                e, m = _shifted_exp(logits[rows], t)
                out[rows] = -(m[:, 0] + t * e.sum(dim=1).log())
        return out

    @torch.no_grad()
    def predict_logits(self, logits: Tensor) -> Tensor:
        logits = check_input(self, logits, ndim=2, name="logits")
        return self.score(logits, self.t)


#: scoring functions on logits used by ReAct (and anything else that scores head outputs)
LOGIT_SCORES: Dict[str, Callable[[Tensor], Tensor]] = {
    "energy": EnergyBased.score,
    "msp": MaxSoftmax.score,
    "maxlogit": MaxLogit.score,
}
