"""Mahalanobis vs a plain float64 loop reference and vs pytorch-ood 0.4.0."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ood_core.detectors import Mahalanobis

from .cases import degenerate_features


def ref_mahalanobis(z_train, y_train, z_test):
    """min_c (x - mu_c)^T (Sigma + 1e-6 tr(Sigma)/D I)^{-1} (x - mu_c), Sigma the pooled within-class covariance."""
    z_train, z_test = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)
    y_train = np.asarray(y_train)
    n, d = z_train.shape
    means = {c: z_train[y_train == c].mean(axis=0) for c in sorted(set(y_train.tolist()))}
    cov = np.zeros((d, d))
    for i in range(n):
        r = z_train[i] - means[y_train[i]]
        cov += np.outer(r, r)
    cov /= n
    trace = np.trace(cov)
    prec = np.linalg.inv(cov + np.eye(d) * 1e-6 * (trace / d if trace > 0 else 1.0))
    return np.array([min(float((x - mu) @ prec @ (x - mu)) for mu in means.values()) for x in z_test])


@pytest.fixture(scope="module")
def clusters():
    """Well separated Gaussian classes and an OOD cluster far away."""
    g = torch.Generator().manual_seed(0)
    c, d, n = 4, 16, 400
    means = torch.randn(c, d, generator=g) * 6.0
    y = torch.arange(n) % c
    z = means[y] + torch.randn(n, d, generator=g)
    z_id = means[torch.arange(80) % c] + torch.randn(80, d, generator=g)
    z_ood = torch.randn(80, d, generator=g) + 40.0 * torch.randn(1, d, generator=g).sign()
    return dict(z=z, y=y, z_id=z_id, z_ood=z_ood)


def test_matches_reference(clusters):
    det = Mahalanobis().fit_features(clusters["z"], clusters["y"])
    for key in ("z_id", "z_ood"):
        ref = ref_mahalanobis(clusters["z"], clusters["y"], clusters[key])
        np.testing.assert_allclose(det.predict_features(clusters[key]).double().numpy(), ref, rtol=2e-3, atol=1e-2)
        np.testing.assert_allclose(det.predict_features(clusters[key].double()).numpy(), ref, rtol=1e-8)


def test_precision_is_the_inverse_covariance(clusters):
    det = Mahalanobis().fit_features(clusters["z"], clusters["y"])
    z = clusters["z"].double()
    resid = z - det.mu[clusters["y"]]
    cov = resid.T @ resid / len(z) + det.ridge * torch.eye(z.shape[1], dtype=torch.float64)
    assert det.whitener.dtype == torch.float64 and det.mu.dtype == torch.float64
    torch.testing.assert_close(det.precision @ cov, torch.eye(z.shape[1], dtype=torch.float64), atol=1e-8, rtol=0)


def test_far_ood_scores_higher_and_ood_labels_are_ignored(clusters):
    det = Mahalanobis().fit_features(clusters["z"], clusters["y"])
    id_s, ood_s = det.predict_features(clusters["z_id"]), det.predict_features(clusters["z_ood"])
    assert float(ood_s.min()) > float(id_s.max())
    z = torch.cat([clusters["z"], clusters["z_ood"]])
    y = torch.cat([clusters["y"], -torch.ones(len(clusters["z_ood"]), dtype=torch.long)])
    torch.testing.assert_close(Mahalanobis().fit_features(z, y).predict_features(clusters["z_id"]), id_s)


def test_collapsed_classes_stay_accurate_in_float32():
    """Far-apart, tight classes (strong neural collapse): no cancellation blow-up in float32."""
    g = torch.Generator().manual_seed(6)
    means = torch.randn(5, 32, generator=g, dtype=torch.float64) * 100
    y = torch.arange(500) % 5
    z = (means[y] + 0.01 * torch.randn(500, 32, generator=g, dtype=torch.float64)).float()
    test = (means[torch.arange(40) % 5] + 0.01 * torch.randn(40, 32, generator=g, dtype=torch.float64)).float()
    got = Mahalanobis().fit_features(z, y).predict_features(test).double().numpy()
    np.testing.assert_allclose(got, ref_mahalanobis(z, y, test), rtol=5e-3)


def _robust_cases():
    cases, g = degenerate_features()
    return {
        **cases,
        "single_class": (torch.randn(30, 16, generator=g), torch.zeros(30, dtype=torch.long)),
    }


@pytest.mark.parametrize("case", list(_robust_cases()))
def test_singular_covariances_give_finite_ordered_scores(case):
    z, y = _robust_cases()[case]
    g = torch.Generator().manual_seed(5)
    d = z.shape[1]
    test = torch.cat([z[:5], z[:5] + torch.randn(5, d, generator=g), 100 * torch.randn(5, d, generator=g)])
    s = Mahalanobis().fit_features(z, y).predict_features(test)
    assert s.shape == (15,) and torch.isfinite(s).all(), s
    assert (s[10:] > s[:5].max()).all()  # far away is still further


# -- pytorch-ood 0.4.0 --------------------------------------------------------------------------------
pod = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def relu_data():
    """ReLU features of a random layer on Gaussian classes (penultimate-like) and ID + OOD tests."""
    g = torch.Generator().manual_seed(11)
    c, d_in, d, n = 6, 24, 48, 900
    means = torch.randn(c, d_in, generator=g) * 2.5
    proj = torch.randn(d_in, d, generator=g) / d_in**0.5
    y = torch.arange(n) % c
    z = torch.relu((means[y] + torch.randn(n, d_in, generator=g)) @ proj + 0.3)
    test = torch.relu(torch.cat([means[torch.arange(150) % c] + torch.randn(150, d_in, generator=g),
                                 3.0 * torch.randn(150, d_in, generator=g)]) @ proj + 0.3)
    return dict(z=z, y=y, test=test)


def test_equals_pytorch_ood_times_2n(relu_data):
    """pytorch-ood: 0.5 min_c (z-mu_c)^T (N Sigma + 1e-6 I)^{-1} (z-mu_c), i.e. ours / 2N up to the ridge."""
    z, y, test = relu_data["z"], relu_data["y"], relu_data["test"]
    ours = Mahalanobis().fit_features(z, y).predict_features(test).double().numpy()
    theirs = pod.Mahalanobis(None).fit_features(z, y).predict_features(test).double().numpy()
    assert spearmanr(ours, theirs).statistic >= 0.999
    np.testing.assert_allclose(ours, 2 * len(z) * theirs, rtol=2e-3, atol=1e-2)


def test_pytorch_ood_constructor(relu_data):
    """``Mahalanobis(encoder)`` positionally and ``encoder=``; fit on a loader through the encoder."""
    z, y, test = relu_data["z"], relu_data["y"], relu_data["test"]
    encoder = torch.nn.Identity()
    loader = [(z[i : i + 300], y[i : i + 300]) for i in range(0, len(z), 300)]
    for det in (Mahalanobis(encoder), Mahalanobis(encoder=encoder)):
        assert det.model is encoder and det.fit(loader) is det
        theirs = pod.Mahalanobis(encoder).fit(loader).predict(test)
        np.testing.assert_allclose(det.predict(test).double().numpy(), 2 * len(z) * theirs.double().numpy(),
                                   rtol=2e-3, atol=1e-2)
    assert Mahalanobis(None).model is None
