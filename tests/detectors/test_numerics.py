"""The scatter matrix of ``ood_core.detectors.numerics`` against plain float64 products."""
import pytest
import torch

from ood_core.detectors import numerics


def _data(n, d, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (offset + torch.randn(n, d, generator=g) @ mix).float()


def _plain(x, c):
    x64 = x.double() - (0 if c is None else c)
    return x64.T @ x64


@pytest.mark.parametrize("n,d", [(1, 3), (7, 5), (5000, 130), (4100, 257)])  # N, D across block / panel edges
@pytest.mark.parametrize("centred", [True, False])
def test_scatter_float64_equals_plain_product(n, d, centred):
    x = _data(n, d, 3.0)
    c = torch.randn(d, dtype=torch.float64) if centred else None
    got = numerics.scatter(x, c, torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _plain(x, c), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(numerics.scatter64(x, c), got, rtol=0, atol=0)
    torch.testing.assert_close(got, got.T, rtol=0, atol=0)


@pytest.mark.parametrize("n,d", [(7, 5), (5000, 130), (4100, 257)])
def test_scatter_float32_matches_float64(n, d):
    x = _data(n, d, 3.0)
    c = torch.randn(d, dtype=torch.float64)
    got = numerics.scatter(x, c)  # float32 products for float32 data
    ref = _plain(x, c)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, got.T, rtol=0, atol=0)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


def test_scatter_float32_centring_beats_one_float32_product():
    """Data far from the origin and from c: a single float32 product about c (pytorch-ood's way) sums
    the offset; the block sums about the mean keep float32 error at the spread of the data."""
    x = _data(20000, 64, 40.0)
    c = torch.full((64,), -5.0, dtype=torch.float64)
    ref = _plain(x, c)
    xc = x - c.float()
    one_product = (xc.T @ xc).double()
    ours = numerics.scatter(x, c)
    # the part that matters for eigenvectors beyond the offset direction: the covariance
    mean = x.double().mean(0) - c
    cov_ref = ref / len(x) - torch.outer(mean, mean)
    err_ours = float((ours / len(x) - torch.outer(mean, mean) - cov_ref).abs().max())
    err_one = float((one_product / len(x) - torch.outer(mean, mean) - cov_ref).abs().max())
    assert err_ours * 10 < err_one, (err_ours, err_one)


@pytest.mark.parametrize("ridge", [1e-6, 0.5])
def test_cholesky_whitener_whitens_the_ridged_covariance(ridge):
    x = _data(200, 12, 1.0).double()
    x[:, :3] = 0.0  # singular: the ridge makes it invertible
    cov = torch.cov(x.T, correction=0)
    whitener, log_det = numerics.cholesky_whitener(cov.clone(), ridge)
    ridged = cov + ridge * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(whitener @ ridged @ whitener.T, torch.eye(12, dtype=torch.float64), atol=1e-8, rtol=0)
    assert torch.equal(whitener, torch.tril(whitener))
    assert log_det == pytest.approx(float(torch.logdet(ridged)), rel=1e-10)


def test_cholesky_whitener_clips_an_indefinite_matrix():
    cov = torch.diag(torch.tensor([1.0, 1e-3, -1.0], dtype=torch.float64))
    whitener, _ = numerics.cholesky_whitener(cov, 1e-6)
    assert torch.isfinite(whitener).all()
    torch.testing.assert_close(whitener.diagonal(), torch.tensor([1 / (1 + 1e-6), 1 / (1e-3 + 1e-6), 1e6],
                                                                 dtype=torch.float64).sqrt())


def test_by_row_blocks_equals_one_call():
    x = _data(1000, 16, 0.5)
    w = _data(16, 5, 0.0, seed=1)
    fn = lambda v: torch.logsumexp(v @ w, dim=1) + v.norm(dim=1)  # noqa: E731 - row-wise
    calls = []
    blocks = numerics.by_row_blocks(lambda v: calls.append(len(v)) or fn(v), x, block_bytes=16 * 4 * 300)
    assert calls == [300, 300, 300, 100]
    torch.testing.assert_close(blocks, fn(x))
    assert numerics.by_row_blocks(fn, x[:0]).shape == (0,)
