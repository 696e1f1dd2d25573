"""ViM: Virtual-logit Matching."""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..api import FeaturesDetector
from ..constraints import D, Interval, Param
from ..streaming import Chunks, ClassMoments, shared
from .feature_stats import _dimension_grid
from .head import HeadMixin
from .numerics import by_row_blocks, one_thread, row_slices

#: OpenOOD's grid for the principal dimension d (kept where d < D)
OPENOOD_GRID = [256, 1000]


def paper_dim(dim: int) -> int:
    """The principal dimension of the official code for features of dimension ``dim``: 1000 for
    ``D >= 2048`` (ResNet-50, BiT), 512 for ``D >= 768`` (ViT-B), ``D // 2`` below (where 512 does not fit)."""
    if dim >= 2048:
        return 1000
    if dim >= 768:
        return 512
    return max(1, dim // 2)


class ViM(HeadMixin, FeaturesDetector):
    r"""Virtual-logit Matching on penultimate features :math:`z \in R^D` and the linear head ``(w, b)``.

    Fit on ID training features:

    * origin :math:`u = -W^{+} b` (pseudo-inverse of the head weights :math:`W \in R^{C\times D}`);
    * principal subspace: the top-:math:`d` eigenvectors of :math:`\frac1N \sum_i (z_i - u)(z_i - u)^\top`;
      :math:`R \in R^{D \times (D-d)}` spans the remaining ones;
    * :math:`\alpha = \operatorname{mean}_i \max_c l_c(z_i) \,/\, \operatorname{mean}_i \lVert R^\top (z_i - u) \rVert`,
      with logits :math:`l(z) = W z + b`.

    Score (higher = more OOD), the official code's score with its sign flipped:

    .. math:: s(x) = \underbrace{\alpha \lVert R^\top (z - u) \rVert}_{\text{virtual logit } l_0}
                     - \log \sum_{c=1}^{C} e^{l_c(z)}

    The paper states the score as the softmax probability of the virtual logit,
    :math:`p_0 = e^{l_0} / (e^{l_0} + \sum_c e^{l_c}) = \sigma(s(x))`: an increasing function of :math:`s`,
    the same ranking.

    Precision: the second moment is formed in the features' precision (float32 features: float32 products,
    as the official code's ``EmpiricalCovariance``, but about a point near the mean and summed in float64 over
    row blocks, :class:`~ood_core.streaming.ClassMoments` with ``dtype=None``, moved to :math:`u` exactly; float64
    features: float64 throughout) and eigendecomposed in float64. The fit streams (``fit_rows``): one pass for
    the second moment, one for :math:`\alpha`'s terms, the mean max logit and the mean residual norm of every
    :math:`d` at once (the cumulative sums of the squared coordinates on the eigenvectors, in float64), so that a
    search over :math:`d` shares both passes and the eigendecomposition (:func:`~ood_core.streaming.shared`). Where the eigenvalues at the split :math:`d` nearly coincide,
    float32 sums rotate the split (scores move by ~2e-4 relative with an eigengap of 5e-4 of the largest
    eigenvalue): pass float64 features (in memory) for float64 throughout.

    ``d = None`` is the official code's rule (:func:`paper_dim`): its benchmark uses :math:`d = 1000` for
    :math:`D \ge 2048` (ResNet-50, BiT) and 512 otherwise (ViT-B, :math:`D = 768`); where 512 does not fit
    (:math:`D < 768`), :math:`D/2`, as later copies of that script do. Default search space: OpenOOD's grid
    :math:`d \in \{256, 1000\}`, keeping the values below :math:`D`; where fewer than two are
    (:math:`D \le 1000`), those and :math:`\{D/4,\ \text{the rule's } d,\ 3D/4\}` (rounded down): the rule's
    value and a neighbour on either side, so that the search can move the split both ways, e.g. {32, 64, 96}
    for :math:`D = 128` and {128, 256, 384} for :math:`D = 512`.

    Paper: Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022 (arXiv:2203.10807);
    code https://github.com/haoqiwang/vim.

    pytorch-ood 0.4.0 ``ViM(encoder, d, w, b)``: same positional order and names (``encoder=`` is accepted for
    ``model``; ``w``, ``b`` tensors). Differences: ``d`` may be left out (the official rule), and ``d >= D`` is
    refused in ``fit`` (pytorch-ood silently replaces it by :math:`D/2`); its second moment is one float32
    product about :math:`u`.

    :param model: optional callable returning penultimate features (for ``fit`` / ``predict``)
    :param d: principal-subspace dimension, ``1 <= d < D``; ``None`` = the official rule
    :param w: head weights ``(C, D)``
    :param b: head bias ``(C,)`` (zeros if ``None``)
    """

    requires_fit: ClassVar[bool] = True
    streams_fit: ClassVar[bool] = True
    shared_statistics: ClassVar[Tuple[str, ...]] = ("second_moment_float32_products", "vim_spectrum",
                                                     "vim_alpha_terms")
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "d": Param(Interval(int, 1, D - 1), None, doc="principal dimension; None = the official rule"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"d": {"grid": OPENOOD_GRID}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, d: Optional[int] = None,
                 w: Optional[Tensor] = None, b: Optional[Tensor] = None):
        super().__init__(model)
        self.d = d
        self._set_head(w=w, b=b)

    @classmethod
    def search_space(cls, data: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        """OpenOOD's values below ``D``; where fewer than two are, ``{D/4, paper_dim(D), 3D/4}`` too."""
        return _dimension_grid(cls, data, OPENOOD_GRID, lambda dim: (dim // 4, paper_dim(dim), 3 * dim // 4))

    def _fit(self, z: Tensor, y: Tensor) -> None:
        self._fit_stream(lambda: [(z, y)])  # in memory: the stream of one chunk

    def _fit_stream(self, chunks: Chunks) -> None:
        self._require_head()
        dim = self.n_features_in_
        d = paper_dim(dim) if self.d is None else self.d
        if self.d is None:
            self.check_params({"d": d}, {"D": dim})  # the rule's d must fit too (D = 1 has no principal subspace)
        w, b = self.w.to(torch.float64), self.b.to(torch.float64)
        u = -(torch.linalg.pinv(w) @ b)
        # pass 1: the second moment about u, products in the features' precision about a point near their mean
        stats = shared(chunks, "second_moment_float32_products",
                       lambda: ClassMoments(dim, dtype=None).update_all(z for z, _ in chunks()))
        n = stats.n
        u = u.to(stats.device)
        head = hashlib.sha256(w.cpu().numpy().tobytes() + b.cpu().numpy().tobytes()).hexdigest()[:16]

        def spectrum():
            cov = stats.scatter(about=u) / n  # float64 (D, D)
            with one_thread(cov):
                _, evecs = torch.linalg.eigh(cov)  # ascending eigenvalues
            return float(torch.diagonal(cov).sum()), evecs

        trace, evecs = shared(chunks, f"vim_spectrum/{head}", spectrum)  # what no value of d changes

        def alpha_terms():  # pass 2, for every d at once: the mean max logit and the mean residual norms
            max_logit, resid = 0.0, torch.zeros(dim, dtype=torch.float64, device=evecs.device)
            for z, _ in chunks():
                max_logit = max_logit + self.logits(z).amax(dim=1).sum(dtype=torch.float64)
                for rows in row_slices(z):
                    p = (z[rows] - u.to(z)) @ evecs.to(z)  # coordinates on the eigenvectors, ascending
                    resid += p.to(torch.float64).square_().cumsum_(dim=1).sqrt_().sum(dim=0)
            return float(max_logit) / n, resid / n  # resid[r - 1]: mean norm on the r trailing directions

        mean_max_logit, mean_resid = shared(chunks, f"vim_alpha_terms/{head}", alpha_terms)
        self.u = u  #: origin, (D,) float64
        self.residual_basis = evecs[:, : dim - d].contiguous()  #: R, (D, D - d) float64
        # guard: features (almost) inside the principal subspace have no residual to match
        floor = 1e-8 * math.sqrt(max(trace, 0.0)) + 1e-12
        self.alpha = mean_max_logit / max(float(mean_resid[dim - d - 1]), floor)
        self.dim = d  #: the d of the last fit

    def _residual_norm(self, z: Tensor) -> Tensor:
        """:math:`\\lVert R^\\top (z - u) \\rVert` in the dtype of ``z``."""
        return ((z - self.u.to(z)) @ self.residual_basis.to(z)).norm(dim=1)

    def _vim(self, z: Tensor) -> Tensor:
        return self.alpha * self._residual_norm(z) - torch.logsumexp(self.logits(z), dim=1)

    def _score(self, z: Tensor) -> Tensor:
        return by_row_blocks(self._vim, z)
