r"""CADRef / CARef: the relative error of a sample's features against its predicted class's mean feature."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Boolean, Options, Param
from .head import Head, HeadMixin
from .numerics import by_row_blocks, row_slices

#: the logit scores the official code offers (higher = more ID), by name
LOGIT_METHODS = ("energy", "msp", "maxlogit", "gen")


def id_logit_score(logits: Tensor, method: str) -> Tensor:
    r"""The official code's ID logit score :math:`S(l)` ``(N,)`` (higher = more ID): ``energy``
    :math:`\log\sum_c e^{l_c}`, ``msp`` :math:`\max_c p_c`, ``maxlogit`` :math:`\max_c l_c`, ``gen``
    :math:`1 / \sum_{c \in \text{top-}M} p_c^{\gamma} (1 - p_c)^{\gamma}` with :math:`\gamma = 0.1`,
    :math:`M = \max(\lfloor C/10 \rfloor, 10)` (all classes where :math:`C < M`)."""
    method = method.lower()
    if method == "energy":
        return torch.logsumexp(logits, dim=1)
    if method == "maxlogit":
        return logits.amax(dim=1)
    p = torch.softmax(logits, dim=1)
    if method == "msp":
        return p.amax(dim=1)
    top = p.topk(min(max(logits.shape[1] // 10, 10), logits.shape[1]), dim=1).values
    return 1.0 / (top.pow(0.1) * (1 - top).pow(0.1)).sum(dim=1)


def class_means(z: Tensor, classes: Tensor, n_classes: int) -> tuple:
    """Per-class sums of the rows of ``z`` as float64 ``(n_classes, D)`` and the counts ``(n_classes,)``, summed
    over row blocks (no float64 copy of ``z``)."""
    sums = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, device=z.device)
    for s in row_slices(z, width=2 * z.shape[1]):
        sums.index_add_(0, classes[s], z[s].double())
    return sums, torch.bincount(classes, minlength=n_classes)


class CADRef(HeadMixin, FeaturesDetector):
    r"""CADRef: class-aware decoupled relative feature error, scaled by a logit score (``decoupled=False``: CARef).

    Fit on ID-train features :math:`z_i` with the head's predictions :math:`\hat y_i = \arg\max_c l_c(z_i)`,
    :math:`l(z) = W z + b`: the class-aware mean features :math:`\mu_c = \operatorname{mean}\{z_i : \hat y_i = c\}`
    (grouped by the *predicted* class, as the official code does; the paper writes the label) and
    :math:`\bar S = \operatorname{mean}_i S(l(z_i))`, with :math:`S` the ID logit score ``logit_score``
    (:func:`id_logit_score`; energy by default). Score of :math:`z` with :math:`\hat y = \arg\max_c l_c(z)`,
    :math:`d = z - \mu_{\hat y}` and :math:`\sigma = \operatorname{sign}(w_{\hat y})` (the row of :math:`W` of the
    predicted class):

    .. math::
        E_+(z) = \frac{\lVert \max(0,\ d \odot \sigma) \rVert_1}{\lVert z \rVert_1}, \quad
        E_-(z) = \frac{\lVert \max(0,\ -d \odot \sigma) \rVert_1}{\lVert z \rVert_1}, \qquad
        s(x) = \frac{E_+(z)}{S(l(z))} + \frac{E_-(z)}{\bar S}

    (the official code returns :math:`-s` as the ID confidence). CARef (``decoupled=False``):
    :math:`s(x) = \lVert z - \mu_{\hat y} \rVert_1 / \lVert z \rVert_1`. Both in float64. Quirks of the official
    code kept: dividing by :math:`S` assumes a positive logit score (energy and max-logit can be negative, which
    flips the sign of the first term). Guards added: a class that no training sample is predicted as (the official
    mean is NaN) takes the mean of the training samples labelled with it, else of all; :math:`\lVert z \rVert_1 = 0`
    is taken as the smallest positive float64.

    ``logit_score`` is not structural: :math:`\bar S` is fitted for each of the four scores at once. Not in
    OpenOOD; default search space: the four logit scores of the official code (``--logit_method``; its default is
    energy).

    Paper: Ling, Chang, Zhao, Zhao, Chow & Deng, "CADRef: Robust Out-of-Distribution Detection via Class-Aware
    Decoupled Relative Feature Leveraging", CVPR 2025 (arXiv:2503.00325); code https://github.com/LingAndZero/CADRef
    (``ood_methods/CADRef.py``, ``CARef.py``, ``utils/get_stat.py``).

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param logit_score: ``"energy"``, ``"msp"``, ``"maxlogit"`` or ``"gen"`` (:func:`id_logit_score`)
    :param decoupled: CADRef (True) or CARef (False)
    """

    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "logit_score": Param(Options(*LOGIT_METHODS), structural=False, doc="ID logit score S scaling the errors"),
        "decoupled": Param(Boolean(), structural=False, doc="CADRef (true) or CARef (false)"),
    }
    aliases: ClassVar[Dict[str, str]] = {**FeaturesDetector.aliases, "logit_method": "logit_score"}
    default_search_space: ClassVar[Dict[str, Any]] = {"logit_score": {"grid": list(LOGIT_METHODS)}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 logit_score: str = "energy", decoupled: bool = True):
        super().__init__(model)
        self._set_head(head)
        self.logit_score = logit_score
        self.decoupled = decoupled

    def _fit(self, z: Tensor, y: Tensor) -> None:
        z = self._head_input(z)
        n_classes = self.w.shape[0]
        logits = by_row_blocks(self.logits, z)
        pred = logits.argmax(dim=1)
        sums, counts = class_means(z, pred, n_classes)
        known = y < n_classes
        label_sums, label_counts = class_means(z, y, n_classes) if bool(known.all()) else \
            class_means(z[known], y[known], n_classes)
        overall = sums.sum(dim=0) / z.shape[0]
        fallback = torch.where(label_counts[:, None] > 0, label_sums / label_counts.clamp_min(1)[:, None], overall)
        self.class_means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], fallback)  #: (C, D)
        self.mean_logit_score = {m: float(id_logit_score(logits.double(), m).mean()) for m in LOGIT_METHODS}  #: S bar

    def _relative_error(self, z: Tensor) -> Tensor:
        logits = self.logits(z)
        pred = logits.argmax(dim=1)
        z64 = z.double()
        d = z64 - self.class_means.to(z.device)[pred]
        norm = z64.abs().sum(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        if not self.decoupled:
            return (d.abs().sum(dim=1) / norm).to(z.dtype)
        aligned = d * self.w.to(z.device)[pred].sign().double()
        e_plus = aligned.clamp_min(0).sum(dim=1) / norm
        e_minus = (-aligned).clamp_min(0).sum(dim=1) / norm
        method = self.logit_score.lower()
        score = e_plus / id_logit_score(logits.double(), method) + e_minus / self.mean_logit_score[method]
        return score.to(z.dtype)

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._relative_error, self._head_input(z))
