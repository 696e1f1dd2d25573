"""ViM vs a plain float64 reference, vs pytorch-ood 0.4.0, its constraints and its data-adapted grid."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ood_core.constraints import ParameterError
from ood_core.detectors import ViM
from ood_core.detectors.vim import paper_dim

from .cases import degenerate_features


def ref_vim(z_train, w, b, d, z_test):
    z_train, z_test = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    u = -np.linalg.pinv(w) @ b
    x = z_train - u
    vals, vecs = np.linalg.eigh(x.T @ x / len(x))
    null_space = vecs[:, np.argsort(-vals)[d:]]
    alpha = (z_train @ w.T + b).max(axis=1).mean() / np.linalg.norm(x @ null_space, axis=1).mean()
    scores = []
    for row in z_test:
        logits = w @ row + b
        m = logits.max()
        energy = m + math.log(np.exp(logits - m).sum())
        scores.append(alpha * np.linalg.norm((row - u) @ null_space) - energy)
    return np.array(scores)


@pytest.fixture(scope="module")
def clusters():
    """Well separated Gaussian classes, an OOD cluster far away, a linear head aligned with the means."""
    g = torch.Generator().manual_seed(0)
    c, d, n = 4, 16, 400
    means = torch.randn(c, d, generator=g) * 6.0
    y = torch.arange(n) % c
    z = means[y] + torch.randn(n, d, generator=g)
    z_id = means[torch.arange(80) % c] + torch.randn(80, d, generator=g)
    z_ood = torch.randn(80, d, generator=g) + 40.0 * torch.randn(1, d, generator=g).sign()
    return dict(z=z, y=y, z_id=z_id, z_ood=z_ood, w=means / means.norm(dim=1, keepdim=True), b=-0.1 * torch.ones(c))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [1, 4, 15])
def test_matches_reference(clusters, d, dtype):
    """float64 features: the formula, to 1e-4. float32 features: the same, except at d = 15, where the
    split falls between the two smallest eigenvalues (gap 0.12 against a largest eigenvalue of 260) and
    float32 sums rotate the residual direction (~2e-4 relative, the docstring's caveat): 1e-3 there."""
    det = ViM(d=d, w=clusters["w"], b=clusters["b"]).fit_features(clusters["z"].to(dtype), clusters["y"])
    loose = dtype == torch.float32 and d == 15
    for key in ("z_id", "z_ood"):
        got = det.predict_features(clusters[key].to(dtype)).double().numpy()
        ref = ref_vim(clusters["z"], clusters["w"], clusters["b"], d, clusters[key])
        np.testing.assert_allclose(got, ref, rtol=1e-3 if loose else 1e-4, atol=1e-2 if loose else 1e-3)
    assert det.residual_basis.dtype == torch.float64


def test_far_ood_scores_higher_and_ood_labels_are_ignored(clusters):
    det = ViM(d=4, w=clusters["w"], b=clusters["b"]).fit_features(clusters["z"], clusters["y"])
    id_s, ood_s = det.predict_features(clusters["z_id"]), det.predict_features(clusters["z_ood"])
    assert float(ood_s.min()) > float(id_s.max())
    z = torch.cat([clusters["z"], clusters["z_ood"]])
    y = torch.cat([clusters["y"], -torch.ones(len(clusters["z_ood"]), dtype=torch.long)])
    refit = ViM(d=4, w=clusters["w"], b=clusters["b"]).fit_features(z, y)
    torch.testing.assert_close(refit.predict_features(clusters["z_id"]), id_s)


def test_d_none_is_the_official_rule(clusters):
    det = ViM(w=clusters["w"], b=clusters["b"]).fit_features(clusters["z"], clusters["y"])
    assert det.d is None and det.dim == 8  # D // 2 below D = 768
    assert [paper_dim(x) for x in (2, 128, 512, 767, 768, 1024, 2048, 4096)] == [1, 64, 256, 383, 512, 512, 1000, 1000]


def test_d_must_be_below_the_feature_dimension(clusters):
    w, b = clusters["w"], clusters["b"]
    with pytest.raises(ParameterError, match=r"ViM: d=16 must be in \[1, D - 1=15\]"):
        ViM(d=16, w=w, b=b).fit_features(clusters["z"], clusters["y"])
    with pytest.raises(ParameterError, match=r"ViM: d=0 must be in \[1, D - 1\]"):
        ViM(d=0, w=w, b=b)
    with pytest.raises(ParameterError, match="D - 1=0"):  # D = 1: not even the rule's d fits
        ViM(w=torch.ones(2, 1), b=torch.zeros(2)).fit_features(torch.randn(10, 1), torch.arange(10) % 2)


@pytest.mark.parametrize("dim,grid", [
    (None, [256, 1000]),  # no data: OpenOOD's grid (validate checks it statically)
    (4096, [256, 1000]), (2048, [256, 1000]),  # OpenOOD's grid fits
    (1000, [250, 256, 512, 750]), (768, [192, 256, 512, 576]),  # 256 only: it and D/4, the rule's d, 3D/4
    (512, [128, 256, 384]), (128, [32, 64, 96]), (16, [4, 8, 12]), (3, [1, 2]), (2, [1]),
])
def test_search_space_adapts_to_the_feature_dimension(dim, grid):
    data = None if dim is None else {"D": dim, "C": 10, "N": 5000}
    assert ViM.search_space(data) == {"d": {"grid": grid}}
    for d in grid:
        ViM.check_params({"d": d}, data)  # every value fits the data
    assert ViM.search_space({"D": 1}) == {}


def test_search_space_of_a_128_d_backbone_runs():
    """The study that failed: default grid on 128-d features (fit with every grid value)."""
    g = torch.Generator().manual_seed(1)
    z, y = torch.relu(torch.randn(600, 128, generator=g)), torch.arange(600) % 10
    w, b = torch.randn(10, 128, generator=g) / 10, torch.zeros(10)
    for d in ViM.search_space({"D": 128})["d"]["grid"]:
        assert torch.isfinite(ViM(d=d, w=w, b=b).fit_features(z, y).predict_features(z[:50])).all()


def _robust_cases():
    return degenerate_features()[0]


@pytest.mark.parametrize("case", list(_robust_cases()))
def test_singular_covariances_give_finite_scores(case):
    z, y = _robust_cases()[case]
    g = torch.Generator().manual_seed(5)
    d = z.shape[1]
    test = torch.cat([z[:5], z[:5] + torch.randn(5, d, generator=g), 100 * torch.randn(5, d, generator=g)])
    det = ViM(d=2, w=torch.randn(3, d, generator=g), b=torch.randn(3, generator=g)).fit_features(z, y)
    s = det.predict_features(test)
    assert s.shape == (15,) and torch.isfinite(s).all(), s


# -- pytorch-ood 0.4.0 --------------------------------------------------------------------------------
pod = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def relu_data():
    """ReLU features (penultimate-like), ID + OOD tests, and a ridge least-squares head (a trained-like head;
    the ridge keeps W well conditioned, so the origin -pinv(W) b is moderate)."""
    g = torch.Generator().manual_seed(11)
    c, d_in, d, n = 6, 24, 48, 900
    means = torch.randn(c, d_in, generator=g) * 2.5
    proj = torch.randn(d_in, d, generator=g) / d_in**0.5
    y = torch.arange(n) % c
    z = torch.relu((means[y] + torch.randn(n, d_in, generator=g)) @ proj + 0.3)
    test = torch.relu(torch.cat([means[torch.arange(150) % c] + torch.randn(150, d_in, generator=g),
                                 3.0 * torch.randn(150, d_in, generator=g)]) @ proj + 0.3)
    zb = torch.cat([z, torch.ones(n, 1)], dim=1).double()
    onehot = torch.nn.functional.one_hot(y, c).double() * 4 - 2
    sol = torch.linalg.solve(zb.T @ zb + 50.0 * torch.eye(d + 1, dtype=torch.float64), zb.T @ onehot).float()
    return dict(z=z, y=y, test=test, w=sol[:-1].T.contiguous(), b=sol[-1].contiguous())


@pytest.mark.parametrize("d", [4, 16, 40])
def test_equals_pytorch_ood(relu_data, d):
    z, y, w, b, test = (relu_data[k] for k in ("z", "y", "w", "b", "test"))
    ours = ViM(d=d, w=w, b=b).fit_features(z, y)
    theirs = pod.ViM(None, d=d, w=w, b=b).fit_features(z, y)
    assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-3)
    o, t = ours.predict_features(test).double().numpy(), theirs.predict_features(test).double().numpy()
    assert spearmanr(o, t).statistic >= 0.999
    np.testing.assert_allclose(o, t, rtol=1e-3, atol=1e-3)


def test_pytorch_ood_constructor(relu_data):
    """``ViM(encoder, d, w, b)`` positionally, and with pytorch-ood's keywords; fit on a loader."""
    z, y, w, b, test = (relu_data[k] for k in ("z", "y", "w", "b", "test"))
    encoder = torch.nn.Identity()
    loader = [(z[i : i + 300], y[i : i + 300]) for i in range(0, len(z), 300)]
    theirs = pod.ViM(encoder, 16, w, b).fit(loader).predict(test).double().numpy()
    for det in (ViM(encoder, 16, w, b), ViM(encoder=encoder, d=16, w=w, b=b)):
        assert det.model is encoder and det.d == 16 and det.fit(loader) is det
        np.testing.assert_allclose(det.predict(test).double().numpy(), theirs, rtol=1e-3, atol=1e-3)
