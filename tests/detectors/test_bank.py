"""Memory banks of KNN and NNGuide: the bank fraction alpha (size, seeded rows, the bound on k, at fit and at the
sweep's plan), the fit streamed from row chunks of float16 / float32 memory-mapped columns, and the approximate IVF
index (faiss) against brute-force numpy references, with its measured recall."""
from __future__ import annotations

import math
import pickle
import sys

import numpy as np
import pytest
import torch

import ood_core.detectors.knn as knn_module
from ood_core.constraints import ParameterError
from ood_core.detectors import KNN, NNGuide
from ood_core.detectors.knn import normalise
from ood_core.detectors.neighbour_search import (bank_size, gather_rows, kth_nearest_distance, recall_at_k,
                                                 top_k_mean_similarity)
from ood_core.rows import RowSource
from orchestrator.config import check_detector_values
from orchestrator.errors import ConfigError


# -- data and references ------------------------------------------------------------------------------------
def _clustered(n=1200, d=16, n_test=200, seed=0):
    """ReLU features of 8 Gaussian classes, labels, ID + OOD queries, a head (w, b)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(8, d, generator=g) * 2.5
    y = torch.arange(n) % 8
    z = torch.relu(means[y] + torch.randn(n, d, generator=g) + 0.5)
    test = torch.cat([torch.relu(means[torch.arange(n_test // 2) % 8] + torch.randn(n_test // 2, d, generator=g) + .5),
                      torch.relu(3 * torch.rand(n_test - n_test // 2, d, generator=g))])
    w, b = torch.randn(8, d, generator=g) / d**0.5, 0.1 * torch.randn(8, generator=g)
    return z, y, test, (w, b)


def today_knn(z_train, queries, k, normalize=True):
    """KNN before the bank fraction existed: the whole training set, normalised, exact search."""
    f = normalise if normalize else (lambda x: x)
    return kth_nearest_distance(f(queries), f(z_train), k)


def today_nnguide(z_train, queries, head, k):
    w, b = head
    energy = lambda x: torch.logsumexp(x @ w.T + b, dim=1)  # noqa: E731
    bank = normalise(z_train) * energy(z_train)[:, None]
    return -top_k_mean_similarity(normalise(queries), bank, k) * energy(queries)


def np_knn_ids(bank, queries, k, metric="l2", exclude=None):
    """Brute force in float64 numpy: the ids of the k nearest bank rows (l2: smallest distance; ip: largest
    inner product) of each query, ``exclude[i]`` left out for query i."""
    b, q = np.asarray(bank, np.float64), np.asarray(queries, np.float64)
    if metric == "l2":
        s = -((q[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)
    else:
        s = q @ b.T
    if exclude is not None:
        s[np.arange(len(q)), np.asarray(exclude)] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def np_recall(found, exact):
    """|found ∩ exact| / k per query, averaged; -1 in ``found`` is a miss."""
    found, exact = np.asarray(found), np.asarray(exact)
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / exact.shape[1] for f, e in zip(found, exact)]))


# -- alpha = 1 is today's detector ---------------------------------------------------------------------------
@pytest.mark.parametrize("k,normalize", [(1, True), (7, True), (7, False), (1200, True)])
def test_alpha_one_gives_todays_knn_scores_exactly(k, normalize):
    z, y, test, _ = _clustered()
    det = KNN(k=k, normalize=normalize).fit_features(z, y)
    assert det.alpha == 1.0 and det.bank_size_ == len(z)
    assert torch.equal(det.bank_rows_, torch.arange(len(z)))
    assert torch.equal(det.predict_features(test), today_knn(z, test, k, normalize))


@pytest.mark.parametrize("k", [1, 10, 1200])
def test_alpha_one_gives_todays_nnguide_scores_exactly(k):
    z, y, test, head = _clustered()
    det = NNGuide(head=head, k=k).fit_features(z, y)
    assert torch.equal(det.predict_features(test), today_nnguide(z, test, head, k))


# -- alpha < 1: size, rows, seed ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,alpha,want", [(1200, 0.1, 120), (1200, 0.011, 14), (100, 0.07, 7), (1200, 1e-6, 1),
                                          (1281167, 0.01, 12812), (10, 1.0, 10)])
def test_bank_size_is_the_ceiling_of_alpha_n(n, alpha, want):
    assert bank_size(n, alpha) == want
    assert want == min(n, max(1, math.ceil(round(alpha * n, 9))))  # 0.07 * 100 = 7.000000000000001 in binary


@pytest.mark.parametrize("alpha", [0.011, 0.25, 0.5])
def test_subsampled_bank_has_the_right_rows_and_scores(alpha):
    z, y, test, head = _clustered()
    det = KNN(k=3, alpha=alpha, seed=5).fit_features(z, y)
    rows = det.bank_rows_
    m = math.ceil(alpha * len(z))
    assert det.bank_size_ == m == rows.numel() == len(set(rows.tolist()))
    assert bool((rows[1:] > rows[:-1]).all()) and 0 <= int(rows[0]) and int(rows[-1]) < len(z)
    assert torch.equal(det.bank, normalise(z[rows]))
    assert torch.equal(det.predict_features(test), today_knn(z[rows], test, 3))
    nng = NNGuide(head=head, k=3, alpha=alpha, seed=5).fit_features(z, y)
    assert torch.equal(nng.bank_rows_, rows)  # the same draw for the same N, alpha and seed
    torch.testing.assert_close(nng.predict_features(test), today_nnguide(z[rows], test, head, 3), rtol=1e-6, atol=1e-6)


def test_same_seed_same_bank_other_seed_other_bank():
    z, y, _, _ = _clustered()
    a = KNN(k=3, alpha=0.1, seed=3).fit_features(z, y).bank_rows_
    assert torch.equal(a, KNN(k=3, alpha=0.1, seed=3).fit_features(z, y).bank_rows_)
    assert not torch.equal(a, KNN(k=3, alpha=0.1, seed=4).fit_features(z, y).bank_rows_)
    assert not torch.equal(a, torch.arange(120))  # not the first rows


def test_bank_rows_are_uniform_over_the_training_rows():
    n, alpha, draws = 40, 0.25, 400
    z, y = torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(n, dtype=torch.long)
    counts = torch.zeros(n)
    for seed in range(draws):
        counts[KNN(k=1, alpha=alpha, seed=seed).fit_features(z, y).bank_rows_] += 1
    expected = draws * alpha  # 100 per row; binomial sd ~8.7
    assert float(counts.sum()) == draws * 10
    assert float((counts - expected).abs().max()) < 40
    chi2 = float(((counts - expected) ** 2 / (expected * (1 - alpha))).sum())
    assert chi2 < 80  # 39 degrees of freedom: p < 1e-4 beyond 80


def test_outlier_rows_are_not_counted_in_n_nor_drawn():
    z, y, test, _ = _clustered()
    y_out = y.clone()
    y_out[::3] = -1  # 400 auxiliary outliers among 1200 rows
    det = KNN(k=3, alpha=0.1, seed=1).fit_features(z, y_out)
    id_rows = z[y_out >= 0]
    assert det.bank_size_ == 80
    assert torch.equal(det.bank, normalise(id_rows[det.bank_rows_]))


# -- streaming fit from chunks of memory-mapped columns ------------------------------------------------------
def _memmap(tmp_path, z, dtype):
    path = tmp_path / f"features_{np.dtype(dtype).name}.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(z.shape))
    mm[:] = z.numpy().astype(dtype)
    mm.flush()
    return np.load(path, mmap_mode="r")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_streaming_fit_equals_the_in_memory_fit(tmp_path, monkeypatch, dtype, alpha):
    z, y, test, head = _clustered()
    y = y.clone()
    y[5::7] = -1  # auxiliary outliers inside the chunks
    column = _memmap(tmp_path, z, dtype)
    in_memory = torch.from_numpy(np.array(column, dtype=np.float32))
    rows = RowSource({"features": column}, y.numpy(), chunk_rows=37)
    monkeypatch.setattr(RowSource, "tensor", lambda *a, **k: pytest.fail("the whole column was read"))
    seen = []
    chunks = RowSource.chunks
    monkeypatch.setattr(RowSource, "chunks", lambda self, *a, **k: (seen.append(x.shape[0]) or (x, yy)
                                                                    for x, yy in chunks(self, *a, **k)))
    for make in (lambda: KNN(k=4, alpha=alpha, seed=2), lambda: NNGuide(head=head, k=4, alpha=alpha, seed=2)):
        streamed, direct = make().fit_rows(rows, "features"), make().fit_features(in_memory, y)
        assert streamed.streams_fit and max(seen) == 37 and len(seen) >= len(z) // 37
        assert torch.equal(streamed.bank_rows_, direct.bank_rows_)
        assert streamed.bank.dtype == torch.float32
        torch.testing.assert_close(streamed.bank, direct.bank, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(streamed.predict_features(test), direct.predict_features(test), rtol=1e-6,
                                   atol=1e-6)
        seen.clear()
    knn = KNN(k=4, alpha=alpha, seed=2).fit_rows(rows, "features")  # KNN's entries are row-wise: bit for bit
    assert torch.equal(knn.bank, KNN(k=4, alpha=alpha, seed=2).fit_features(in_memory, y).bank)


def test_gather_rows_picks_across_chunk_edges():
    x = torch.arange(50.0)[:, None].repeat(1, 3)
    stream = [(x[i : i + 7], None) for i in range(0, 50, 7)]
    rows = torch.tensor([0, 6, 7, 8, 20, 48, 49])
    got = gather_rows(iter(stream), {"a": (rows, None), "b": (torch.tensor([13]), lambda t: -t)})
    assert torch.equal(got["a"][:, 0], rows.float()) and torch.equal(got["b"], -x[13:14])
    with pytest.raises(ValueError, match="row 50 asked for, the stream has 50 rows"):
        gather_rows(iter(stream), {"a": (torch.tensor([3, 50]), None)})


# -- k must fit the bank: at fit, set_params and the sweep's plan ------------------------------------------
def test_k_above_the_bank_size_is_refused_at_fit_naming_the_field():
    z, y, _, head = _clustered()  # N = 1200; alpha = 0.1: 120 rows
    with pytest.raises(ParameterError, match=r"^KNN: k=121 must be <= the bank size ceil\(alpha\*N\) = "
                                             r"ceil\(0.1\*1200\) = 120; lower k or raise alpha$"):
        KNN(k=121, alpha=0.1).fit_features(z, y)
    assert KNN(k=120, alpha=0.1).fit_features(z, y).bank_size_ == 120
    with pytest.raises(ParameterError, match=r"NNGuide: k=13 must be <= the bank size .* = 12;"):
        NNGuide(head=head, k=13, alpha=0.01).fit_features(z, y)
    with pytest.raises(ParameterError, match=r"KNN: nlist=121 must be <= the bank size"):
        KNN(k=5, alpha=0.1, nlist=121).fit_features(z, y)
    det = KNN(k=5, alpha=0.1).fit_features(z, y)
    with pytest.raises(ParameterError, match=r"KNN: k=200 must be <= the bank size"):
        det.set_params(k=200)  # k is not structural, but its bound holds for the fitted bank
    for bad in (0, 0.0, -0.5, 1.5, "0.1", None):
        with pytest.raises(ParameterError, match="KNN: alpha="):
            KNN(alpha=bad)


def test_k_above_the_bank_size_is_refused_by_the_sweeps_plan():
    data = {"D": 16, "C": 8, "N": 50000, "L": None}
    with pytest.raises(ConfigError, match=r"^detectors\[0\]\.search\.k: KNN: k=1000 must be <= the bank size "
                                          r"ceil\(alpha\*N\) = ceil\(0.01\*50000\) = 500; lower k or raise alpha$"):
        check_detector_values("detectors[0]", KNN, {"alpha": 0.01}, KNN.search_space(data), data)
    check_detector_values("detectors[0]", KNN, {"alpha": 0.01}, {"k": {"grid": [10, 500]}}, data)
    with pytest.raises(ConfigError, match=r"^detectors\[1\]\.search\.alpha: NNGuide: k=100 must be <= the bank "
                                          r"size ceil\(alpha\*N\) = ceil\(0.001\*50000\) = 50"):
        check_detector_values("detectors[1]", NNGuide, {"k": 100}, {"alpha": {"grid": [0.01, 0.001]}}, data)
    # searchable: alpha is declared, structural, a fraction in (0, 1]
    assert NNGuide.parameter_constraints["alpha"].structural and not KNN.parameter_constraints["nprobe"].structural
    check_detector_values("detectors[0]", KNN, {}, {"alpha": {"uniform": [0.01, 1.0]}, "k": {"grid": [1, 50]}}, data)
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.search\.alpha: KNN: alpha=0 must be in \(0, 1\]"):
        check_detector_values("detectors[0]", KNN, {}, {"alpha": {"grid": [0, 0.5]}}, data)


def test_ivf_without_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(ParameterError, match=r"KNN: index='ivf' needs faiss, which is not installed: "
                                             r"pip install 'ood-sweep\[faiss\]'"):
        KNN(index="ivf")
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.params\.index: NNGuide: index='ivf' needs faiss"):
        check_detector_values("detectors[0]", NNGuide, {"index": "ivf"}, {}, {"N": 100})
    KNN(index="exact").fit_features(*_clustered()[:2])  # the exact search needs no faiss


# -- the IVF index (faiss) ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faiss():
    return pytest.importorskip("faiss")


@pytest.mark.parametrize("normalize", [True, False])
def test_ivf_probing_every_cell_equals_exact_knn(faiss, normalize):
    z, y, test, _ = _clustered(n=3000)
    exact = KNN(k=10, normalize=normalize).fit_features(z, y)
    ivf = KNN(k=10, normalize=normalize, index="ivf", nlist=20, nprobe=20).fit_features(z, y)
    assert ivf.ivf_.nlist == 20 and ivf.ivf_.index.ntotal == 3000
    torch.testing.assert_close(ivf.predict_features(test), exact.predict_features(test), rtol=1e-6, atol=1e-7)
    assert ivf.recall_ == 1.0 and exact.recall_ == 1.0


def test_ivf_probing_every_cell_equals_exact_nnguide(faiss):
    z, y, test, head = _clustered(n=3000)
    exact = NNGuide(head=head, k=10).fit_features(z, y)
    ivf = NNGuide(head=head, k=10, index="ivf", nlist=20, nprobe=20).fit_features(z, y)
    torch.testing.assert_close(ivf.predict_features(test), exact.predict_features(test), rtol=1e-5, atol=1e-6)
    assert ivf.recall_ == 1.0


def _bank_recall_reference(det):
    """recall_ recomputed by brute force: the held-out bank rows as queries, each without its own entry."""
    held = det._recall_exclude.numpy()
    queries = det._recall_queries
    k = det.k
    _, found = det.ivf_.search(queries, k + 1, det.nprobe)
    found = found.numpy()
    kept = np.stack([f[f != h][:k] for f, h in zip(found, held)])  # the index's k nearest other rows
    exact = np_knn_ids(det.bank.numpy(), queries.numpy(), k, det.metric, exclude=held)
    return np_recall(kept, exact), kept


@pytest.mark.parametrize("make,offset", [(lambda h: KNN(k=10, index="ivf", nlist=40, nprobe=1), 0.0),
                                         (lambda h: KNN(k=10, normalize=False, index="ivf", nlist=40, nprobe=1), 300.),
                                         (lambda h: NNGuide(head=h, k=10, index="ivf", nlist=40, nprobe=1), 0.0)])
def test_ivf_recall_with_few_probes_is_below_one_and_measured_exactly(faiss, make, offset):
    z, y, test, head = _clustered(n=3000, d=24)
    z = z + offset  # raw features far from the origin: the recall's reference search is centred
    det = make(head).fit_features(z, y)
    assert det._recall_queries.shape[0] == 1000 and not bool((det._recall_exclude < 0).any())
    want, _ = _bank_recall_reference(det)
    assert 0.2 < want < 0.999
    assert det.recall_ == pytest.approx(want, abs=1e-12)
    det.set_params(nprobe=40)  # nprobe is not structural: the recall follows it
    assert det.recall_ == 1.0
    det.set_params(nprobe=4)
    fresh = make(head).set_params(nprobe=4).fit_features(z, y)
    assert det.recall_ == fresh.recall_ == pytest.approx(_bank_recall_reference(fresh)[0], abs=1e-12)


def test_recall_at_k_on_given_queries_equals_numpy(faiss):
    z, y, test, _ = _clustered(n=2000, d=24)
    det = KNN(k=8, index="ivf", nlist=30, nprobe=2).fit_features(z, y)
    q = normalise(test)
    _, found = det.ivf_.search(q, 8, 2)
    exact = np_knn_ids(det.bank.numpy(), q.numpy(), 8)
    want = np_recall(found.numpy(), exact)
    assert 0.0 < want < 1.0
    assert recall_at_k(det.ivf_, det.bank, q, 8, 2) == pytest.approx(want, abs=1e-12)
    assert recall_at_k(det.ivf_, det.bank, q, 8, 30) == 1.0
    assert det.recall_on(test) == pytest.approx(want, abs=1e-12)  # the detector's queries: normalised features
    every_other = np_recall(found.numpy()[::2], exact[::2])
    assert det.recall_on(test, max_queries=100) == pytest.approx(every_other, abs=1e-12)
    assert KNN(k=8).fit_features(z, y).recall_on(test) == 1.0


def test_ivf_scores_are_the_distance_to_the_kth_row_found(faiss):
    z, y, test, _ = _clustered(n=3000, d=24)
    det = KNN(k=10, index="ivf", nlist=40, nprobe=1).fit_features(z, y)
    got = det.predict_features(test)
    q = normalise(test)
    _, found = det.ivf_.search(q, 10, 1)
    kth = found[:, 9]
    exact = today_knn(z, test, 10)
    ref = np.where(kth.numpy() >= 0, np.linalg.norm(q.numpy() - det.bank.numpy()[kth.clamp(min=0)], axis=1),
                   exact.numpy())  # fewer than k rows in the probed cell: searched exactly
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)
    assert bool((got >= exact - 1e-6).all()) and bool((got > exact + 1e-4).any())  # a miss only raises the score


def test_ivf_with_a_bank_fraction_and_pickling(faiss):
    z, y, test, head = _clustered(n=3000)
    det = NNGuide(head=head, k=5, alpha=0.2, seed=1, index="ivf", nprobe=3).fit_features(z, y)
    assert det.bank_size_ == 600 and det.ivf_.nlist == 15  # round(sqrt(600)) = 24 > 600 // 39 = 15
    again = pickle.loads(pickle.dumps(det))
    assert torch.equal(again.predict_features(test), det.predict_features(test))
    assert again.recall_ == det.recall_
    same = NNGuide(head=head, k=5, alpha=0.2, seed=1, index="ivf", nprobe=3).fit_features(z, y)
    assert torch.equal(same.predict_features(test), det.predict_features(test))  # seeded: k-means included


def test_recall_queries_are_capped_by_the_bank(faiss, monkeypatch):
    monkeypatch.setattr(knn_module, "RECALL_QUERIES", 50)
    z, y, _, _ = _clustered(n=400)
    det = KNN(k=3, alpha=0.1, index="ivf", nlist=2, nprobe=1).fit_features(z, y)
    assert det._recall_queries.shape[0] == 40  # all 40 bank rows
    assert torch.equal(det._recall_queries, det.bank[det._recall_exclude])
    assert 0 < det.recall_ <= 1


def test_queries_whose_probed_cells_hold_fewer_than_k_rows_are_searched_exactly(faiss):
    z, y, test, head = _clustered(n=400, d=24)
    knn = KNN(k=60, index="ivf", nlist=10, nprobe=1).fit_features(z, y)  # ~40 rows per cell < k
    _, found = knn.ivf_.search(normalise(test), 60, 1)
    short = (found[:, -1] < 0).nonzero()[:, 0]
    assert short.numel() > 20
    torch.testing.assert_close(knn.predict_features(test)[short], today_knn(z, test, 60)[short], rtol=0, atol=0)
    nng = NNGuide(head=head, k=60, index="ivf", nlist=10, nprobe=1).fit_features(z, y)
    _, found = nng.ivf_.search(normalise(test), 60, 1)
    short = (found[:, -1] < 0).nonzero()[:, 0]
    assert short.numel() > 20
    torch.testing.assert_close(nng.predict_features(test)[short], today_nnguide(z, test, head, 60)[short])
    assert knn.recall_ < 1 and nng.recall_ < 1  # a missing result is a miss


def test_the_default_k_grid_is_cut_to_the_bank_of_a_fixed_alpha():
    """``params: {alpha: 0.01}`` without a search: OpenOOD's k grid loses the values above the bank
    (ceil(0.01 * 50,000) = 500), as it loses those above N, and the plan accepts it; a bank below every value
    keeps the grid, which the plan refuses naming the bound; a written grid is never cut."""
    from orchestrator.config import fitting_default_space

    data = {"D": 16, "C": 8, "N": 50000, "L": None}
    space = fitting_default_space(KNN, {"alpha": 0.01}, KNN.search_space(data), data)
    assert space == {"k": {"grid": [50, 100, 200, 500]}}
    check_detector_values("detectors[0]", KNN, {"alpha": 0.01}, space, data)
    assert fitting_default_space(KNN, {}, KNN.search_space(data), data) == KNN.search_space(data)
    small = {"D": 16, "C": 8, "N": 650, "L": None}
    space = fitting_default_space(NNGuide, {"alpha": 0.01}, NNGuide.search_space(small), small)
    assert space == {"k": {"grid": [1]}}  # NNGuide's grid starts at 1: the bank of 7 keeps it
    space = fitting_default_space(KNN, {"alpha": 0.01}, KNN.search_space(small), small)
    with pytest.raises(ConfigError, match=r"k=50 must be <= the bank size ceil\(alpha\*N\) = ceil\(0.01\*650\) = 7"):
        check_detector_values("detectors[0]", KNN, {"alpha": 0.01}, space, small)
