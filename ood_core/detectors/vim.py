"""ViM: Virtual-logit Matching."""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..api import DetectorError, FeaturesDetector, InvalidInputError
from .head import HeadMixin, parse_head
from .mahalanobis import check_features, id_training_set, require_finite
from .numerics import one_thread, row_slices, scatter


def _auto_dim(d_features: int) -> int:
    """The paper's choice of the principal dimension for a feature dimension ``D``."""
    if d_features >= 2048:
        return 1000
    if d_features >= 768:
        return 512
    return max(1, d_features // 2)


class ViM(HeadMixin, FeaturesDetector):
    r"""Virtual-logit Matching on penultimate features :math:`z \in R^D` and the linear head ``(w, b)``.

    Fit (ID training features, in their precision: float32 features as in the official code, whose
    ``EmpiricalCovariance(assume_centered=True)`` forms ``X.T @ X`` in float32, and pytorch-ood; float64
    features give float64 throughout):

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
    computes exactly :math:`s`.

    Precision: the second moment is summed in float32 over 2048-row blocks about a point near the
    mean and the blocks in float64 (:func:`~.numerics.scatter`), then eigendecomposed in float64;
    pytorch-ood sums all N rows in one float32 product about :math:`u`. Measured against float64
    throughout (``benchmarks/RESULTS.md``; N = 50,000, D = 512, d = 256): largest score difference /
    largest |score| 7e-6 (C = 10) and 2e-6 (C = 100), median relative difference 2e-6. Scoring is one
    product ``z [R | W^T] + [-R^T u | b]``. Where the eigenvalues at the split :math:`d` nearly
    coincide, float32 sums rotate the split: with eigengap / largest eigenvalue ~5e-4
    (``tests/test_detectors.py``, D = 16, d = 15) scores move by ~2.4e-4 relative. Pass float64
    features for float64 throughout.

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
        cov = scatter(z, u) / n  # float64 (D, D); products in the features' precision
        require_finite(self, z, torch.diagonal(cov))
        with one_thread(cov):
            _, evecs = torch.linalg.eigh(cov)  # float64, ascending eigenvalues
        self.u = u
        self.residual_basis = evecs[:, : dim - d].contiguous()  # complement of the top-d eigenvectors
        # alpha: float64 sums over cache-sized row chunks of the residual norms and the max logits
        sums = torch.zeros(2, dtype=torch.float64, device=z.device)
        projection = self._projection(z)
        for rows in row_slices(z, width=projection[0].shape[1]):
            resid, logits = self._project(z[rows], projection)
            sums[0] += resid.sum(dtype=torch.float64)
            sums[1] += logits.amax(dim=1).sum(dtype=torch.float64)
        resid_mean, max_logit_mean = (float(v) / n for v in sums)
        norm_scale = math.sqrt(max(float(torch.diagonal(cov).sum()), 0.0))  # RMS of ||z - u||
        self.alpha = max_logit_mean / max(resid_mean, 1e-8 * norm_scale + 1e-12)
        self.dim = d
        self._mark_fitted()
        return self

    def _projection(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """``(B, c)`` in the dtype and on the device of ``z``: ``B = [R | W^T | 0]`` ``(D, K)`` and
        ``c = [-R^T u | b | 0]``, so that one product ``z B + c`` gives the residual coordinates of
        ``z - u`` and the logits (``K`` = ``D - d + C`` rounded up to a multiple of 16: a ragged width
        made the product 1.3x slower on AVX-512)."""
        dtype, device = z.dtype, z.device
        w64, r64 = self.w.to(device).double(), self.residual_basis.to(device)
        k, c = r64.shape[1], w64.shape[0]
        both = torch.zeros(w64.shape[1], -(-(k + c) // 16) * 16, dtype=torch.float64, device=device)
        both[:, :k], both[:, k : k + c] = r64, w64.T
        shift = torch.zeros(both.shape[1], dtype=torch.float64, device=device)
        shift[:k], shift[k : k + c] = -(self.u.to(device) @ r64), self.b.to(device).double()
        return both.to(dtype), shift.to(dtype)

    def _project(self, z: Tensor, projection: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        """``(||R^T (z - u)||, logits)`` of validated features ``(N, D)``."""
        both, shift = projection
        y = torch.addmm(shift, z, both)
        k, c = self.residual_basis.shape[1], self.w.shape[0]
        return torch.linalg.vector_norm(y[:, :k], dim=1), y[:, k : k + c]

    def virtual_logit(self, z: Tensor) -> Tensor:
        """:math:`\\alpha \\lVert R^\\top (z - u) \\rVert` for validated features ``(N, D)``."""
        return self.alpha * self._project(z, self._projection(z))[0]

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Tensor:
        self._require_fit()
        z = check_features(self, z, self.u.shape[0])
        out = z.new_empty(z.shape[0])
        projection = self._projection(z)
        for rows in row_slices(z, width=projection[0].shape[1]):  # cache-sized temporaries
            resid, logits = self._project(z[rows], projection)
            out[rows] = self.alpha * resid - torch.logsumexp(logits, dim=1)
        return out
