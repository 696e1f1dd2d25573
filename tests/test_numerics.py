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
