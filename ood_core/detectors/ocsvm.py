"""One-class SVM helpers for :mod:`.la_ood`: pseudo data by self-adaptive shifting, RBF-width
selection, and the OCSVM decision function in torch (any device, chunked)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

#: default RBF widths, as multiples of 1/D (scikit-learn's ``gamma="scale"`` for standardised features)
GAMMA_GRID = tuple(float(g) for g in np.logspace(-2, 2, 9))
#: fewest ID training rows LA-OOD fits on (the k-NN edge detection needs a neighbourhood)
MIN_ROWS = 10
#: elements of the largest (rows x support vectors) kernel block in :func:`rbf_decision`
CHUNK_ELEMENTS = 1 << 22


def _knn(x: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k).fit(x)
    return nn.kneighbors()  # without X: a point is not its own neighbour, even with duplicates


def self_adaptive_shifting(
    x, k: Optional[int] = None, edge_threshold: float = 0.1
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Pseudo outliers and pseudo targets from one-class data ``x`` ``(n, D)`` (Wang et al. 2018).

    With :math:`x_{ij}` the :math:`k` nearest neighbours of :math:`x_i` (default
    :math:`k = \lceil 5 \log_{10} n \rceil`) and :math:`v_{ij} = (x_i - x_{ij}) / \lVert x_i - x_{ij} \rVert`:

    * edge patterns: :math:`n_i = \sum_j v_{ij}` (the negative mean direction of the neighbours) and
      :math:`l_i = \frac1k \sum_j [v_{ij}^\top n_i \ge 0]`; :math:`x_i` is an edge pattern when
      :math:`l_i \ge 1 - \text{edge\_threshold}` (all, or nearly all, neighbours lie behind it). When no
      point qualifies, the 10 % with the largest :math:`l_i` are used;
    * pseudo outliers: every edge pattern shifted outward, :math:`x_i + \ell\, n_i / \lVert n_i \rVert`, by
      the self-adaptive length :math:`\ell` = mean distance of the edge patterns to their neighbours;
    * pseudo targets: every sample shifted inward, :math:`x_i - d_i\, n_i / \lVert n_i \rVert` with
      :math:`d_i` the smallest positive projection of :math:`x_{ij} - x_i` on that inward direction (0
      when there is none), so a shifted sample does not pass its nearest neighbour in that direction.

    Returns ``(pseudo_outliers (m, D), pseudo_targets (n, D), edge_mask (n,))`` as float64 arrays.

    Paper: S. Wang, Q. Liu, E. Zhu, F. Porikli, J. Yin, "Hyperparameter selection of one-class support
    vector machine by self-adaptive data shifting", Pattern Recognition 74 (2018); edge detection after
    Li & Maguire, "Selecting critical patterns based on local geometrical and statistical information",
    TPAMI 2011.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if x.ndim != 2 or n < 3:
        raise ValueError(f"self_adaptive_shifting: need (n >= 3, D) data, got shape {x.shape}")
    k = int(k) if k else math.ceil(5 * math.log10(n))
    k = max(1, min(k, n - 1))
    dist, idx = _knn(x, k)
    inv = 1.0 / np.maximum(dist, 1e-12)
    normal = np.zeros_like(x)
    for j in range(k):  # loops over k (not over samples) keep memory at O(n D)
        normal += (x - x[idx[:, j]]) * inv[:, j : j + 1]
    behind = np.zeros(n)
    for j in range(k):
        behind += np.einsum("nd,nd->n", (x - x[idx[:, j]]) * inv[:, j : j + 1], normal) >= 0
    norm = np.linalg.norm(normal, axis=1)
    ok = norm > 1e-12
    l = np.where(ok, behind / k, 0.0)
    edge = (l >= 1.0 - edge_threshold) & ok
    if not edge.any():
        edge = l >= np.quantile(l, 0.9)
        edge &= ok
        if not edge.any():
            edge = np.ones(n, dtype=bool)
    unit = np.where(ok[:, None], normal / np.where(ok, norm, 1.0)[:, None], 0.0)
    shift = float(dist[edge].mean())
    outliers = x[edge] + shift * unit[edge]
    inward = -unit
    step = np.full(n, np.inf)
    for j in range(k):
        proj = np.einsum("nd,nd->n", x[idx[:, j]] - x, inward)
        step = np.where((proj > 0) & (proj < step), proj, step)
    step = np.where(np.isfinite(step), step, 0.0)
    targets = x + step[:, None] * inward
    return outliers, targets, edge


@torch.no_grad()
def rbf_decision(x: Tensor, sv: Tensor, dual: Tensor, intercept: float, gamma: float) -> Tensor:
    r"""OCSVM decision function :math:`g(x) = \sum_i \alpha_i e^{-\gamma \lVert x - s_i \rVert^2} + \rho`
    (scikit-learn's ``decision_function``: ``dual_coef_``, ``intercept_``) in float64 torch on ``x``'s
    device, in chunks of rows so the kernel block stays below :data:`CHUNK_ELEMENTS`."""
    x = x.to(torch.float64)
    sv, dual = sv.to(x.device, torch.float64), dual.to(x.device, torch.float64)
    sv_sq = (sv * sv).sum(dim=1)
    rows = max(1, CHUNK_ELEMENTS // max(1, sv.shape[0]))
    out = []
    for i in range(0, x.shape[0], rows):
        xb = x[i : i + rows]
        d2 = ((xb * xb).sum(dim=1, keepdim=True) + sv_sq[None, :] - 2.0 * xb @ sv.T).clamp_(min=0.0)
        out.append(torch.exp(-gamma * d2) @ dual + intercept)
    return torch.cat(out) if out else x.new_zeros(0)


def _svm_parts(svm) -> Tuple[Tensor, Tensor, float]:
    return (
        torch.as_tensor(np.asarray(svm.support_vectors_, dtype=np.float64)),
        torch.as_tensor(np.asarray(svm.dual_coef_, dtype=np.float64).ravel()),
        float(np.asarray(svm.intercept_).ravel()[0]),
    )


def select_gamma(x, outliers, targets, gammas: Sequence[float], nu: float = 0.001):
    r"""RBF width minimising :math:`err(\gamma) = \text{accepted pseudo outliers} / m + \text{rejected
    pseudo targets} / n` of ``OneClassSVM(nu, gamma).fit(x)``; ties go to the smallest :math:`\gamma` (the
    smoothest boundary). Returns ``(gamma, model fitted with it, errors (len(gammas),))``."""
    from sklearn.svm import OneClassSVM

    outliers = torch.as_tensor(np.asarray(outliers, dtype=np.float64))
    targets = torch.as_tensor(np.asarray(targets, dtype=np.float64))
    best = None
    errors = []
    for g in gammas:
        svm = OneClassSVM(kernel="rbf", nu=nu, gamma=float(g)).fit(x)
        sv, dual, rho = _svm_parts(svm)  # accepted <=> g(x) > 0, as libsvm's predict
        accepted_outliers = (rbf_decision(outliers, sv, dual, rho, float(g)) > 0).double().mean()
        rejected_targets = (rbf_decision(targets, sv, dual, rho, float(g)) <= 0).double().mean()
        err = float(accepted_outliers + rejected_targets)
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, float(g), svm)
    return best[1], best[2], np.asarray(errors)
