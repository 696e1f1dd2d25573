"""Fits that stream and merge: :mod:`ood_core.streaming` (mergeable float64 moments, exact streaming quantiles)
against plainly written float64 / numpy references, and every detector that declares ``streams_fit``: its fit
from a :class:`~ood_core.rows.RowSource` read in small chunks equals its in-memory fit, reads the rows only chunk
by chunk, and never holds a copy of the column."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ood_core.detectors import (DICE, GMM, NCI, NECO, RMD, SHE, KLMatching, Mahalanobis, ReAct, ViM, VRA,
                                WeightedEBO, fDBD)
from ood_core.detectors.mahalanobis_pp import RMDPP, MahalanobisPP
from ood_core.detectors.registry import fit_detector
from ood_core.rows import RowSource
from ood_core.quantiles import column_order_statistics_of_stream, order_statistics_of_stream, quantiles_of_stream
from ood_core.streaming import ClassMoments, mean_of_stream


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


# -- references (float64, per class about its own mean: no cancellation) -------------------------------
def ref_moments(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    within = sum((x[y == c] - means[k]).T @ (x[y == c] - means[k]) for k, c in enumerate(classes))
    per_class = np.stack([(x[y == c] - means[k]).T @ (x[y == c] - means[k]) for k, c in enumerate(classes)])
    return classes, means, within, per_class


def ref_scatter(x, p):
    r = np.asarray(x, np.float64) - np.asarray(p, np.float64)
    return r.T @ r


@pytest.fixture(scope="module")
def blobs():
    """Classes far apart against their spread (neural collapse), rows sorted by class (as files often are),
    labels with gaps."""
    g = torch.Generator().manual_seed(3)
    means = torch.randn(4, 12, generator=g, dtype=torch.float64) * 40 + 25
    y = torch.tensor([0, 2, 5, 9]).repeat_interleave(torch.tensor([300, 250, 400, 283]))
    k = torch.searchsorted(torch.tensor([0, 2, 5, 9]), y)
    x = (means[k] + torch.randn(len(y), 12, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 12)).float()
    return x, y


def chunked(x, y, rows):
    return [(x[s : s + rows], y[s : s + rows]) for s in range(0, len(x), rows)]


# -- ClassMoments ---------------------------------------------------------------------------------------
def test_two_pass_moments_are_the_float64_statistics(blobs):
    x, y = blobs
    classes, means, within, _ = ref_moments(x, y)
    center = mean_of_stream(chunked(x, y, 37))
    np.testing.assert_allclose(center.numpy(), np.asarray(x, np.float64).mean(axis=0), rtol=1e-13)
    stats = ClassMoments(12, center).update_all(chunked(x, y, 37))
    assert stats.n == len(x) and stats.classes.tolist() == classes.tolist()
    assert stats.counts.tolist() == [300, 250, 400, 283]
    assert rel(stats.means(), means) < 1e-13
    assert rel(stats.within_scatter(), within) < 1e-11  # total - between: today's cancellation, no worse
    assert rel(stats.within_covariance(), within / len(x)) < 1e-11
    p = torch.linspace(-50, 50, 12, dtype=torch.float64)
    assert rel(stats.scatter(p), ref_scatter(x, p)) < 1e-13
    assert rel(stats.covariance(), ref_scatter(x, stats.mean()) / len(x)) < 1e-13
    assert rel(stats.mean(), np.asarray(x, np.float64).mean(axis=0)) < 1e-13


def test_chunked_moments_equal_one_chunk(blobs):
    """The statistics of 37-row chunks equal those of one chunk (the in-memory fit) to float64 rounding."""
    x, y = blobs
    center = mean_of_stream([x])
    one = ClassMoments(12, center).update(x, y)
    many = ClassMoments(12, center).update_all(chunked(x, y, 37))
    for a, b in [(many.sums, one.sums), (many.total, one.total), (many.within_scatter(), one.within_scatter())]:
        assert rel(a, b) < 1e-13


def test_merge_of_shards_about_different_centres_equals_one_pass(blobs):
    """Shards accumulated about their own first rows' mean, a far-away centre and another node's order merge
    into the statistics of one pass (Chan et al.'s update moved to a common centre)."""
    x, y = blobs
    classes, means, within, _ = ref_moments(x, y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    xs, ys = x[perm], y[perm]
    one = ClassMoments(12).update_all(chunked(xs, ys, 100))
    shards = [ClassMoments(12).update(x[:500], y[:500]),  # classes 0, 2 only (sorted rows)
              ClassMoments(12, center=torch.full((12,), 1e3)).update_all(chunked(x[500:900], y[500:900], 64)),
              ClassMoments(12).update(x[900:], y[900:])]  # classes 5, 9
    merged = ClassMoments(12)  # empty: takes the first shard's centre
    for shard in shards:
        merged.merge(shard)
    assert merged.n == one.n == len(x) and merged.classes.tolist() == classes.tolist()
    assert torch.equal(merged.counts, one.counts)
    assert rel(merged.means(), means) < 1e-13
    # total - between about the first shard's centre (class 0's mean, far from the others): eps * (distance /
    # spread)^2, here up to (60 / 0.2)^2 ~ 1e5: the one-pass precision of the class docstring
    assert rel(merged.within_scatter(), one.within_scatter()) < 1e-9
    assert rel(merged.within_scatter(), within) < 1e-9
    p = torch.randn(12, dtype=torch.float64) * 10
    assert rel(merged.scatter(p), one.scatter(p)) < 1e-12
    assert rel(merged.scatter(p), ref_scatter(x, p)) < 1e-12
    reverse = ClassMoments(12)
    for shard in reversed([ClassMoments(12).update(x[:500], y[:500]),
                           ClassMoments(12).update(x[500:900], y[500:900]), ClassMoments(12).update(x[900:], y[900:])]):
        reverse.merge(shard)
    assert rel(reverse.within_scatter(), within) < 1e-9


def test_merge_is_not_a_plain_sum(blobs):
    """Adding the partials' sums and scatters without moving them to one centre is wrong: the test sees it."""
    x, y = blobs
    a, b = ClassMoments(12).update(x[:600], y[:600]), ClassMoments(12).update(x[600:], y[600:])
    assert not torch.allclose(a.center, b.center)
    naive = a.total + b.total
    assert rel(naive, a.merge(b).total) > 1e-3


def test_per_class_centres_and_class_scatters(blobs):
    """Per-class centres from a first pass (the class means): each class's scatter without cancellation, and
    merges of per-class partials about other centres."""
    x, y = blobs
    classes, means, within, per_class = ref_moments(x, y)
    first = ClassMoments(12, scatter=None).update_all(chunked(x, y, 50))
    second = ClassMoments(12, first.means(), first.classes, scatter="class").update_all(chunked(x, y, 50))
    assert rel(second.class_scatters(), per_class) < 1e-13
    assert rel(second.within_scatter(), within) < 1e-13
    p = torch.full((12,), 7.0, dtype=torch.float64)
    assert rel(second.scatter(p), ref_scatter(x, p)) < 1e-13
    with pytest.raises(ValueError, match="say about which point"):
        second.scatter()
    cls = torch.as_tensor(classes)
    a = ClassMoments(12, torch.as_tensor(means) + 3, cls, scatter="class").update(x[::2], y[::2])
    b = ClassMoments(12, torch.as_tensor(means) - 5, cls, scatter="class").update(x[1::2], y[1::2])
    assert rel(a.merge(b).class_scatters(), per_class) < 1e-12
    total = ClassMoments(12, torch.as_tensor(means), cls).update(x[::3], y[::3])
    total.merge(ClassMoments(12, torch.as_tensor(means) * 0.5, cls).update(x[1::3], y[1::3]))
    total.merge(ClassMoments(12, torch.as_tensor(means) * 0.5, cls).update(x[2::3], y[2::3]))
    assert rel(total.within_scatter(), within) < 1e-12


def test_one_pass_and_merged_precision_on_collapsed_sorted_rows(blobs):
    """One pass about the first rows' mean (all of class 0 here, far from the others) keeps the within-class
    scatter to ~eps * (distance / spread)^2, as the class docstring says."""
    x, y = blobs
    _, _, within, _ = ref_moments(x, y)
    one_pass = ClassMoments(12).update_all(chunked(x, y, 37))
    assert rel(one_pass.within_scatter(), within) < 1e-9


def test_products_in_the_rows_dtype_match_numerics_scatter(blobs):
    """``dtype=None`` (ViM's float32 products about a pivot) reproduces numerics.scatter on one chunk, bit for
    bit, and chunked / merged ones to float32 product rounding."""
    from ood_core.detectors.numerics import scatter

    x, _ = blobs
    u = torch.linspace(-3, 3, 12, dtype=torch.float64)
    assert torch.equal(ClassMoments(12, dtype=None).update(x).scatter(u), scatter(x, u))
    streamed = ClassMoments(12, dtype=None).update_all(x[s : s + 37] for s in range(0, len(x), 37))
    assert rel(streamed.scatter(u), ref_scatter(x, u)) < 1e-6
    merged = ClassMoments(12, dtype=None).update(x[:700]).merge(ClassMoments(12, dtype=None).update(x[700:]))
    assert rel(merged.scatter(u), ref_scatter(x, u)) < 1e-6


def test_moments_refuse_what_they_cannot_hold(blobs):
    x, y = blobs
    fixed = ClassMoments(12, classes=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="label 9 is not one of the 3 classes"):
        fixed.update(x, y)
    with pytest.raises(ValueError, match=r"rows must have shape \(n, 12\)"):
        ClassMoments(12).update(x[:, :5], y)
    with pytest.raises(ValueError, match="different width, scatter"):
        ClassMoments(12).update(x, y).merge(ClassMoments(12, scatter=None).update(x, y))
    with pytest.raises(ValueError, match="no rows"):
        ClassMoments(12).means()


# -- exact streaming quantiles ----------------------------------------------------------------------------
def _stream(values: np.ndarray, rows: int):
    t = torch.from_numpy(values)
    return lambda: (t[s : s + rows] for s in range(0, len(t), rows))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_quantiles_equal_numpy_percentile_exactly(dtype):
    rng = np.random.default_rng(7)
    qs = [0, 100, 50, 90, 99.9, 0.1, 12.5, 66.6, 37.3]
    for trial in range(40):
        n = int(rng.integers(1, 2500))
        v = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 300.0])).astype(dtype)
        v[rng.integers(0, n, n // 3)] = 0.0  # ties, as ReLU features have
        v[rng.integers(0, n, n // 5)] = -0.0
        if trial % 4 == 0:
            v = np.round(v)  # many ties
        if trial % 5 == 0:
            v = -np.abs(v)  # all negative
        rows = int(rng.integers(1, 400))
        got = quantiles_of_stream(_stream(v.reshape(-1, 1) if trial % 2 else v, rows), qs)
        np.testing.assert_array_equal(np.array(got), np.percentile(v, qs))  # exactly (-0.0 == 0.0)


def test_quantiles_of_matrices_equal_numpy_and_nan_propagates():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((331, 17)).astype(np.float32), 0)  # ReLU activations: half zeros
    qs = [85, 90, 95, 99, 100, 0, 50]
    assert quantiles_of_stream(_stream(x, 29), qs) == np.percentile(x, qs).tolist()
    y = np.zeros(331)
    pairs = lambda: ((torch.from_numpy(x[s : s + 29]), torch.from_numpy(y[s : s + 29])) for s in range(0, 331, 29))
    assert quantiles_of_stream(pairs, qs) == np.percentile(x, qs).tolist()  # (x, y) chunks: the x
    x[5, 3] = np.nan
    assert all(np.isnan(quantiles_of_stream(_stream(x, 29), [50, 90])))


def test_order_statistics_are_the_sorted_values_in_bounded_passes():
    rng = np.random.default_rng(4)
    v = np.concatenate([np.zeros(5000), rng.standard_normal(3000), [-0.0, np.inf, -np.inf, 1e-40, -1e-40]])
    v = rng.permutation(v).astype(np.float32)
    ranks = [0, 1, 4999, 5000, 5001, 7000, len(v) - 2, len(v) - 1]
    passes = []

    def values():
        passes.append(1)
        return _stream(v, 97)()

    got = order_statistics_of_stream(values, ranks)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), np.sort(v)[ranks])
    assert len(passes) == 2  # float32: two passes, whatever the ties
    passes.clear()
    half = v.astype(np.float16)

    def halves():
        passes.append(1)
        return _stream(half, 97)()

    assert order_statistics_of_stream(halves, [3, 4000]).tolist() == np.sort(half)[[3, 4000]].tolist()
    assert len(passes) == 1  # float16: the top 16 bits are the whole value
    with pytest.raises(ValueError, match=f"rank {len(v)} outside"):
        order_statistics_of_stream(_stream(v, 97), [len(v)])
    with pytest.raises(ValueError, match="percentiles in"):
        quantiles_of_stream(_stream(v, 97), [101])


# -- detectors: the streamed fit equals the in-memory fit ---------------------------------------------------
class Guarded:
    """A column (``numpy.memmap``) that refuses any read of more than ``limit`` rows: a fit that asks for
    the whole column, or for more than a chunk, fails."""

    def __init__(self, a, limit):
        self.a, self.limit = a, limit
        self.shape, self.dtype, self.nbytes, self.flags = a.shape, a.dtype, a.nbytes, a.flags
        self.reads = 0

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or len(range(*rows.indices(self.shape[0]))) > self.limit:
            raise AssertionError(f"read {rows} of a column of {self.shape[0]} rows")
        self.reads += 1
        return self.a[rows]


def _detectors(data):
    w, b = data["w"], data["b"]
    return {
        "Mahalanobis": lambda: Mahalanobis(), "RMD": lambda: RMD(), "GMM": lambda: GMM(reg=1e-4),
        "NECO": lambda: NECO(d=5), "NCI": lambda: NCI(head=(w, b)), "fDBD": lambda: fDBD(head=(w, b)),
        "ViM": lambda: ViM(d=5, w=w, b=b),  # a wide eigengap: ViM's float32 products rotate narrow splits
        "ReAct": lambda: ReAct(head=(w, b), percentile=90),
        "SHE": lambda: SHE(head=(w, b)), "DICE": lambda: DICE(w=w, b=b, p=70),
        "KLMatching": lambda: KLMatching(), "WeightedEBO": lambda: WeightedEBO(),
        "VRA": lambda: VRA(head=(w, b), lower_percentile=40, upper_percentile=95),
        "VRA per entry": lambda: VRA(head=(w, b), lower_percentile=40, upper_percentile=95, per_dimension=True),
    }


STREAMING = ["Mahalanobis", "RMD", "GMM", "NECO", "NCI", "fDBD", "ViM", "ReAct", "SHE", "DICE", "KLMatching",
             "WeightedEBO", "VRA", "VRA per entry"]


@pytest.mark.parametrize("name", STREAMING)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streamed_fit_equals_the_in_memory_fit(data, tmp_path, name, dtype):
    """``fit_rows`` on 37-row chunks of a memory-mapped float32 / float16 column (with auxiliary outlier rows
    labelled -1, one chunk of them only) scores as the in-memory fit on the same float32 values, to 1e-6 of the
    largest score; the column is only read in chunks."""
    det = _detectors(data)[name]()
    assert det.streams_fit
    logits = det.representation == "logits"
    z, z_test = data["z"], data["z_test"]
    if logits:
        z, z_test = z @ data["w"].T + data["b"], z_test @ data["w"].T + data["b"]
    y = data["y"].clone()
    y[::17] = -1  # auxiliary outliers: dropped by both fits
    y[37:74] = -1  # a chunk of outliers only: an empty chunk of ID rows
    path = tmp_path / "column.npy"
    np.save(path, z.numpy().astype(dtype))
    column = np.load(path, mmap_mode="r")
    assert isinstance(column, np.memmap)
    guarded = Guarded(column, limit=37)
    rows = RowSource({det.representation: guarded}, y, chunk_rows=37)
    streamed = fit_detector(det, rows, y)
    assert guarded.reads >= -(-len(y) // 37)  # every chunk, and never more than a chunk at a time
    same_values = torch.from_numpy(np.array(column, dtype=np.float32))
    in_memory = _detectors(data)[name]()
    in_memory = in_memory.fit_logits(same_values, y) if logits else in_memory.fit_features(same_values, y)
    predict = "predict_logits" if logits else "predict_features"
    got, want = getattr(streamed, predict)(z_test).double(), getattr(in_memory, predict)(z_test).double()
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_streamed_mahalanobis_state_equals_in_memory_to_float64_rounding(data):
    """Not only the scores: the float64 state of the two-pass streamed fit is the in-memory one to ~1e-12."""
    z, y = data["z"], data["y"]
    streamed = Mahalanobis().fit_rows(RowSource({"features": z.numpy()}, y, chunk_rows=37), "features")
    in_memory = Mahalanobis().fit_features(z, y)
    for key in ("center", "mu", "whitener", "whitened_mu"):
        assert rel(getattr(streamed, key), getattr(in_memory, key)) < 1e-12, key
    rows = RowSource({"features": z.numpy()}, y, chunk_rows=2048 * 3)  # chunks of whole blocks: the same numbers
    assert torch.equal(Mahalanobis().fit_rows(rows, "features").whitener, in_memory.whitener)


def test_streamed_react_threshold_is_numpys_percentile(data):
    rows = RowSource({"features": data["z"].numpy()}, data["y"], chunk_rows=37)
    for p in (85, 90, 99):
        det = ReAct(head=(data["w"], data["b"]), percentile=p).fit_rows(rows, "features")
        assert det.threshold_ == float(np.percentile(data["z"].numpy(), [p])[0])


@pytest.mark.parametrize("name", STREAMING + ["MahalanobisPP", "RMDPP"])
def test_declared_shared_statistics_are_the_ones_the_fit_shares(data, name):
    """``shared_statistics`` (what a scheduler reads to keep fits that wait on one statistic apart) names exactly
    the statistics the streamed fit asks the row source to share."""
    make = {"MahalanobisPP": MahalanobisPP, "RMDPP": RMDPP, **_detectors(data)}[name]
    det = make()
    z = data["z"] if det.representation != "logits" else data["z"] @ data["w"].T + data["b"]
    asked = []
    rows = RowSource({det.representation: z.numpy()}, data["y"], chunk_rows=37,
                     share=lambda key, compute: asked.append(key.split("/", 1)[1]) or compute())
    det.fit_rows(rows, det.representation)
    assert sorted({key.split("/")[0] for key in asked}) == sorted(type(det).shared_statistics), (name, asked)


def test_streamed_vra_thresholds_are_the_in_memory_ones(data):
    """VRA's thresholds from the stream (exact selection: two scalars, or one pair per entry) are the in-memory
    fit's bit for bit, and numpy's percentiles."""
    z = data["z"]
    rows = RowSource({"features": z.numpy()}, data["y"], chunk_rows=37)
    for per_dimension in (False, True):
        make = lambda: VRA(head=(data["w"], data["b"]), lower_percentile=35, upper_percentile=92.5,
                           per_dimension=per_dimension)
        got, want = make().fit_rows(rows, "features"), make().fit_features(z, data["y"])
        for key in ("lower_", "upper_"):
            a, b = getattr(got, key), getattr(want, key)
            assert torch.equal(a, b) if per_dimension else a == b, key
        ref = np.percentile(z.numpy(), [35, 92.5], axis=0 if per_dimension else None)
        np.testing.assert_allclose(np.stack([np.asarray(got.lower_), np.asarray(got.upper_)]), ref, rtol=1e-6)


def test_column_order_statistics_are_numpys_partition_per_column():
    """Per column, the exact k-th smallest of a stream (ties, signed zeros, a constant column, float16 and
    float64), in 1 + bits / 8 passes, whatever the ties."""
    rng = np.random.default_rng(3)
    for dtype, passes in ((np.float32, 4), (np.float16, 2), (np.float64, 8)):
        v = rng.standard_normal((2501, 4, 3)).astype(dtype)
        v[::9] = 0.0
        v[1::13] = -0.0
        v[:, 2, 1] = 7.0
        v[100:900, 0, 0] = -1.25
        ranks = [0, 1, 1250, 2499, 2500]
        count = []

        def values():
            count.append(1)
            return _stream(v, 97)()

        n, got_ranks, got = column_order_statistics_of_stream(values, lambda n: ranks)
        assert n == 2501 and got_ranks == ranks and got.shape == (5, 4, 3)
        np.testing.assert_array_equal(got.numpy(), np.partition(v, ranks, axis=0)[ranks])
        assert len(count) == passes, dtype
    bad = np.zeros((10, 2), dtype=np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        column_order_statistics_of_stream(_stream(bad, 4), lambda n: [0])


def test_subclasses_that_transform_rows_in_their_own_fit_fit_in_memory(data):
    """MahalanobisPP / RMDPP normalise the streamed rows (their ``_fit_stream``): streamed equals in memory. A
    subclass that overrides ``_fit`` alone (a transform of the rows there) would be bypassed by the inherited
    ``_fit_stream``: it does not stream, and ``fit_rows`` gives its in-memory fit."""
    assert MahalanobisPP.streams_fit and RMDPP.streams_fit and RMD.streams_fit
    rows = RowSource({"features": data["z"].numpy()}, data["y"], chunk_rows=37)
    for cls in (MahalanobisPP, RMDPP):
        got = cls().fit_rows(rows, "features").predict_features(data["z_test"])
        torch.testing.assert_close(got, cls().fit_features(data["z"], data["y"]).predict_features(data["z_test"]),
                                   rtol=1e-5, atol=1e-5 * float(got.abs().max()))

    class Squared(Mahalanobis):  # a user's variant: a transform in _fit alone
        def _fit(self, z, y):
            super()._fit(z * z, y)

        def _score(self, z):
            return super()._score(z * z)

    assert not Squared.streams_fit
    got = Squared().fit_rows(rows, "features").predict_features(data["z_test"])
    torch.testing.assert_close(got, Squared().fit_features(data["z"], data["y"]).predict_features(data["z_test"]))


# -- memory: a streamed fit never holds the column ------------------------------------------------------------
PEAK_SCRIPT = textwrap.dedent(r"""
    import json, re, sys, tempfile
    import numpy as np, torch
    torch.set_num_threads(1)
    from ood_core.detectors import GMM, VRA, Mahalanobis, ReAct, ViM
    from ood_core.rows import RowSource

    N, D, C = 250_000, 128, 10
    base = np.random.default_rng(0).standard_normal((4096, D)).astype(np.float32)
    centres = np.random.default_rng(1).standard_normal((C, D)).astype(np.float32) * 3

    class Lazy:
        # a float32 column of N rows made on demand: it takes no memory until someone copies it
        shape, dtype, nbytes = (N, D), np.dtype(np.float32), N * D * 4
        def __getitem__(self, rows):
            idx = np.arange(N)[rows]
            return base[idx % 4096] + centres[idx % C]

    labels = np.arange(N) % C
    w, b = torch.randn(C, D, generator=torch.Generator().manual_seed(2)), torch.zeros(C)
    path = tempfile.mkdtemp() + "/column.npy"
    np.save(path, np.concatenate([Lazy()[s : s + 8192] for s in range(0, N, 8192)]).astype(np.float16))
    mapped = np.load(path, mmap_mode="r")  # float16 memmap: its pages count as resident file pages once read

    def status(key):
        return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

    def peak_of(fit):
        # the peak of the anonymous memory the fit adds, over the bytes of the column in float32 (what a
        # materialised copy takes): the peak resident size less the file pages resident at the end (a lower
        # bound of the anonymous peak, exact where no file page is dropped) less the anonymous memory before
        try:
            open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size
        except OSError:
            pass
        before = status("VmRSS") - status("RssFile")
        fit()
        return (status("VmHWM") - status("RssFile") - before) / (N * D * 4)

    dets = {"Mahalanobis": lambda: Mahalanobis(), "GMM": lambda: GMM(), "ViM": lambda: ViM(d=64, w=w, b=b),
            "ReAct": lambda: ReAct(head=(w, b)), "VRA per entry": lambda: VRA(head=(w, b), per_dimension=True)}
    lazy = RowSource({"features": Lazy()}, labels, chunk_rows=4096)
    for make in dets.values():  # warm-up: libraries loaded, allocator primed
        make().fit_features(torch.from_numpy(Lazy()[:5000]), torch.from_numpy(labels[:5000]))
    out = {name: peak_of(lambda: make().fit_rows(lazy, "features")) for name, make in dets.items()}
    out["in-memory control"] = peak_of(lambda: Mahalanobis().fit_features(torch.from_numpy(Lazy()[:]),
                                                                             lazy.labels))
    mapped_rows = RowSource({"features": mapped}, labels, chunk_rows=4096)
    for name in ("Mahalanobis", "ReAct"):
        out[name + " float16 memmap"] = peak_of(lambda: dets[name]().fit_rows(mapped_rows, "features"))
    out["float16 memmap in-memory control"] = peak_of(lambda: Mahalanobis().fit_rows(
        RowSource({"features": mapped}, labels, chunk_rows=N), "features"))  # one chunk: the whole column
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streamed_fits_never_hold_the_column():
    """Peak memory of streamed fits over a 128 MB float32 column that exists only chunk by chunk (4096 rows),
    and over a float16 memmap of it: a small fraction of the column, where the in-memory fit of the same rows
    (the controls) needs at least one float32 copy of it."""
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ratio["in-memory control"] >= 0.9, ratio  # the measurement sees a copy of the column
    assert ratio["float16 memmap in-memory control"] >= 0.9, ratio
    for name in ("Mahalanobis", "GMM", "ViM", "ReAct", "VRA per entry", "Mahalanobis float16 memmap",
                 "ReAct float16 memmap"):
        assert ratio[name] < 0.25, (name, ratio)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_fits_on_the_gpu_equal_the_cpu_fits(data):
    """Chunks placed on the GPU (``RowSource(device="cuda")``): the statistics live there, and the fits equal
    the CPU's."""
    y = data["y"].clone()
    y[::17] = -1
    for name in ("Mahalanobis", "GMM", "ViM", "ReAct", "SHE", "KLMatching"):
        det = _detectors(data)[name]()
        logits = det.representation == "logits"
        z, z_test = data["z"], data["z_test"]
        if logits:
            z, z_test = z @ data["w"].T + data["b"], z_test @ data["w"].T + data["b"]
        rows = RowSource({det.representation: z.numpy()}, y, chunk_rows=37, device="cuda")
        gpu = _detectors(data)[name]().to("cuda").fit_rows(rows, det.representation)
        cpu = _detectors(data)[name]().fit_rows(RowSource({det.representation: z.numpy()}, y, chunk_rows=37),
                                                det.representation)
        predict = "predict_logits" if logits else "predict_features"
        got, want = getattr(gpu, predict)(z_test.cuda()).double().cpu(), getattr(cpu, predict)(z_test).double()
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), name
    values = torch.randn(100_000, device="cuda").relu()
    qs = [0, 50, 90, 99.9, 100]
    got = quantiles_of_stream(lambda: (values[s : s + 7777] for s in range(0, len(values), 7777)), qs)
    assert got == np.percentile(values.cpu().numpy(), qs).tolist()


# -- statistics shared by the fits of one training set ----------------------------------------------------------
class _CountingColumn:
    """A float32 column that counts the full passes read from it (reads of its first row)."""

    def __init__(self, a):
        self.a, self.passes = a, 0
        self.shape, self.dtype, self.nbytes = a.shape, a.dtype, a.nbytes

    def __getitem__(self, rows):
        if rows.start in (0, None):
            self.passes += 1
        return self.a[rows]


def test_fits_of_one_training_set_share_their_moments(data):
    """Mahalanobis, RMD and ViM's values of d read the statistics they share once from a RowSource: the
    Mahalanobis family's two passes once for both, ViM's one-pass second moment and its pass for alpha (the
    residual norms of every d at once) once for every d, and each fit equals its unshared fit bit for bit."""
    column = _CountingColumn(data["z"].numpy())
    rows = RowSource({"features": column}, data["y"], chunk_rows=37)
    head = (data["w"], data["b"])
    fitted = [Mahalanobis().fit_rows(rows, "features"), RMD().fit_rows(rows, "features")]
    assert column.passes == 2  # the mean, then the moments: once for both
    for d in (3, 5, 7):
        fitted.append(ViM(w=head[0], b=head[1], d=d).fit_rows(rows, "features"))
    assert column.passes == 2 + 1 + 1  # the second moment once, alpha's terms once
    alone = [Mahalanobis(), RMD(), *(ViM(w=head[0], b=head[1], d=d) for d in (3, 5, 7))]
    for shared_fit, det in zip(fitted, alone):
        det.fit_rows(RowSource({"features": data["z"].numpy()}, data["y"], chunk_rows=37), "features")
        assert torch.equal(shared_fit.predict_features(data["z_test"]), det.predict_features(data["z_test"]))
    # another column of the same rows is another statistic
    other = RowSource({"features": column, "x2": data["z"].numpy() * 2}, data["y"], chunk_rows=37)
    Mahalanobis().fit_rows(other, "x2")
    Mahalanobis().fit_rows(other, "features")
    assert column.passes == 4 + 2


def test_react_percentiles_share_the_first_pass_of_their_selection(data):
    """ReAct's percentiles of one training set: the first pass of the exact selection (counts of the entries'
    top bits) once for all, then one pass each; the thresholds are the unshared ones, numpy's percentiles."""
    column = _CountingColumn(data["z"].numpy())
    rows = RowSource({"features": column}, data["y"], chunk_rows=37)
    head = (data["w"], data["b"])
    got = [ReAct(head=head, percentile=p).fit_rows(rows, "features").threshold_ for p in (85, 90, 99)]
    assert column.passes == 1 + 3
    assert got == np.percentile(data["z"].numpy(), [85, 90, 99]).tolist()
