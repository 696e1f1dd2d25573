r"""pNML: the regret of the single-layer predictive normalised maximum likelihood learner."""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Interval, Param
from .head import Head, HeadMixin
from .numerics import by_row_blocks, one_thread, scatter64


def unit_rows(z: Tensor) -> Tensor:
    """Rows of ``z`` scaled to unit L2 norm (zero rows stay zero)."""
    return z / z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


class PNML(HeadMixin, FeaturesDetector):
    r"""pNML regret of the last layer, on L2-normalised penultimate features (higher = more OOD).

    Fit: :math:`X` = the ID-train features scaled to unit norm (rows), :math:`G = (X^\top X)^{+}` (float64,
    pseudo-inverse of the Gram matrix, which equals :math:`X^{+} X^{+\top}`). Score of :math:`\hat z = z / \lVert z
    \rVert`, with :math:`p = \operatorname{softmax}(W \hat z + b)` (the head on the *normalised* features, as the
    official code does) and :math:`C` classes:

    .. math::
        g(z) = \frac{\hat z^\top G \hat z}{1 + \hat z^\top G \hat z}, \qquad
        s(x) = \frac{1}{\log C} \log \sum_{c=1}^{C} \frac{p_c}{p_c + (1 - p_c)\, p_c^{\,g(z)}}

    :math:`s \in [0, 1]`: 0 where the test point lies in the span of the training features with small projection
    (:math:`g \to 0`), 1 where :math:`g \to 1`. Computed in float64, in log space
    (:math:`p_c^{g-1} = e^{(g-1)\log p_c}`), after clamping :math:`p` into :math:`[\epsilon, 1-\epsilon]` (pytorch-ood's
    guard; ``eps=0`` is the plain formula, which the log-space form keeps finite).

    Official code (https://github.com/kobybibas/pnml_ood_detection, ``src/lit_utils/baseline_lit_utils.py``):
    the same formula; it takes :math:`|\hat z^\top G \hat z|` (here the quadratic form of the symmetric pseudo-inverse
    is clamped at 0, the same for a positive semi-definite :math:`G`) and a float32 ``pinv`` with ``rcond=1e-15``;
    here ``pinv`` of the float64 Gram matrix with its default cut-off (:math:`D \cdot 2^{-52}` relative): the two
    differ only in directions where the training features have (numerically) no variance. As in both, a direction
    outside the span of the training features adds nothing to :math:`\hat z^\top G \hat z` (the paper assumes
    :math:`X^\top X` invertible). Not in OpenOOD; no hyperparameter to search.

    Paper: Bibas, Feder & Hassner, "Single Layer Predictive Normalized Maximum Likelihood for Out-of-Distribution
    Detection", NeurIPS 2021 (arXiv:2110.09246).

    pytorch-ood 0.4.0 ``PNML(encoder, head, eps=1e-12)``: the same order and names here (``encoder=`` is accepted for
    ``model``; ``head`` linear, :func:`~.head.parse_head`). Its Gram matrix and ``pinv`` are float32; same scores
    on well-conditioned features (``tests/detectors/test_lts_pnml.py``).

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param head: the classifier (:func:`~.head.parse_head`), applied to the normalised features
    :param eps: probabilities are clamped into ``[eps, 1 - eps]``
    """

    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "eps": Param(Interval(float, 0, 0.5, closed="left"), structural=False, doc="probability clamp"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None, eps: float = 1e-12):
        super().__init__(model)
        self._set_head(head)
        self.eps = eps

    def _fit(self, z: Tensor, y: Tensor) -> None:
        z = self._head_input(z)
        x = unit_rows(z)
        gram = scatter64(x, torch.zeros(x.shape[1], dtype=torch.float64, device=x.device))  # X^T X, float64
        with one_thread(gram):
            self.projector = torch.linalg.pinv(gram, hermitian=True)  #: G = (X^T X)^+, (D, D) float64

    def _regret(self, z: Tensor) -> Tensor:
        x = unit_rows(z.double())
        proj = ((x @ self.projector.to(x.device)) * x).sum(dim=1).clamp_min(0)
        g = proj / (1 + proj)
        log_p = torch.log_softmax(self.logits(x), dim=1)
        if self.eps > 0:
            log_p = log_p.clamp(math.log(self.eps), math.log1p(-self.eps))
        # p / (p + (1 - p) p^g) = 1 / (1 + (1 - p) p^(g - 1))
        terms = 1.0 / (1.0 + (-torch.expm1(log_p)) * torch.exp((g[:, None] - 1.0) * log_p))
        return (torch.log(terms.sum(dim=1)) / math.log(log_p.shape[1])).to(z.dtype)

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._regret, self._head_input(z))
