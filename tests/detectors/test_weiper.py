"""WeiPer + KLD (Granz, Heurich & Landgraf, NeurIPS 2024) vs a plainly written loop reference, and vs a port of
the official code's pipeline (``batch_histogram`` with outer bins, ``UniformKernel`` = ``Conv1d(padding="same",
padding_mode="replicate")``, symmetric ``kldiv``) on the same inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ood_core.constraints import ParameterError
from ood_core.detectors import WeiPer
from ood_core.detectors.weiper import smooth

SMALL = dict(r=10, delta=1.8, n_bins=20, smoothing=3, smoothing_perturbed=4, lambda_1=2.5, lambda_2=0.5, seed=7)


# -- the plain reference (loops, numpy float64) ----------------------------------------------------------
def _hist(values, lo, hi, n_bins):
    counts = np.zeros(n_bins)
    width = (hi - lo) / n_bins
    for v in values:
        i = math.floor((v - lo) / width)
        if 0 <= i < n_bins:  # outside the training range (the maximum itself included): no bin
            counts[i] += 1
    return counts / len(values)


def _smooth(h, k):
    left = (k - 1) // 2
    return np.array([np.mean([h[min(max(j - left + t, 0), len(h) - 1)] for t in range(k)]) for j in range(len(h))])


def _sym_kl(p, q, eps):
    p, q = (p + eps) / (p + eps).sum(), (q + eps) / (q + eps).sum()
    return float(sum(p[i] * math.log(p[i] / q[i]) + q[i] * math.log(q[i] / p[i]) for i in range(len(p))))


def ref_weiper(z, test, pw, pb, r, n_bins, smoothing, smoothing_perturbed, lambda_1, lambda_2, **_):
    z, test, pw, pb = (np.asarray(a, np.float64) for a in (z, test, pw, pb))
    lz = z @ pw.T + pb
    lo, hi, plo, phi = z.min(), z.max(), lz.min(), lz.max()
    mean_h = np.mean([_hist(x, lo, hi, n_bins) for x in z], axis=0)
    mean_hp = np.mean([_hist(x, plo, phi, n_bins) for x in lz], axis=0)
    out = []
    for x in test:
        logits = pw @ x + pb
        msp = []
        for j in range(r):
            lj = logits[j * len(pb) // r:(j + 1) * len(pb) // r]
            e = np.exp(lj - lj.max())
            msp.append((e / e.sum()).max())
        out.append(_sym_kl(mean_h, _smooth(_hist(x, lo, hi, n_bins), smoothing), 0.01)
                   + lambda_1 * _sym_kl(mean_hp, _smooth(_hist(logits, plo, phi, n_bins), smoothing_perturbed), 0.025)
                   - lambda_2 * np.mean(msp))
    return np.array(out)


# -- a port of the official pipeline ------------------------------------------------------------------------
def official_weiper(z, test, pw, pb, r, n_bins, smoothing, smoothing_perturbed, lambda_1, lambda_2, **_):
    lin = torch.nn.Linear(z.shape[1], pw.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(pw)
        lin.bias.copy_(pb)

    def density(latents, lo, hi):  # batch_histogram(latents.T, bins_min_max=(lo, hi), probability=True)
        # the official edges are float32 (float32 steps times 0-dim tensors), so that (1) hi + 1e-8 rounds to hi
        # and the maximum falls in the outer bin, (2) entries within float32 rounding of an edge may change bin;
        # the port keeps (1) and computes the edges in float64 (what we do) to leave out (2)
        samples = latents.T
        steps = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
        top = float(torch.tensor(float(hi) + 1e-8, dtype=torch.float32))
        assert top == float(torch.tensor(float(hi), dtype=torch.float32))  # (1) holds on these data
        bins = (lo + steps * (hi - lo))[:, None].repeat(1, samples.shape[1])
        inf = torch.full((1, samples.shape[1]), float("inf"), dtype=bins.dtype)
        bins = torch.cat([-inf, bins, inf])
        dens = ((samples[None] < bins[1:, None]) & (samples[None] >= bins[:-1, None])).double().mean(dim=1)
        return dens[1:-1] / dens.sum(dim=0)[None]

    def kernel(size, dim):
        conv = torch.nn.Conv1d(dim, dim, size, padding="same", padding_mode="replicate", bias=False).double()
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[range(dim), range(dim)] = 1.0 / size
        return conv

    def kldiv(p, q, eps, size):
        with torch.no_grad():
            q_ = kernel(size, q.shape[1])(q.T).T + eps
        p_ = p + eps
        p_, q_ = p_ / p_.sum(dim=0), q_ / q_.sum(dim=0)
        q_p = q_.log()[:, None] - p_.log()[..., None]
        return (-(p_[..., None] * q_p).sum(dim=0) - (q_[:, None] * (-q_p)).sum(dim=0))[0]

    with torch.no_grad():
        lz, lt = lin(z), lin(test)
    (lo, hi), (plo, phi) = (z.min(), z.max()), (lz.min(), lz.max())  # exact_minmax
    train = density(z, lo, hi).mean(dim=-1)[:, None], density(lz, plo, phi).mean(dim=-1)[:, None]
    msp = torch.stack([lt[:, j * lt.shape[1] // r:(j + 1) * lt.shape[1] // r].softmax(-1).max(-1)[0]
                       for j in range(r)], dim=1).mean(-1)
    u = kldiv(train[0], density(test, lo, hi), 0.01, smoothing)
    u_w = kldiv(train[1], density(lt, plo, phi), 0.025, smoothing_perturbed)
    return u + lambda_1 * u_w - lambda_2 * msp  # the official confidence is minus this


@pytest.fixture(scope="module")
def fitted(data):
    det = WeiPer(head=(data["w"], data["b"]), **SMALL).fit_features(data["z"].double())
    return det


def test_perturbed_head_is_the_formula(data, fitted):
    """Row j C + k: w_k + delta |w_k| eta / |eta|, eta ~ N(0, I) from torch.Generator().manual_seed(seed)."""
    w, b = data["w"].double(), data["b"].double()
    c, d = w.shape
    eta = torch.randn(SMALL["r"], c, d, generator=torch.Generator().manual_seed(SMALL["seed"])).double()
    for j in (0, SMALL["r"] - 1):
        for k in range(c):
            want = w[k] + SMALL["delta"] * w[k].norm() * eta[j, k] / eta[j, k].norm()
            torch.testing.assert_close(fitted.perturbed_w[j * c + k].double(), want, rtol=1e-5, atol=1e-5)
            assert float(fitted.perturbed_b[j * c + k]) == float(b[k])


def test_matches_reference(data, fitted):
    test = data["z_test"][::10].double()
    want = ref_weiper(data["z"], test, fitted.perturbed_w, fitted.perturbed_b, **SMALL)
    np.testing.assert_allclose(fitted.predict_features(test).numpy(), want, rtol=1e-9, atol=1e-9)


def test_agrees_with_the_official_pipeline(data, fitted):
    test = data["z_test"].double()
    want = official_weiper(data["z"].double(), test, fitted.perturbed_w.double(), fitted.perturbed_b.double(),
                           **SMALL)
    torch.testing.assert_close(fitted.predict_features(test), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 40])
def test_smoothing_is_the_official_replicate_padded_conv(size):
    h = torch.rand(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    conv = torch.nn.Conv1d(5, 5, size, padding="same", padding_mode="replicate", bias=False).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[range(5), range(5)] = 1.0 / size
        want = conv(h)
    torch.testing.assert_close(smooth(h, size), want)


def test_ood_scores_higher_and_labels_are_not_read(data):
    det = WeiPer(head=data["lin"], seed=1).fit_features(data["z"])
    s = det.predict_features(data["z_test"])
    assert float((s[150:, None] > s[None, :150]).double().mean()) > 0.65  # 0.73: a histogram of 48 entries is coarse
    again = WeiPer(head=data["lin"], seed=1).fit_features(data["z"], data["y"])
    torch.testing.assert_close(again.predict_features(data["z_test"]), s)


def test_seed_sets_the_perturbations(data):
    a = WeiPer(head=data["lin"], r=5, seed=1).fit_features(data["z"])
    b = WeiPer(head=data["lin"], r=5, seed=1).fit_features(data["z"])
    c = WeiPer(head=data["lin"], r=5, seed=2).fit_features(data["z"])
    assert torch.equal(a.perturbed_w, b.perturbed_w) and not torch.equal(a.perturbed_w, c.perturbed_w)


def test_scoring_hyperparameters_need_no_refit(data, fitted):
    change = dict(smoothing=8, smoothing_perturbed=2, lambda_1=0.1, lambda_2=5.0)
    fresh = WeiPer(head=(data["w"], data["b"]), **{**SMALL, **change}).fit_features(data["z"].double())
    test = data["z_test"].double()
    reused = WeiPer(head=(data["w"], data["b"]), **SMALL).fit_features(data["z"].double()).set_params(**change)
    torch.testing.assert_close(reused.predict_features(test), fresh.predict_features(test))
    with pytest.raises(ValueError, match="WeiPer: n_bins changes the fitted state"):
        fitted.set_params(n_bins=30)


@pytest.mark.parametrize("param,value", [("r", 0), ("delta", 0.0), ("n_bins", 1), ("smoothing", 0),
                                         ("lambda_1", -1.0), ("seed", -1)])
def test_constraints(param, value):
    with pytest.raises(ParameterError, match=f"WeiPer: {param}="):
        WeiPer(**{param: value})


def test_default_search_space_is_the_official_grid():
    space = WeiPer.search_space()
    assert space["lambda_1"] == {"grid": [0.1, 1, 2.5, 4]} and space["smoothing_perturbed"] == {"grid": [15, 25, 40]}
    assert math.prod(len(v["grid"]) for v in space.values()) == 3600
