r"""OptFS: the piecewise-constant feature-shaping function fitted in closed form on ID data."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import Interval, Options, Param
from .head import Head, HeadMixin
from .numerics import by_row_blocks, percentiles, row_slices

VARIANTS = ("vanilla", "energy")


class OptFS(HeadMixin, FeaturesDetector):
    r"""OptFS: each feature value multiplied by a weight :math:`\theta_k` of the interval :math:`k` it falls in.

    Fit on ID-train features :math:`z_i \in R^D` with the head's predictions
    :math:`\hat y_i = \arg\max_c (W z_i + b)_c`: the range :math:`[\ell, r)` between the 0.1th and 99.9th
    percentiles of all feature values, cut into intervals :math:`B_k = [\ell + k\delta,\ \ell + k\delta + \delta)` of
    width :math:`\delta = (r - \ell) / \text{bins}` (left ends ``numpy.arange(l, r, delta)``: ``bins`` of them, or
    one more where rounding asks), and

    .. math::
        I_k = \frac1N \sum_i \sum_j [z_{ij} \in B_k]\, w_{\hat y_i j} z_{ij}, \qquad
        \theta = 1000\, \frac{I}{\lVert I \rVert_2}

    (the closed-form optimum of the paper's ID-only objective). Shaping and score (higher = more OOD):

    .. math::
        z'_j = \theta_{k(z_j)}\, z_j \quad (0 \text{ outside } [\ell, r)), \qquad
        s(x) = -\, w_{\hat y}^\top z' \ \ (\texttt{vanilla}) \quad\text{or}\quad
        s(x) = -\log \sum_c e^{(W z' + b)_c} \ \ (\texttt{energy})

    with :math:`\hat y` the prediction on the unshaped :math:`z`. ``vanilla`` is the paper's "Ours (V)" and the
    official default (no bias), ``energy`` its "Ours (E)" (the variant the CADRef authors' copy uses). Quirks kept:
    values outside :math:`[\ell, r)` are zeroed; :math:`I = 0` gives :math:`\theta = 0` (the official code divides
    by zero). Statistics in float64.

    Not in OpenOOD; hyperparameter-free in the paper (``bins=100`` and the 0.1 % tails are the official code's
    constants). Default search space: the two variants.

    Paper: Zhao, Xu, Gupta, Asthana, Zheng & Gould, "Towards Optimal Feature-Shaping Methods for Out-of-Distribution
    Detection", ICLR 2024 (arXiv:2402.00865); code https://github.com/Qinyu-Allen-Zhao/OptFSOOD
    (``detector/ours.py``).

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param head: the classifier (:func:`~.head.parse_head`)
    :param variant: ``"vanilla"`` (predicted-class logit of the shaped features) or ``"energy"``
    :param bins: number of intervals of the shaping function
    """

    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "variant": Param(Options(*VARIANTS), structural=False, doc="score of the shaped features"),
        "bins": Param(Interval(int, 1, None), doc="intervals of the piecewise-constant shaping function"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"variant": {"grid": list(VARIANTS)}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, head: Head = None,
                 variant: str = "vanilla", bins: int = 100):
        super().__init__(model)
        self._set_head(head)
        self.variant = variant
        self.bins = bins

    def _bins(self, z: Tensor):
        """Interval index of each entry of ``z`` and whether it lies in an interval (float64 comparisons)."""
        lefts = self.left_ends.to(z.device)
        x = z.double()
        index = torch.searchsorted(lefts, x.reshape(-1), right=True).reshape(x.shape) - 1
        inside = (index >= 0) & (x < lefts[index.clamp_min(0)] + self.width)
        return index.clamp_min(0), inside

    def _fit(self, z: Tensor, y: Tensor) -> None:
        z = self._head_input(z)
        lo, hi = percentiles(z, [0.1, 99.9])
        self.width = (hi - lo) / self.bins  #: interval width delta
        lefts = np.arange(lo, hi, self.width) if self.width > 0 else np.array([lo])
        self.left_ends = torch.as_tensor(lefts, dtype=torch.float64, device=z.device)  #: (K,) left ends
        w = self.w.to(z.device)
        contrib = torch.zeros(len(lefts), dtype=torch.float64, device=z.device)
        for s in row_slices(z, width=4 * z.shape[1]):
            zs = z[s]
            index, inside = self._bins(zs)
            lc = (w[self.logits(zs).argmax(dim=1)] * zs).double() * inside
            contrib += torch.bincount(index.reshape(-1), weights=lc.reshape(-1), minlength=len(lefts))
        contrib /= z.shape[0]
        norm = float(contrib.norm())
        self.theta = contrib * (1000.0 / norm) if norm > 0 else torch.zeros_like(contrib)  #: (K,) float64

    def shape(self, z: Tensor) -> Tensor:
        r"""The shaped features :math:`z'`, in the dtype of ``z``."""
        index, inside = self._bins(z)
        return (z.double() * self.theta.to(z.device)[index] * inside).to(z.dtype)

    def _optfs(self, z: Tensor) -> Tensor:
        shaped = self.shape(z)
        if self.variant.lower() == "energy":
            return -torch.logsumexp(self.logits(shaped), dim=1)
        pred = self.logits(z).argmax(dim=1)
        return -(self.w.to(z)[pred] * shaped).sum(dim=1)

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._optfs, self._head_input(z))
