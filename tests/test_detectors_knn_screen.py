"""KNN's bfloat16 screen (used on CPUs with AMX) gives the exact search's result.

The screen is forced on here (any CPU can run bfloat16 matmuls, just slower), on banks small enough
for a test, and compared with the float64 brute-force distance to the k-th neighbour.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ood_core.detectors.knn as knn_module
from ood_core.detectors import KNN


@pytest.fixture
def screen_on(monkeypatch):
    monkeypatch.setattr(knn_module, "fast_bf16_matmul", lambda device: True)
    monkeypatch.setattr(knn_module, "SCREEN_MIN_BANK", 1)
    monkeypatch.setattr(knn_module, "SCREEN_CHUNK_ELEMENTS", 1 << 18)  # several chunks


def _data(n=2000, d=40, n_test=300, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(5, d, generator=g) * 2
    y = torch.arange(n) % 5
    z = torch.relu(means[y] + torch.randn(n, d, generator=g)) + offset
    test = torch.cat([torch.relu(means[y[:n_test // 2]] + torch.randn(n_test // 2, d, generator=g)),
                      torch.relu(torch.randn(n_test - n_test // 2, d, generator=g) * 3)]) + offset
    return z, y, test


def _ref(z, test, k, normalize):
    z, test = z.double(), test.double()
    if normalize:
        z, test = z / z.norm(dim=1, keepdim=True), test / test.norm(dim=1, keepdim=True)
    return torch.cdist(test, z).topk(k, dim=1, largest=False).values[:, -1].numpy()


@pytest.mark.parametrize("k,normalize", [(1, False), (1, True), (5, False), (16, True)])
def test_screen_equals_exact(screen_on, k, normalize):
    z, y, test = _data()
    det = KNN(k=k, normalize=normalize).fit_features(z, y)
    got = det.predict_features(test)
    assert det._screen is not None  # the screen ran
    np.testing.assert_allclose(got.double().numpy(), _ref(z, test, k, normalize), rtol=2e-5, atol=1e-5)


def test_screen_certificate_falls_back_on_ties(screen_on, monkeypatch):
    # a bank of near-duplicates: the bfloat16 screen cannot separate them, the exact search decides
    z, y, test = _data(n=600, d=16, n_test=50)
    z = torch.cat([z, z[:1].repeat(400, 1) + 1e-4 * torch.randn(400, 16, generator=torch.Generator().manual_seed(1))])
    y = torch.cat([y, torch.zeros(400, dtype=torch.long)])
    test = torch.cat([test, z[:1] + 1e-5])
    calls = []
    exact = KNN._exact_kth
    monkeypatch.setattr(KNN, "_exact_kth", staticmethod(lambda *a: calls.append(a[0].shape[0]) or exact(*a)))
    got = KNN(k=3, normalize=False).fit_features(z, y).predict_features(test)
    assert calls and calls[0] >= 1  # some queries were not certified
    np.testing.assert_allclose(got[:-1].double().numpy(), _ref(z, test[:-1], 3, False), rtol=1e-4, atol=2e-5)
    # the last query sits among the near-duplicates: float32 ranks them as the exact search does
    monkeypatch.setattr(knn_module, "fast_bf16_matmul", lambda device: False)
    torch.testing.assert_close(got, KNN(k=3, normalize=False).fit_features(z, y).predict_features(test))


def test_screen_large_offset(screen_on):
    # features far from the origin: the centring keeps the screen's bound tight
    z, y, test = _data(offset=50.0)
    got = KNN(k=1, normalize=False).fit_features(z, y).predict_features(test)
    np.testing.assert_allclose(got.double().numpy(), _ref(z, test, 1, False), rtol=1e-4, atol=1e-4)


def test_screen_not_used_for_large_k_or_float64(screen_on):
    z, y, test = _data(n=400, d=8, n_test=20)
    det = KNN(k=knn_module.SCREEN_MAX_K + 1, normalize=False).fit_features(z, y)
    det.predict_features(test)
    assert det._screen is None
    det = KNN(k=1, normalize=False).fit_features(z.double(), y)
    np.testing.assert_allclose(det.predict_features(test.double()).numpy(), _ref(z, test, 1, False), rtol=1e-9)
    assert det._screen is None
