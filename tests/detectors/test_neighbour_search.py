"""The neighbour-search engine against float64 brute force: exact k-th distances in bounded memory, near-duplicates
accurate relative to the distance itself, scores independent of the batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ood_core.detectors.neighbour_search as ns


def _data(n=2000, d=40, n_test=300, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(5, d, generator=g) * 2
    y = torch.arange(n) % 5
    z = torch.relu(means[y] + torch.randn(n, d, generator=g)) + offset
    test = torch.cat([torch.relu(means[y[: n_test // 2]] + torch.randn(n_test // 2, d, generator=g)),
                      torch.relu(torch.randn(n_test - n_test // 2, d, generator=g) * 3)]) + offset
    return z, test


def ref_kth(bank, queries, k):
    """float64 brute force by direct differences."""
    return torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist") \
        .topk(k, dim=1, largest=False).values[:, -1].numpy()


def _near_duplicates(seed=0):
    """Bank rows with clusters of near-duplicates (spread 1e-4 at norm ~4) and queries inside them."""
    g = torch.Generator().manual_seed(seed)
    z, test = _data(n=600, d=16, n_test=20, seed=seed)
    centres = z[:3]
    z = torch.cat([z, centres.repeat_interleave(50, dim=0) + 1e-4 * torch.randn(150, 16, generator=g)])
    inside = centres.repeat_interleave(4, dim=0) + 3e-5 * torch.randn(12, 16, generator=g)
    return z, torch.cat([test, inside, z[:5]])  # ordinary queries, queries in a cluster, bank rows


@pytest.mark.parametrize("k", [1, 5, 50, 2000])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_kth_distance_equals_float64_brute_force(k, offset):
    bank, queries = _data(offset=offset)
    got = ns.kth_nearest_distance(queries, bank, k)
    assert got.dtype == torch.float32 and got.shape == (len(queries),)
    np.testing.assert_allclose(got.double().numpy(), ref_kth(bank, queries, k), rtol=1e-5, atol=0)


def test_float64_inputs_give_float64_accuracy():
    bank, queries = _data(n=500, d=16, n_test=50)
    got = ns.kth_nearest_distance(queries.double(), bank.double(), 3)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_kth(bank, queries, 3), rtol=1e-12)


def test_blocks_stay_under_the_element_budget(monkeypatch):
    bank, queries = _data(n=700, d=16, n_test=20)
    full = ns.kth_nearest_distance(queries, bank, 3)
    sims = ns.top_k_mean_similarity(queries, bank, 3)
    monkeypatch.setattr(ns, "CHUNK_ELEMENTS", 1500)  # 2 query rows per block
    blocks = []
    addmm, matmul = torch.addmm, torch.Tensor.__matmul__
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: blocks.append(a[1].shape[0] * a[2].shape[1]) or addmm(*a, **kw))
    torch.testing.assert_close(ns.kth_nearest_distance(queries, bank, 3), full, rtol=0, atol=0)
    assert blocks and max(blocks) <= 1500 and len(blocks) >= 10
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: blocks.append(a.shape[0] * b.shape[1]) or matmul(a, b))
    blocks.clear()
    torch.testing.assert_close(ns.top_k_mean_similarity(queries, bank, 3), sims, rtol=1e-6, atol=1e-6)
    assert max(blocks) <= 1500 and len(blocks) >= 10


@pytest.mark.parametrize("k", [1, 3, 20])
def test_near_duplicates_accurate_and_batch_independent(k):
    bank, queries = _near_duplicates()
    batch = ns.kth_nearest_distance(queries, bank, k)
    single = torch.cat([ns.kth_nearest_distance(queries[i : i + 1], bank, k) for i in range(len(queries))])
    torch.testing.assert_close(single, batch, rtol=0, atol=0)
    # accurate relative to the (tiny) distance itself, not to the features' norm: distances of 1e-4 among
    # features of norm ~4 (their float32 ulp is 5e-7; the expanded form alone is off by ~90%)
    np.testing.assert_allclose(batch.double().numpy(), ref_kth(bank, queries, k), rtol=1e-5, atol=0)


def test_exact_duplicates_give_zero():
    bank, _ = _data(n=300, d=16)
    bank = torch.cat([bank, bank[:10]])
    got = ns.kth_nearest_distance(bank[:10], bank, 2)  # each query is in the bank twice
    assert (got == 0).all()


def test_direct_differences_only_for_unresolved_queries(monkeypatch):
    calls = []
    direct = ns._kth_by_direct_differences
    monkeypatch.setattr(ns, "_kth_by_direct_differences", lambda q, *a: calls.append(q.shape[0]) or direct(q, *a))
    bank, queries = _data()
    ns.kth_nearest_distance(torch.nn.functional.normalize(queries, dim=1),
                            torch.nn.functional.normalize(bank, dim=1), 5)
    assert calls == []  # well separated neighbours: the expanded form decides
    bank, queries = _near_duplicates()
    ns.kth_nearest_distance(queries, bank, 3)
    assert calls == [15]  # the 12 queries inside clusters and the 3 bank rows at their centres


def test_expanded_error_bound_holds():
    g = torch.Generator().manual_seed(3)
    for offset, d in [(0.0, 8), (30.0, 64), (5.0, 512)]:
        bank = torch.randn(3000, d, generator=g) + offset
        q = torch.randn(200, d, generator=g) + offset
        got = torch.addmm((bank * bank).sum(dim=1), q, bank.T, alpha=-2.0).double()
        b64, q64 = bank.double(), q.double()
        exact = (b64 * b64).sum(dim=1) - 2 * q64 @ b64.T
        bound = ns.expanded_error_bound(q, float(b64.norm(dim=1).max()))
        assert bool(((got - exact).abs() <= bound[:, None]).all())
        assert float(((got - exact).abs() / bound[:, None]).max()) > 1e-4  # the bound is not vacuous


@pytest.mark.parametrize("k", [1, 10, 700])
def test_top_k_mean_similarity_equals_float64(k):
    bank, queries = _data(n=700, d=24, n_test=60)
    want = (queries.double() @ bank.double().T).topk(k, dim=1).values.mean(dim=1)
    got = ns.top_k_mean_similarity(queries, bank, k)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    single = torch.cat([ns.top_k_mean_similarity(queries[i : i + 1], bank, k) for i in range(10)])
    torch.testing.assert_close(single, got[:10], rtol=1e-6, atol=1e-5)


def test_empty_queries():
    bank, queries = _data(n=50, d=8, n_test=4)
    assert ns.kth_nearest_distance(queries[:0], bank, 3).shape == (0,)
    assert ns.top_k_mean_similarity(queries[:0], bank, 3).shape == (0,)
