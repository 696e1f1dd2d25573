"""KNN's bfloat16 screen (CPUs with AMX or AVX512-BF16) gives the exact search's result; near-duplicates
are ordered by direct differences, one sample at a time as in a batch.

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


# -- near-duplicates: the expanded form cannot order them, direct differences do --------------------------
def _near_duplicates(seed=0):
    """Training features with clusters of near-duplicates (spread 1e-4 at norm ~4) and queries inside them."""
    g = torch.Generator().manual_seed(seed)
    z, y, test = _data(n=600, d=16, n_test=20, seed=seed)
    centres = z[:3]
    dups = (centres.repeat_interleave(50, dim=0) + 1e-4 * torch.randn(150, 16, generator=g))
    z, y = torch.cat([z, dups]), torch.cat([y, torch.zeros(150, dtype=torch.long)])
    inside = centres.repeat_interleave(4, dim=0) + 3e-5 * torch.randn(12, 16, generator=g)
    return z, y, torch.cat([test, inside, z[:5]])  # ordinary queries, queries in a cluster, training rows


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_near_duplicates_accurate_and_batch_independent(monkeypatch, screen, k):
    monkeypatch.setattr(knn_module, "fast_bf16_matmul", lambda device: screen)
    monkeypatch.setattr(knn_module, "SCREEN_MIN_BANK", 1)
    z, y, test = _near_duplicates()
    det = KNN(k=k, normalize=False).fit_features(z, y)
    batch = det.predict_features(test)
    single = torch.cat([det.predict_features(test[i : i + 1]) for i in range(len(test))])
    torch.testing.assert_close(single, batch, rtol=0, atol=0)
    # accurate relative to the (tiny) distance itself, not to the features' norm: distances of 1e-4 among
    # features of norm ~4 within 2e-3 (their float32 ulp is 5e-7; the expanded form alone was off by 90%)
    np.testing.assert_allclose(batch.double().numpy(), _ref(z, test, k, False), rtol=2e-3, atol=0)


def test_near_tie_search_only_for_unresolved_queries(monkeypatch):
    calls = []
    resolved = KNN._resolved_kth
    monkeypatch.setattr(KNN, "_resolved_kth", staticmethod(lambda q, *a: calls.append(q.shape[0]) or resolved(q, *a)))
    z, y, test = _data(n=2000, d=40, n_test=300)
    KNN(k=5, normalize=True).fit_features(z, y).predict_features(test)
    assert calls == []  # well separated neighbours: the expanded form decides
    z, y, test = _near_duplicates()
    KNN(k=3, normalize=False).fit_features(z, y).predict_features(test)
    assert calls == [15]  # the 12 queries inside clusters and the 3 training rows at their centres


def test_matmul_error_bound_holds():
    g = torch.Generator().manual_seed(3)
    for offset, d in [(0.0, 8), (30.0, 64), (5.0, 512)]:
        bank = torch.randn(3000, d, generator=g) + offset
        q = torch.randn(200, d, generator=g) + offset
        bank_sq = (bank * bank).sum(dim=1)
        got = torch.addmm(bank_sq, q, bank.T, alpha=-2.0).double()
        b64, q64 = bank.double(), q.double()
        exact = (b64 * b64).sum(dim=1) - 2 * q64 @ b64.T
        bound = knn_module.matmul_error_bound(q, float(bank.double().norm(dim=1).max()))
        assert bool(((got - exact).abs() <= bound[:, None]).all())
        assert float(((got - exact).abs() / bound[:, None]).max()) > 1e-4  # the bound is not vacuous


# -- NNGuide's screen: the mean of the k largest inner products, certified like KNN's ---------------------
@pytest.mark.parametrize("k", [1, 10, 16])
def test_nnguide_screen_equals_exact(monkeypatch, k):
    import ood_core.detectors.neighbours as nb
    from ood_core.detectors import NNGuide

    z, y, test = _data(n=3000, d=40, n_test=300)
    g = torch.Generator().manual_seed(2)
    head = (torch.randn(5, 40, generator=g), torch.randn(5, generator=g))
    exact = NNGuide(head=head, k=k).fit_features(z, y).predict_features(test)
    monkeypatch.setattr(nb, "fast_bf16_matmul", lambda device: True)
    monkeypatch.setattr(nb, "SCREEN_MIN_BANK", 1)
    monkeypatch.setattr(knn_module, "SCREEN_CHUNK_ELEMENTS", 1 << 18)  # several chunks
    calls = []
    screen = nb.screened_top_mean
    monkeypatch.setattr(nb, "screened_top_mean", lambda *a: calls.append(1) or screen(*a))
    det = NNGuide(head=head, k=k).fit_features(z, y)
    torch.testing.assert_close(det.predict_features(test), exact, rtol=1e-5, atol=1e-5)
    assert calls and det._screen is not None
    # a bank the screen cannot separate (all rows nearly equal): uncertified queries are searched exactly
    flat = z[:1].repeat(3000, 1) + 1e-4 * torch.randn(3000, 40, generator=g)
    det = NNGuide(head=head, k=k).fit_features(flat, y)
    _, certified = screen(det._normalise(test), det.bank, det.bank.to(torch.bfloat16),
                          float(det.bank.norm(dim=1).max()) * 1.0001, k)
    assert not bool(certified.any())
    monkeypatch.setattr(nb, "fast_bf16_matmul", lambda device: False)
    want = det.predict_features(test)
    monkeypatch.setattr(nb, "fast_bf16_matmul", lambda device: True)
    torch.testing.assert_close(det.predict_features(test), want)
