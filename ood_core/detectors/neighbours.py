"""Detectors that compare with stored ID patterns through the classifier head: NNGuide, SHE, DICE."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import FeaturesDetector, InvalidInputError
from .head import Head, HeadMixin
from .knn import SCREEN_CANDIDATES, SCREEN_MAX_K, SCREEN_MIN_BANK, _U16, _U32, fast_bf16_matmul, screen_in_chunks
from .logits import LOGIT_SCORES
from .mahalanobis import check_features
from .numerics import float64_blocks, mean64
from .react import percentile

#: upper bound on the elements of one (test chunk x bank) similarity block (16 MiB of float32)
CHUNK_ELEMENTS = 1 << 22


def screened_top_mean(q: Tensor, bank: Tensor, bank16: Tensor, max_norm: float, k: int):
    """Mean of the ``k`` largest inner products ``q.b`` over bank rows, for float32 queries ``(R, D)``,
    through a bfloat16 screen with a certificate; returns ``(means, certified)``.

    The bfloat16 product ``q bank16^T`` keeps ``m = max(SCREEN_CANDIDATES, 4k + 24)`` candidates per query,
    recomputed in float32. Rounding of the screen is bounded rigorously per value by
    :math:`(3u + 3u^2 + 1.02 D u_{32}) |q| \max_b |b|` (inputs and output in bfloat16, unit roundoff
    :math:`u = 2^{-8}`; float32 accumulation); a query is certified when the m-th largest screen value plus
    that bound stays below the k-th largest recomputed value, i.e. no other row can be among the top k.
    """
    r, d = q.shape
    m = min(max(SCREEN_CANDIDATES, 4 * k + 24), bank.shape[0])
    vals, idx = (q.to(torch.bfloat16) @ bank16.T).topk(m, dim=1, sorted=False)
    exact = torch.bmm(bank.index_select(0, idx.reshape(-1)).reshape(r, m, d), q[:, :, None])[:, :, 0]
    top = exact.topk(k, dim=1, sorted=False).values
    qn = torch.linalg.vector_norm(q, dim=1, dtype=torch.float64) * (1 + d * _U32)
    a = vals.amin(dim=1).double()
    a = a + a.abs() * _U16 / (1 - _U16)  # above the unrounded screen value of every other row
    screen_err = (3 * _U16 + 3 * _U16**2 + 1.02 * d * _U32) * qn * max_norm
    exact_err = 1.02 * d * _U32 * qn * max_norm
    return top.mean(dim=1), a + screen_err < top.amin(dim=1).double() - exact_err


class NNGuide(HeadMixin, FeaturesDetector):
    r"""Nearest-neighbour guidance: energy scaled by the similarity to a confidence-weighted ID bank.

    Fit: the bank :math:`B = \{ E(z_i)\, \hat z_i \}` of ID-train features,
    :math:`\hat z = z / \lVert z \rVert_2`, each scaled by its confidence
    :math:`E(z) = \log \sum_c e^{l_c(z)}` (negative energy of the head's logits). Score:

    .. math:: s(x) = -\underbrace{\frac1k \sum_{b \in \mathcal N_k(x)} \hat z^\top b}_{\text{guidance}}
              \cdot E(z)

    where :math:`\mathcal N_k(x)` are the :math:`k` bank entries with the largest inner product
    :math:`\hat z^\top b` (exact search by chunked matmul, at most ``CHUNK_ELEMENTS`` test x bank
    entries at a time; memory bounded for any number of test samples; on CPUs with fast bfloat16
    matmuls and ``k <= 16`` a certified bfloat16 screen first, :func:`screened_top_mean`, with the
    same result). The paper builds the bank
    from a random subset of the training set (1% for ImageNet): fit on a subset to do so.
    Equal to pytorch-ood 0.4.0 and the official code (github.com/roomo7time/nnguide).

    Paper: Park et al., "Nearest Neighbor Guidance for Out-of-Distribution Detection",
    ICCV 2023 (arXiv:2309.14888).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (C, D), b (C,))`` tuple
    :param k: number of neighbours, ``1 <= k <= N_bank`` (checked in ``fit``)
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {"k": {"grid": [1, 10, 50, 100, 500]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None, k: int = 10):
        super().__init__(model)
        if int(k) != k or int(k) < 1:
            raise ValueError(f"NNGuide: k must be a positive integer, got {k!r}")
        self.k = int(k)
        self._set_head(head)
        self.bank: Optional[Tensor] = None  #: confidence-scaled normalised ID features, (N, D)
        self._screen: Optional[tuple] = None  #: (bfloat16 bank, bound on its row norms), built on demand

    @staticmethod
    def _normalise(z: Tensor) -> Tensor:
        return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "NNGuide":
        z, _ = self._head_features(z, y)
        if self.k > z.shape[0]:
            raise InvalidInputError(f"NNGuide: k={self.k} exceeds the number of ID training samples ({z.shape[0]})")
        z = z.detach()
        self.bank = (self._normalise(z) * torch.logsumexp(self.logits(z), dim=1, keepdim=True)).contiguous()
        self._screen = None
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.w.shape[1])
        dtype, device = z.dtype, z.device
        bank = self.bank.to(device=device, dtype=dtype)
        q = self._normalise(z)
        if (dtype == torch.float32 and self.k <= SCREEN_MAX_K and bank.shape[0] >= SCREEN_MIN_BANK
                and fast_bf16_matmul(device)):
            guidance = self._screened(q, bank)
        else:
            guidance = self._exact_guidance(q, bank, self.k)
        return -guidance * torch.logsumexp(self.logits(z), dim=1)

    @staticmethod
    def _exact_guidance(q: Tensor, bank: Tensor, k: int) -> Tensor:
        """Mean of the ``k`` largest ``q.b`` per query, by chunked matmul."""
        rows = max(1, CHUNK_ELEMENTS // max(bank.shape[0], 1))
        guidance = torch.empty(q.shape[0], dtype=q.dtype, device=q.device)
        for start in range(0, q.shape[0], rows):
            sims = q[start : start + rows] @ bank.T
            guidance[start : start + rows] = sims.topk(k, dim=1, sorted=False).values.mean(dim=1)
        return guidance

    def _screened(self, q: Tensor, bank: Tensor) -> Tensor:
        """:func:`screened_top_mean` in chunks; queries without a certificate are searched exactly."""
        if self._screen is None or self._screen[0].device != q.device:
            self._screen = (bank.to(torch.bfloat16), float(bank.double().norm(dim=1).max()) * 1.0001)
        bank16, max_norm = self._screen
        return screen_in_chunks(q, bank.shape[0], torch.empty(q.shape[0], dtype=q.dtype, device=q.device),
                                lambda rows: screened_top_mean(rows, bank, bank16, max_norm, self.k),
                                lambda rows: self._exact_guidance(rows, bank, self.k))


class SHE(HeadMixin, FeaturesDetector):
    r"""Simplified Hopfield energy: inner product with the stored pattern of the predicted class.

    Fit: the pattern :math:`S_c` = mean ID-train feature of the samples of class :math:`c`
    that the head classifies correctly (a class without any correct sample falls back to the
    mean of all its samples; a class without samples gets :math:`S_c = 0`). Score, with
    :math:`\hat c = \arg\max_c l_c(z)`:

    .. math:: s(x) = -z^\top S_{\hat c}

    Paper: Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns
    Memorization with Modern Hopfield Energy", ICLR 2023 (openreview.net/forum?id=KkazG4lgKL;
    no arXiv). Equal to pytorch-ood 0.4.0 (which raises for classes without correct samples).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (C, D), b (C,))`` tuple
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None):
        super().__init__(model)
        self._set_head(head)
        self.patterns: Optional[Tensor] = None  #: S_c, (C, D) float64

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "SHE":
        z, y = self._head_features(z, y)
        n_classes = self.w.shape[0]
        if int(y.max()) >= n_classes:
            raise InvalidInputError(f"SHE: labels must be < the number of classes of the head ({n_classes}), "
                                    f"got label {int(y.max())}")
        z = z.detach()
        correct = (self.logits(z).argmax(dim=1) == y).long()
        # float64 sums per (class, correct) group, from cache-sized float64 blocks (one pass, no gather)
        group = 2 * y + correct
        sums = torch.zeros(2 * n_classes, z.shape[1], dtype=torch.float64, device=z.device)
        for start, x in float64_blocks(z):
            sums.index_add_(0, group[start : start + x.shape[0]], x)
        counts = torch.bincount(group, minlength=2 * n_classes).to(torch.float64)
        n_correct, n_all = counts[1::2], counts[0::2] + counts[1::2]
        patterns = sums[1::2] / n_correct.clamp(min=1)[:, None]
        fallback = (sums[0::2] + sums[1::2]) / n_all.clamp(min=1)[:, None]
        self.patterns = torch.where((n_correct > 0)[:, None], patterns, fallback)
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.w.shape[1])
        dtype, device = z.dtype, z.device
        # one matmul gives the logits and z.S_c for every class; keep the predicted class's
        n_classes = self.w.shape[0]
        both = z @ torch.cat([self.w.to(device=device, dtype=dtype), self.patterns.to(device=device, dtype=dtype)]).T
        pred = (both[:, :n_classes] + self.b.to(device=device, dtype=dtype)).argmax(dim=1)
        return -both[:, n_classes:].gather(1, pred[:, None])[:, 0]


class DICE(HeadMixin, FeaturesDetector):
    r"""DICE: energy of the logits of a sparsified head.

    Fit: the mean ID-train feature :math:`\bar z` (float64), the contributions
    :math:`V_{cj} = \bar z_j W_{cj}`, and the threshold :math:`\tau` = the ``p``-th percentile
    (percent, numpy's linear interpolation) of all :math:`V_{cj}`; the head keeps the weights
    with :math:`V_{cj} > \tau` (the top :math:`(100 - p)\%` contributions):
    :math:`\tilde W = W \odot \mathbb 1[V > \tau]`. Score:

    .. math:: s(x) = S(\tilde W z + b), \qquad S = \text{energy: } -\log\sum_c e^{l_c}
              \;|\; \text{msp} \;|\; \text{maxlogit (as in ReAct)}

    Search grid :math:`p \in \{10, 30, 50, 70, 90\}` (the paper and OpenOOD, in percent).
    pytorch-ood 0.4.0 takes ``p`` as a fraction in [0, 1]; otherwise equal.

    Paper: Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection",
    ECCV 2022 (arXiv:2111.09805).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param head: the classifier, an ``nn.Linear`` or a ``(w (C, D), b (C,))`` tuple
    :param p: sparsity, percentile in [0, 100) of the contributions that are dropped
    :param detector: scoring of the sparsified logits: ``"energy"``, ``"msp"`` or ``"maxlogit"``
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {"p": {"grid": [10, 30, 50, 70, 90]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None, p: float = 90.0,
                 detector: str = "energy"):
        super().__init__(model)
        p = float(p)
        if not 0 <= p < 100:
            raise ValueError(f"DICE: p must be a percentile in [0, 100) (percent), got {p!r}")
        key = str(detector).lower()
        if key not in LOGIT_SCORES:
            raise ValueError(f"DICE: detector must be one of {sorted(LOGIT_SCORES)}, got {detector!r}")
        self.p, self.detector = p, key
        self._set_head(head)
        self.threshold: Optional[float] = None
        self.masked_w: Optional[Tensor] = None  #: sparsified head weights, (C, D)

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "DICE":
        z, _ = self._head_features(z, y)
        w = self.w.to(z.device)
        contrib = mean64(z.detach(), exact=False)[None, :] * w.double()
        self.threshold = percentile(contrib, self.p)
        self.masked_w = torch.where(contrib > self.threshold, w, torch.zeros_like(w))
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.w.shape[1])
        dtype, device = z.dtype, z.device
        logits = z @ self.masked_w.to(device=device, dtype=dtype).T + self.b.to(device=device, dtype=dtype)
        return LOGIT_SCORES[self.detector](logits)
