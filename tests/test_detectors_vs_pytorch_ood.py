"""Agreement with pytorch-ood 0.4.0 (test-only dependency) on the same inputs.

Each detector must either equal pytorch-ood's score or equal it up to the documented
affine change, and rank samples the same way (Spearman >= 0.999):

* MaxSoftmax, MaxLogit, EnergyBased, ViM, KNN (k=1, unnormalised), ReAct: equal.
* Mahalanobis: pytorch-ood scores ``0.5 * min_c (z-mu_c)^T (N Sigma + 1e-6 I)^{-1} (z-mu_c)``
  (its covariance is not divided by N), so ours == 2N * theirs up to the ridge.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_ood")
from pytorch_ood import detector as pod  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from ood_core.detectors import KNN, EnergyBased, Mahalanobis, MaxLogit, MaxSoftmax, ReAct, ViM  # noqa: E402

SPEARMAN_MIN = 0.999


@pytest.fixture(scope="module")
def data():
    """ReLU features of a random layer on Gaussian classes (penultimate-like), a linear head, ID + OOD tests."""
    g = torch.Generator().manual_seed(11)
    c, d_in, d, n = 6, 24, 48, 900
    means = torch.randn(c, d_in, generator=g) * 2.5
    proj = torch.randn(d_in, d, generator=g) / d_in**0.5

    def feats(x):
        return torch.relu(x @ proj + 0.3)

    y = torch.arange(n) % c
    z = feats(means[y] + torch.randn(n, d_in, generator=g))
    y_test = torch.arange(150) % c
    z_test = torch.cat([
        feats(means[y_test] + torch.randn(150, d_in, generator=g)),
        feats(torch.randn(150, d_in, generator=g) * 3.0),  # OOD: broad, no class structure
    ])
    # head: ridge least-squares classifier on the features (a trained-like head; the ridge plays
    # the role of weight decay and keeps W well conditioned, so the ViM origin -pinv(W) b is moderate)
    onehot = (torch.nn.functional.one_hot(y, c).double() * 4 - 2)
    zb = torch.cat([z, torch.ones(n, 1)], dim=1).double()
    sol = torch.linalg.solve(zb.T @ zb + 50.0 * torch.eye(d + 1, dtype=torch.float64), zb.T @ onehot).float()
    w, b = sol[:-1].T.contiguous(), sol[-1].contiguous()
    return dict(z=z, y=y, z_test=z_test, w=w, b=b, logits=z_test @ w.T + b)


def _agree(ours, theirs, scale=1.0, rtol=1e-4, atol=1e-4):
    ours = ours.double().numpy()
    theirs = np.asarray(theirs, dtype=np.float64)
    rho = spearmanr(ours, theirs).statistic
    assert rho >= SPEARMAN_MIN, rho
    np.testing.assert_allclose(ours, scale * theirs, rtol=rtol, atol=atol)
    return rho


@pytest.mark.parametrize("t", [1.0, 10.0, 1000.0])
def test_max_softmax(data, t):
    _agree(MaxSoftmax(t=t).predict_logits(data["logits"]), pod.MaxSoftmax(None, t=t).predict_logits(data["logits"]),
           rtol=1e-5, atol=1e-7)


def test_max_logit(data):
    _agree(MaxLogit().predict_logits(data["logits"]), pod.MaxLogit(None).predict_logits(data["logits"]), rtol=1e-6)


@pytest.mark.parametrize("t", [0.5, 1.0, 5.0])
def test_energy(data, t):
    _agree(EnergyBased(t=t).predict_logits(data["logits"]), pod.EnergyBased(None, t=t).predict_logits(data["logits"]),
           rtol=1e-5)


def test_mahalanobis(data):
    ours = Mahalanobis().fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    theirs = pod.Mahalanobis(None).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    _agree(ours, theirs, scale=2 * len(data["z"]), rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("d", [4, 16, 40])
def test_vim(data, d):
    ours = ViM(d=d, w=data["w"], b=data["b"]).fit_features(data["z"], data["y"])
    theirs = pod.ViM(None, d=d, w=data["w"], b=data["b"]).fit_features(data["z"], data["y"])
    assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-3)
    _agree(ours.predict_features(data["z_test"]), theirs.predict_features(data["z_test"]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("k,normalize", [(1, False), (1, True), (10, True)])
def test_knn(data, k, normalize):
    ours = KNN(k=k, normalize=normalize).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    theirs = pod.KNN(None, k=k, normalize=normalize).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    _agree(ours, theirs, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("percentile", [85, 90, 99])
def test_react(data, percentile):
    head = torch.nn.Linear(data["w"].shape[1], data["w"].shape[0])
    with torch.no_grad():
        head.weight.copy_(data["w"])
        head.bias.copy_(data["b"])
    ours = ReAct(head=head, percentile=percentile).fit_features(data["z"], data["y"])
    theirs = pod.ReAct(backbone=torch.nn.Identity(), head=head, percentile=percentile / 100)
    theirs.fit_feature_maps(data["z"], data["y"])
    assert ours.threshold == pytest.approx(theirs.threshold, rel=1e-6)
    with torch.no_grad():
        _agree(ours.predict_features(data["z_test"]), theirs.predict_feature_maps(data["z_test"]), rtol=1e-5)


def test_react_absolute_threshold(data):
    head = (data["w"], data["b"])
    lin = torch.nn.Linear(data["w"].shape[1], data["w"].shape[0])
    with torch.no_grad():
        lin.weight.copy_(data["w"])
        lin.bias.copy_(data["b"])
    theirs = pod.ReAct(backbone=torch.nn.Identity(), head=lin, threshold=0.7)
    with torch.no_grad():
        _agree(ReAct(head=head, threshold=0.7).predict_features(data["z_test"]),
               theirs.predict_feature_maps(data["z_test"]), rtol=1e-5)
