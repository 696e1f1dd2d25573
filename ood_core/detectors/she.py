"""SHE: simplified Hopfield energy, the inner product with a stored pattern of the predicted class."""
from __future__ import annotations

from typing import Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector, InvalidInputError
from ..constraints import Param
from ..streaming import Chunks, ClassMoments
from .head import Head, HeadMixin


class SHE(HeadMixin, FeaturesDetector):
    r"""Simplified Hopfield energy: inner product with the stored pattern of the predicted class.

    Fit: the pattern :math:`S_c` = mean ID-train feature of the samples of class :math:`c` that the head
    classifies correctly (sums in float64, one pass over the rows, which ``fit_rows`` streams). Score, with
    :math:`\hat c = \arg\max_c l_c(z)`:

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
    streams_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None):
        super().__init__(model)
        self._set_head(head)

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(z, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        self._require_head()
        n_classes = self.w.shape[0]
        groups = torch.arange(2 * n_classes)  # (class, correctly classified) = 2 * class + correct
        stats = ClassMoments(self.n_features_in_, torch.zeros(self.n_features_in_), groups, scatter=None)
        for z, y in chunks():  # one pass: counts and float64 sums of z per group
            if y.numel() and int(y.max()) >= n_classes:
                raise InvalidInputError(f"SHE: labels must be < the number of classes of the head ({n_classes}), "
                                        f"got label {int(y.max())}")
            correct = (self.logits(z).argmax(dim=1) == y).long()
            stats.update(z, 2 * y + correct)
        sums, counts = stats.sums, stats.counts[:, None]
        correct_mean = sums[1::2] / counts[1::2].clamp(min=1)
        class_mean = (sums[0::2] + sums[1::2]) / (counts[0::2] + counts[1::2]).clamp(min=1)
        self.patterns = torch.where(counts[1::2] > 0, correct_mean, class_mean)  #: S_c, (C, D) float64

    def _score(self, z: Tensor) -> Tensor:
        predicted = self.logits(z).argmax(dim=1)
        return -(z @ self.patterns.to(z).T).gather(1, predicted[:, None])[:, 0]
