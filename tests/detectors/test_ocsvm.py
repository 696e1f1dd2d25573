"""ood_core/detectors/ocsvm.py: self-adaptive data shifting (pseudo outliers / targets), RBF-width selection
and the torch OCSVM decision function, against geometry and scikit-learn."""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import Delaunay
from sklearn.svm import OneClassSVM

import ood_core.detectors.ocsvm as ocsvm_module
from ood_core.detectors.ocsvm import _svm_parts, rbf_decision, select_gamma, self_adaptive_shifting


def test_self_adaptive_shifting_on_2d_toy():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(400, 2))
    outliers, targets, edge = self_adaptive_shifting(x)
    hull = Delaunay(x)
    assert 0 < edge.sum() < 0.25 * len(x) and len(outliers) == edge.sum() and len(targets) == len(x)
    assert np.mean(hull.find_simplex(outliers) < 0) >= 0.9  # pseudo outliers outside the data hull
    assert np.all(hull.find_simplex(targets) >= 0)  # pseudo targets inside it
    # edge patterns lie near the border of the square
    assert np.mean(np.abs(x[edge]).max(axis=1) > 0.8) >= 0.8
    grid = [g / 2 for g in np.logspace(-2, 2, 9)]
    gamma, svm, errors = select_gamma(x, outliers, targets, grid, nu=0.001)
    assert grid[0] < gamma < grid[-1] and errors.min() < 0.15 and errors[0] > 0.3 and errors[-1] > 0.3
    assert gamma == grid[int(np.argmin(errors))]
    fresh = rng.uniform(-1, 1, size=(500, 2))
    ring = rng.uniform(-1.6, 1.6, size=(4000, 2))
    ring = ring[np.abs(ring).max(axis=1) > 1.3]
    assert np.mean(svm.predict(fresh) == 1) >= 0.9 and np.mean(svm.predict(ring) == -1) >= 0.9


def test_rbf_decision_is_scikit_learns(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5))
    svm = OneClassSVM(kernel="rbf", nu=0.05, gamma=0.3).fit(x)
    sv, dual, rho = _svm_parts(svm)
    q = torch.as_tensor(rng.normal(size=(70, 5)) * 2)
    expected = svm.decision_function(q.numpy())
    np.testing.assert_allclose(rbf_decision(q, sv, dual, rho, 0.3).numpy(), expected, rtol=1e-9, atol=1e-9)
    monkeypatch.setattr(ocsvm_module, "CHUNK_ELEMENTS", 3 * sv.shape[0])  # 3 rows per kernel block
    np.testing.assert_allclose(rbf_decision(q.float(), sv, dual, rho, 0.3).numpy(), expected, rtol=1e-6, atol=1e-6)
