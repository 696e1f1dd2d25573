"""SHE: simplified Hopfield energy, the inner product with a stored pattern of the predicted class."""
from __future__ import annotations

from typing import Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector, InvalidInputError
from ..constraints import Param
from .head import Head, HeadMixin
from .numerics import float64_blocks


class SHE(HeadMixin, FeaturesDetector):
    r"""Simplified Hopfield energy: inner product with the stored pattern of the predicted class.

    Fit: the pattern :math:`S_c` = mean ID-train feature of the samples of class :math:`c` that the head
    classifies correctly (sums in float64). Score, with :math:`\hat c = \arg\max_c l_c(z)`:

    .. math:: s(x) = -z^\top S_{\hat c}

    Paper: Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization
    with Modern Hopfield Energy", ICLR 2023 (openreview.net/forum?id=KkazG4lgKL; no arXiv); reference code:
    OpenOOD's ``openood/postprocessors/she_postprocessor.py`` (github.com/Jingkang50/OpenOOD).

    pytorch-ood 0.4.0: ``SHE(encoder, head)`` — the same positional order and names here (``encoder=`` for
    ``model``); equal scores. Differences: ``head`` must be linear (:mod:`.head`), not any callable; a class
    without any correctly classified sample falls back to the mean of all its samples (pytorch-ood raises),
    and a class without samples gets :math:`S_c = 0`.

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    """

    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None):
        super().__init__(model)
        self._set_head(head)

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._require_head()
        n_classes = self.w.shape[0]
        if int(y.max()) >= n_classes:
            raise InvalidInputError(f"SHE: labels must be < the number of classes of the head ({n_classes}), "
                                    f"got label {int(y.max())}")
        correct = (self.logits(z).argmax(dim=1) == y).long()
        group = 2 * y + correct  # (class, correctly classified)
        sums = torch.zeros(2 * n_classes, z.shape[1], dtype=torch.float64, device=z.device)
        for start, block in float64_blocks(z):
            sums.index_add_(0, group[start : start + block.shape[0]], block)
        counts = torch.bincount(group, minlength=2 * n_classes).double()[:, None]
        correct_mean = sums[1::2] / counts[1::2].clamp(min=1)
        class_mean = (sums[0::2] + sums[1::2]) / (counts[0::2] + counts[1::2]).clamp(min=1)
        self.patterns = torch.where(counts[1::2] > 0, correct_mean, class_mean)  #: S_c, (C, D) float64

    def _score(self, z: Tensor) -> Tensor:
        predicted = self.logits(z).argmax(dim=1)
        return -(z @ self.patterns.to(z).T).gather(1, predicted[:, None])[:, 0]
