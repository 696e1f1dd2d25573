"""WeiPer + KLD: random perturbations of the head's class projections, scored by KL divergence to ID train."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Interval, Param
from .head import Head, HeadMixin
from .numerics import row_slices

#: added to the normalised histograms before the KL divergence (official code: ``epsilon``, ``epsilon_noise``)
EPS_FEATURES, EPS_PERTURBED = 0.01, 0.025


def row_histograms(x: Tensor, low: float, high: float, n_bins: int) -> Tensor:
    """Per row of ``x`` ``(R, M)``: the fraction of its ``M`` entries in each of ``n_bins`` equal bins of
    ``[low, high)``, ``(R, n_bins)`` float64. Entries outside the range are counted in no bin (the fractions
    then sum to less than 1), as the official code's outer bins, which it drops; so is ``high`` itself, as there
    (its last edge, ``high + 1e-8`` in float32, rounds to ``high`` for ``|high| > 0.1``)."""
    width = max(high - low, 1e-12) / n_bins
    idx = torch.floor((x.double() - low) / width)
    idx = torch.where((idx >= 0) & (idx < n_bins), idx, torch.full_like(idx, n_bins)).long()
    counts = torch.zeros(x.shape[0], n_bins + 1, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts[:, :n_bins] / x.shape[1]


def smooth(h: Tensor, size: int) -> Tensor:
    """Moving average of width ``size`` along the bins (dim 1) with the edge bins repeated: PyTorch's
    ``Conv1d(padding="same", padding_mode="replicate")`` with uniform weights, the official ``UniformKernel``
    (``(size - 1) // 2`` bins of padding on the left, the rest on the right)."""
    if size == 1:
        return h
    left = (size - 1) // 2
    right = size - 1 - left
    padded = torch.cat([h[:, :1].expand(-1, left), h, h[:, -1:].expand(-1, right)], dim=1)
    return padded.unfold(1, size, 1).mean(dim=2)


def symmetric_kl(p: Tensor, q: Tensor, eps: float) -> Tensor:
    r""":math:`KL(\tilde p \Vert \tilde q) + KL(\tilde q \Vert \tilde p)` with :math:`\tilde p = (p + \epsilon) /
    \sum (p + \epsilon)` (likewise :math:`\tilde q`), for one density ``p`` ``(B,)`` and rows ``q`` ``(R, B)``."""
    p = (p + eps) / (p + eps).sum()
    q = (q + eps) / (q + eps).sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)


class WeiPer(HeadMixin, FeaturesDetector):
    r"""WeiPer + KLD: densities of the features and of randomly perturbed class projections, compared with the
    ID training set's by KL divergence, plus the mean MSP of the perturbed heads.

    **Perturbed head** (fit, seeded): :math:`r` copies of the head ``(W, b)``, each class projection
    :math:`w_k` moved by a random direction of length :math:`\delta \lVert w_k \rVert`:

    .. math:: \tilde w_{j,k} = w_k + \delta \lVert w_k \rVert \frac{\eta_{j,k}}{\lVert \eta_{j,k} \rVert},
              \quad \eta_{j,k} \sim \mathcal N(0, I_D), \qquad
              \tilde l_{j,k}(z) = \tilde w_{j,k}^\top z + b_k \quad (j = 1..r,\ k = 1..C)

    **Densities.** For one sample, :math:`h(z) \in R^{B}` is the histogram of the :math:`D` entries of
    :math:`z` (the fraction in each of :math:`B` = ``n_bins`` equal bins spanning the minimum to the maximum of
    every entry of every ID training feature), :math:`\tilde h(z)` that of its :math:`rC` perturbed logits
    (bins over the perturbed logits' training range). Entries outside the range fall in no bin. Fit: the
    training means :math:`\bar h = \operatorname{mean}_i h(z_i)`, :math:`\bar{\tilde h}`.

    **Score** (the official code's confidence, negated: higher = more OOD):

    .. math:: s(x) = D_{KL}^{sym}\big(\bar h,\ S_{s_1} h(z)\big)
              + \lambda_1 D_{KL}^{sym}\big(\bar{\tilde h},\ S_{s_2} \tilde h(z)\big)
              - \lambda_2 \frac1r \sum_{j=1}^r \max_k \operatorname{softmax}(\tilde l_{j,\cdot}(z))_k

    with :math:`S_s` a moving average of width :math:`s` over the bins (edge bins repeated) and
    :math:`D_{KL}^{sym}(p, q) = KL(\tilde p \Vert \tilde q) + KL(\tilde q \Vert \tilde p)`,
    :math:`\tilde p = (p + \epsilon) / \sum(p + \epsilon)`, :math:`\epsilon = 0.01` for the features and
    :math:`0.025` for the perturbed logits.

    Official code (https://github.com/mgranz/weiper, ``openood/postprocessors/weiper_kldiv/utils.py``), which we
    follow where it is more specific than the paper: only the scored sample's histogram is smoothed, the
    training mean is not; the bin range is one scalar interval over all entries (``exact_minmax: true``); the
    outer bins are dropped before :math:`\epsilon` is added. Differences: the official training mean is a mean
    of per-batch means (equal when the batches are), ours the mean over all rows; its bin edges are float32
    ``linspace`` values, ours are computed in float64 (entries within rounding of an edge may fall in the
    neighbouring bin); its random perturbations come from the global torch generator, ours from
    ``torch.Generator().manual_seed(seed)`` on the CPU (the same on every device).

    Hyperparameters, with the official defaults (``configs/postprocessors/weiper_kldiv.yml``): ``r`` = 100
    repeats, ``delta`` = 1.8, ``n_bins`` = 100, ``smoothing`` :math:`s_1` = 4, ``smoothing_perturbed``
    :math:`s_2` = 15, ``lambda_1`` = 2.5, ``lambda_2`` = 0.1. Default search space: the official grid (the
    paper's; WeiPer is not in OpenOOD's upstream repository): :math:`\lambda_1 \in \{0.1, 1, 2.5, 4\}`,
    :math:`\lambda_2 \in \{0.1, 0.25, 1, 2.5, 5\}`, ``n_bins`` :math:`\in \{60, 80, 100\}`,
    :math:`\delta \in \{1.8, 2.0, 2.2, 2.4\}`, :math:`s_1 \in \{4, 8, 12, 20, 40\}`,
    :math:`s_2 \in \{15, 25, 40\}` (3600 points: give a sweep a sampler or a smaller grid). ``r``, ``delta``,
    ``n_bins`` and ``seed`` shape the fitted state; the others only the scoring.

    Memory: the perturbed head holds :math:`rCD` floats (100 x 1000 x 2048: 0.8 GB for ImageNet ResNet-50, as
    in the official code); scoring works on row blocks of the :math:`rC` perturbed logits.

    Paper: Granz, Heurich & Landgraf, "WeiPer: OOD Detection using Weight Perturbations of Class Projections",
    NeurIPS 2024 (arXiv:2405.17164). Not in pytorch-ood 0.4.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param r: number of perturbed copies of the head
    :param delta: relative perturbation length :math:`\delta`
    :param n_bins: histogram bins :math:`B`
    :param smoothing: moving-average width :math:`s_1` of the feature histogram
    :param smoothing_perturbed: moving-average width :math:`s_2` of the perturbed-logit histogram
    :param lambda_1: weight of the perturbed-logit KL divergence
    :param lambda_2: weight of the perturbed heads' mean MSP
    :param seed: seed of the random perturbations
    """

    requires_fit: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "r": Param(Interval(int, 1, None), doc="number of perturbed copies of the head"),
        "delta": Param(Interval(float, 0, None, closed="neither"), doc="relative perturbation length"),
        "n_bins": Param(Interval(int, 2, None), doc="histogram bins"),
        "smoothing": Param(Interval(int, 1, None), structural=False,
                           doc="moving-average width over the feature histogram's bins (s_1)"),
        "smoothing_perturbed": Param(Interval(int, 1, None), structural=False,
                                     doc="moving-average width over the perturbed-logit histogram's bins (s_2)"),
        "lambda_1": Param(Interval(float, 0, None), structural=False, doc="weight of the perturbed-logit KLD"),
        "lambda_2": Param(Interval(float, 0, None), structural=False, doc="weight of the perturbed heads' MSP"),
        "seed": Param(Interval(int, 0, None), doc="seed of the random perturbations"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {
        "lambda_1": {"grid": [0.1, 1, 2.5, 4]},
        "lambda_2": {"grid": [0.1, 0.25, 1, 2.5, 5]},
        "n_bins": {"grid": [60, 80, 100]},
        "delta": {"grid": [1.8, 2.0, 2.2, 2.4]},
        "smoothing": {"grid": [4, 8, 12, 20, 40]},
        "smoothing_perturbed": {"grid": [15, 25, 40]},
    }

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None, r: int = 100,
                 delta: float = 1.8, n_bins: int = 100, smoothing: int = 4, smoothing_perturbed: int = 15,
                 lambda_1: float = 2.5, lambda_2: float = 0.1, seed: int = 0):
        super().__init__(model)
        self._set_head(head)
        self.r = r
        self.delta = delta
        self.n_bins = n_bins
        self.smoothing = smoothing
        self.smoothing_perturbed = smoothing_perturbed
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2
        self.seed = seed

    def _perturbed_head(self) -> Tuple[Tensor, Tensor]:
        """``(r C, D)`` weights and ``(r C,)`` biases: copy ``j`` of class ``k`` at row ``j C + k``."""
        w, b = self.w, self.b
        noise = torch.randn(self.r, *w.shape, generator=torch.Generator().manual_seed(int(self.seed)))
        noise = noise / noise.norm(dim=2, keepdim=True).clamp(min=1e-12)
        scale = float(self.delta) * w.norm(dim=1, keepdim=True).cpu()
        return (w.cpu() + scale * noise).reshape(-1, w.shape[1]), b.cpu().repeat(self.r)

    def _perturbed_logits(self, z: Tensor) -> Tensor:
        return torch.addmm(self.perturbed_b.to(z), z, self.perturbed_w.to(z).T)

    def _blocks(self, z: Tensor):
        return row_slices(z, width=max(int(self.perturbed_w.shape[0]), z.shape[1]))

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._require_head()
        w, b = self._perturbed_head()
        self.perturbed_w, self.perturbed_b = w.to(z.device), b.to(z.device)  #: the r perturbed heads
        lo, hi = torch.aminmax(z)
        self.feature_range = (float(lo), float(hi))  #: bins of the feature histograms
        p_lo, p_hi = float("inf"), float("-inf")
        for rows in self._blocks(z):
            lo, hi = torch.aminmax(self._perturbed_logits(z[rows]))
            p_lo, p_hi = min(p_lo, float(lo)), max(p_hi, float(hi))
        self.perturbed_range = (p_lo, p_hi)  #: bins of the perturbed-logit histograms
        h = torch.zeros(self.n_bins, dtype=torch.float64, device=z.device)
        h_p = torch.zeros_like(h)
        for rows in self._blocks(z):
            h += row_histograms(z[rows], *self.feature_range, self.n_bins).sum(dim=0)
            h_p += row_histograms(self._perturbed_logits(z[rows]), *self.perturbed_range, self.n_bins).sum(dim=0)
        self.train_density = h / z.shape[0]  #: mean training feature histogram, (B,) float64
        self.train_density_perturbed = h_p / z.shape[0]  #: mean training perturbed-logit histogram, (B,) float64

    def _weiper(self, z: Tensor) -> Tensor:
        logits = self._perturbed_logits(z)
        kld = symmetric_kl(self.train_density.to(z.device),
                           smooth(row_histograms(z, *self.feature_range, self.n_bins), int(self.smoothing)),
                           EPS_FEATURES)
        kld_p = symmetric_kl(self.train_density_perturbed.to(z.device),
                             smooth(row_histograms(logits, *self.perturbed_range, self.n_bins),
                                    int(self.smoothing_perturbed)), EPS_PERTURBED)
        msp = torch.softmax(logits.reshape(z.shape[0], int(self.r), -1), dim=2).amax(dim=2).mean(dim=1)
        score = kld + self.lambda_1 * kld_p - self.lambda_2 * msp.double()
        return score.to(z.dtype)

    def _score(self, z: Tensor) -> Tensor:
        return torch.cat([self._weiper(z[rows]) for rows in self._blocks(z)]) if z.shape[0] else z.new_empty(0)
