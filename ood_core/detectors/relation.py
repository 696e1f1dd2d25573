"""Relation: the neural relation graph's edge sum against the ID training bank."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Interval, Param
from .head import Head, HeadMixin
from .neighbour_search import CHUNK_ELEMENTS

#: OpenOOD's grid for the kernel exponent (configs/postprocessors/relation.yml, ``pow_list``)
OPENOOD_POWERS = [1, 2, 4, 6, 8]


def unit_rows(z: Tensor) -> Tensor:
    """``z / sqrt(|z|^2 + 1e-10)`` row-wise: the official code's normalisation (zero rows stay zero)."""
    return z / (z * z).sum(dim=1, keepdim=True).add(1e-10).sqrt()


def relation_edge_sum(feat: Tensor, prob: Tensor, bank_feat: Tensor, bank_prob: Tensor, power: float,
                      threshold: float) -> Tensor:
    r"""``sum_j [r_ij > threshold] r_ij^power`` with the kernel
    :math:`r_{ij} = \max(\hat z_i^\top \hat z_j, 0) \cdot p_i^\top p_j` of each query row ``i`` against every bank
    row ``j``; the (query rows x bank rows) kernel is formed in blocks of at most
    :data:`~.neighbour_search.CHUNK_ELEMENTS` entries, so memory is bounded for any number of queries."""
    out = feat.new_empty(feat.shape[0])
    rows = max(1, CHUNK_ELEMENTS // max(bank_feat.shape[0], 1))
    for s in range(0, feat.shape[0], rows):
        rel = (feat[s : s + rows] @ bank_feat.T).clamp_(min=0.0).mul_(prob[s : s + rows] @ bank_prob.T)
        rel = torch.where(rel > threshold, rel, torch.zeros_like(rel))
        out[s : s + rows] = (rel if power == 1 else rel.pow_(power)).sum(dim=1)
    return out


class Relation(HeadMixin, FeaturesDetector):
    r"""Relation: how strongly a sample is connected to the ID training set in the neural relation graph.

    Fit: the bank of the ID training rows' normalised features :math:`\hat z_j = z_j / \sqrt{\lVert z_j\rVert^2
    + 10^{-10}}` and softmax probabilities :math:`p_j = \operatorname{softmax}(W z_j + b)` (the labels are not
    read). The relation kernel of a sample :math:`x` and a bank row :math:`j`:

    .. math:: r(x, j) = \max(\hat z^\top \hat z_j,\ 0) \cdot p^\top p_j \in [0, 1]

    (feature similarity times label-distribution agreement). Score, the negated edge sum of the graph's
    thresholded edges (the official code's ID score, negated so that higher = more OOD):

    .. math:: s(x) = -\sum_{j:\ r(x, j) > \tau} r(x, j)^{\gamma}

    with the exponent :math:`\gamma` (``power``, the official code's ``pow``, "temperature of the kernel") and
    the edge cut-off :math:`\tau = 0.03` (``threshold``, the official code's ``thres``). The kernel against
    the bank is computed in blocks of bounded memory (:func:`relation_edge_sum`): the score is exact, no
    approximate search. Cost: :math:`O(N (D + C))` per scored sample.

    Paper: Kim, Yun & Song, "Neural Relation Graph: A Unified Framework for Identifying Label Noise and
    Outlier Data", NeurIPS 2023 (arXiv:2301.12321); code https://github.com/snu-mllab/Neural-Relation-Graph;
    OpenOOD ``openood/postprocessors/relation_postprocessor.py``, which we follow (same kernel, cut-off and sum;
    its sum of ``sign(r) |r|^pow`` equals ours since :math:`r \ge 0`). Default search space: OpenOOD's grid
    :math:`\gamma \in \{1, 2, 4, 6, 8\}` (``configs/postprocessors/relation.yml``). Not in pytorch-ood 0.4.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param head: the classifier (:func:`~.head.parse_head`), for the softmax probabilities
    :param power: kernel exponent :math:`\gamma > 0`
    :param threshold: edges with :math:`r \le \tau` are left out, :math:`0 \le \tau < 1`
    """

    requires_fit: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "power": Param(Interval(float, 0, None, closed="neither"), structural=False,
                       doc="kernel exponent (OpenOOD's pow)"),
        "threshold": Param(Interval(float, 0, 1, closed="left"), structural=False,
                           doc="edges with relation <= threshold are left out (OpenOOD's thres)"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"power": {"grid": OPENOOD_POWERS}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 power: float = 1, threshold: float = 0.03):
        super().__init__(model)
        self._set_head(head)
        self.power = power
        self.threshold = threshold

    def _probabilities(self, z: Tensor) -> Tensor:
        return torch.softmax(self.logits(z), dim=1)

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._require_head()
        self.bank_features = unit_rows(z)  #: normalised ID training features, (N, D)
        self.bank_probabilities = self._probabilities(z)  #: their softmax probabilities, (N, C)

    def _score(self, z: Tensor) -> Tensor:
        return -relation_edge_sum(unit_rows(z), self._probabilities(z), self.bank_features.to(z),
                                  self.bank_probabilities.to(z), float(self.power), float(self.threshold))
