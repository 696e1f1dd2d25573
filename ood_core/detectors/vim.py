"""ViM: Virtual-logit Matching."""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ..api import DetectorError, FeaturesDetector, InvalidInputError
from .head import HeadMixin, parse_head
from .mahalanobis import check_features, id_training_set, require_finite
from .numerics import one_thread, row_slices, scatter64


def _auto_dim(d_features: int) -> int:
    """The paper's choice of the principal dimension for a feature dimension ``D``."""
    if d_features >= 2048:
        return 1000
    if d_features >= 768:
        return 512
    return max(1, d_features // 2)


class ViM(HeadMixin, FeaturesDetector):
    r"""Virtual-logit Matching on penultimate features :math:`z \in R^D` and the linear head ``(w, b)``.

    Fit (ID training features; second moment and eigendecomposition in float64, the residual norms
    that give :math:`\alpha` in the features' dtype, float32 at least):

    * origin :math:`u = -W^{+} b` (pseudo-inverse of the head weights :math:`W \in R^{C\times D}`);
    * principal subspace: the top-:math:`d` eigenvectors of
      :math:`\frac1N \sum_i (z_i - u)(z_i - u)^\top`; :math:`R \in R^{D \times (D-d)}` spans
      the remaining eigenvectors;
    * :math:`\alpha = \sum_i \max_c l_c(z_i) \,/\, \sum_i \lVert R^\top (z_i - u) \rVert`, with
      logits :math:`l(z) = W z + b`.

    Score (higher = more OOD), the official code's (github.com/haoqiwang/vim) sign-flipped score:

    .. math:: s(x) = \underbrace{\alpha \lVert R^\top (z - u) \rVert}_{\text{virtual logit } l_0}
                     - \log \sum_{c=1}^{C} e^{l_c(z)}

    The paper states the score as the softmax probability of the virtual logit,
    :math:`p_0 = e^{l_0} / (e^{l_0} + \sum_c e^{l_c}) = \sigma(s(x))`: a strictly increasing
    function of :math:`s`, so both rank samples identically (same AUROC/FPR). pytorch-ood 0.4.0
    computes exactly :math:`s` (up to float32 vs float64 fitting).

    Paper: Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022
    (arXiv:2203.10807).

    :param model: optional callable returning penultimate features (for ``fit``/``predict``)
    :param d: principal-subspace dimension, ``1 <= d < D`` (checked in ``fit``);
        ``None`` = the paper's choice (1000 if D >= 2048, 512 if D >= 768, else D // 2)
    :param w: head weights ``(C, D)``
    :param b: head bias ``(C,)`` (zeros if ``None`` and ``w`` is given)
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {"d": {"grid": [256, 1000]}}

    def __init__(
        self,
        model: Optional[Callable[[Tensor], Tensor]] = None,
        d: Optional[int] = None,
        w: Optional[Tensor] = None,
        b: Optional[Tensor] = None,
    ):
        super().__init__(model)
        if d is not None:
            if int(d) != d or int(d) < 1:
                raise ValueError(f"ViM: d must be a positive integer, got {d!r}")
            d = int(d)
        self.d = d
        self.w: Optional[Tensor] = None
        self.b: Optional[Tensor] = None
        if w is not None:
            self.w, self.b = parse_head("ViM", (w, b))
        elif b is not None:
            raise ValueError("ViM: b given without w")
        self.u: Optional[Tensor] = None  #: origin -pinv(W) b, (D,) float64
        self.residual_basis: Optional[Tensor] = None  #: R, (D, D-d) float64
        self.alpha: Optional[float] = None
        self.dim: Optional[int] = None  #: the d used in the last fit

    def _require_head(self) -> None:  # ViM takes w= and b= (pytorch-ood's API), not head=
        if self.w is None:
            raise DetectorError("ViM: needs the classifier head; pass w=(C, D) weights and b=(C,) bias")

    @torch.no_grad()
    def fit_features(self, z: Tensor, y: Tensor) -> "ViM":
        self._require_head()
        z, _ = id_training_set(self, z, y, finite=False)  # checked through the second moment below
        n, dim = z.shape
        if self.w.shape[1] != dim:
            raise InvalidInputError(f"ViM: features have dimension {dim}, head weights expect {self.w.shape[1]}")
        d = _auto_dim(dim) if self.d is None else self.d
        if d >= dim:
            raise InvalidInputError(
                f"ViM: principal dimension d={d} must be smaller than the feature dimension D={dim}"
            )
        work = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.detach().to(work)
        w64 = self.w.to(z.device).double()
        b64 = self.b.to(z.device).double()
        u = -(torch.linalg.pinv(w64) @ b64)
        # second moment about u in float64: the split at d can have a small eigengap, where float32
        # sums would rotate the subspace visibly (measured: 2e-3 relative score error at D = 16, d = 15)
        cov = scatter64(z, u) / n
        require_finite(self, z, torch.diagonal(cov))
        with one_thread(cov):
            _, evecs = torch.linalg.eigh(cov)  # float64, ascending eigenvalues
        basis = evecs[:, : dim - d].contiguous()  # complement of the top-d eigenvectors
        # alpha from sums over cache-sized row chunks (float64 sums of the per-sample values)
        u_w, basis_w = u.to(work), basis.to(work)
        sums = torch.zeros(2, dtype=torch.float64, device=z.device)  # residual norms, max logits
        for rows in row_slices(z):
            sums[0] += (z[rows] - u_w).matmul(basis_w).norm(dim=1).sum(dtype=torch.float64)
            sums[1] += self.logits(z[rows]).amax(dim=1).sum(dtype=torch.float64)
        resid_mean, max_logit_mean = (float(v) / n for v in sums)
        norm_scale = math.sqrt(max(float(torch.diagonal(cov).sum()), 0.0))  # RMS of ||z - u||
        denom = max(resid_mean, 1e-8 * norm_scale + 1e-12)
        self.alpha = max_logit_mean / denom
        self.u = u
        self.residual_basis = basis
        self.dim = d
        self._mark_fitted()
        return self

    def virtual_logit(self, z: Tensor) -> Tensor:
        """:math:`\\alpha \\lVert R^\\top (z - u) \\rVert` for validated features ``(N, D)``."""
        dtype, device = z.dtype, z.device
        x = z - self.u.to(device=device, dtype=dtype)
        return self.alpha * (x @ self.residual_basis.to(device=device, dtype=dtype)).norm(dim=1)

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.u.shape[0])
        out = z.new_empty(z.shape[0])
        for rows in row_slices(z):  # cache-sized temporaries
            out[rows] = self.virtual_logit(z[rows]) - torch.logsumexp(self.logits(z[rows]), dim=1)
        return out
