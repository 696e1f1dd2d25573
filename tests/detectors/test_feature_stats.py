"""RMD, GMM, NECO, NCI, fDBD vs plain references and vs pytorch-ood 0.4.0 (NECO: scikit-learn, as its code).

Agreement with pytorch-ood (Spearman >= 0.999):

* NCI, fDBD: equal.
* RMD: pytorch-ood's covariances are not divided by N, so ours == N * theirs (up to the ridges).
* GMM: equal where the ridges agree (features scaled to a mean pooled variance of 1: ours is reg times it,
  theirs reg), or where both are negligible.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, spearmanr

from ood_core.api import DetectorError
from ood_core.constraints import ParameterError
from ood_core.detectors import GMM, NCI, NECO, RMD, fDBD

from .cases import degenerate_features


def _np(x):
    return np.asarray(x, dtype=np.float64)


def _ridged(cov, rel=1e-6):
    d = cov.shape[0]
    trace = np.trace(cov)
    return cov + np.eye(d) * rel * (trace / d if trace > 0 else 1.0)


# -- reference implementations (loops, numpy float64) ----------------------------------------------
def ref_rmd(z, y, test):
    z, y, test = _np(z), np.asarray(y), _np(test)
    means = [z[y == c].mean(axis=0) for c in sorted(set(y.tolist()))]
    within = sum(np.outer(r - means[c], r - means[c]) for r, c in zip(z, y)) / len(z)
    prec = np.linalg.inv(_ridged(within))
    mu0 = z.mean(axis=0)
    prec0 = np.linalg.inv(_ridged(np.cov(z.T, bias=True)))
    return np.array([min((x - m) @ prec @ (x - m) for m in means) - (x - mu0) @ prec0 @ (x - mu0) for x in test])


def ref_gmm(z, y, test, reg):
    """One ridge for all classes: reg times the mean pooled within-class variance of the varying features."""
    z, y, test = _np(z), np.asarray(y), _np(test)
    classes = sorted(set(y.tolist()))
    covs = [np.cov(z[y == c].T, bias=True) for c in classes]
    priors = [np.mean(y == c) for c in classes]
    pooled = sum(p * np.diag(cov) for p, cov in zip(priors, covs))
    ridge = reg * pooled.sum() / (pooled > 0).sum()
    comps = [(math.log(p), multivariate_normal(z[y == c].mean(axis=0), cov + ridge * np.eye(len(cov))))
             for p, c, cov in zip(priors, classes, covs)]
    return np.array([-logsumexp([lp + g.logpdf(x) for lp, g in comps]) for x in test])


def ref_neco(z, test, d, logits=None):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(_np(z))
    pca = PCA(n_components=z.shape[1]).fit(scaler.transform(_np(z)))
    scaled = scaler.transform(_np(test))
    reduced = pca.transform(scaled)[:, :d]
    out = np.array([np.linalg.norm(r) / np.linalg.norm(s) for r, s in zip(reduced, scaled)])
    return -(out if logits is None else out * _np(logits).max(axis=1))


def ref_nci(z, w, b, test, alpha):
    mu, w, b = _np(z).mean(axis=0), _np(w), _np(b)
    out = []
    for x in _np(test):
        c = int(np.argmax(w @ x + b))
        out.append(-(w[c] @ (x - mu) / np.linalg.norm(x - mu) + alpha * np.abs(x).sum()))
    return np.array(out)


def ref_fdbd(z, w, b, test):
    mu, w, b = _np(z).mean(axis=0), _np(w), _np(b)
    out = []
    for x in _np(test):
        logits = w @ x + b
        c = int(np.argmax(logits))
        dists = [(logits[c] - logits[j]) / np.linalg.norm(w[c] - w[j]) for j in range(len(b)) if j != c]
        out.append(-np.mean(dists) / np.linalg.norm(x - mu))
    return np.array(out)


# -- data ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    """ReLU features of a random layer on Gaussian classes (penultimate-like), a trained-like head, ID + OOD tests."""
    g = torch.Generator().manual_seed(11)
    c, d_in, d, n = 6, 24, 32, 600
    means = torch.randn(c, d_in, generator=g) * 2.5
    proj = torch.randn(d_in, d, generator=g) / d_in**0.5

    def feats(x):
        return torch.relu(x @ proj + 0.3)

    y = torch.arange(n) % c
    z = feats(means[y] + torch.randn(n, d_in, generator=g))
    test = torch.cat([feats(means[torch.arange(100) % c] + torch.randn(100, d_in, generator=g)),
                      feats(torch.randn(100, d_in, generator=g) * 3.0)])
    onehot = torch.nn.functional.one_hot(y, c).double() * 4 - 2
    zb = torch.cat([z, torch.ones(n, 1)], dim=1).double()
    sol = torch.linalg.solve(zb.T @ zb + 50.0 * torch.eye(d + 1, dtype=torch.float64), zb.T @ onehot).float()
    return dict(z=z, y=y, test=test, w=sol[:-1].T.contiguous(), b=sol[-1].contiguous())


def _linear(w, b):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _auroc(id_s, ood_s):
    greater, ties = (ood_s[:, None] > id_s[None, :]).double(), (ood_s[:, None] == id_s[None, :]).double()
    return float(greater.mean() + 0.5 * ties.mean())


def _build(name, data, **kw):
    head = (data["w"], data["b"])
    return {"RMD": lambda: RMD(), "GMM": lambda: GMM(**kw), "NECO": lambda: NECO(head=head, **{"d": 5, **kw}),
            "NCI": lambda: NCI(head=head, **kw), "fDBD": lambda: fDBD(head=head)}[name]()


NAMES = ["RMD", "GMM", "NECO", "NCI", "fDBD"]


# -- references ---------------------------------------------------------------------------------------
def test_rmd_matches_reference(data):
    det = RMD().fit_features(data["z"], data["y"])
    ref = ref_rmd(data["z"], data["y"], data["test"])
    np.testing.assert_allclose(det.predict_features(data["test"].double()).numpy(), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(), ref, rtol=1e-3, atol=2e-2)
    assert det.background_whitener.dtype == torch.float64


@pytest.mark.parametrize("reg", [1e-6, 1e-2])
def test_gmm_matches_reference(data, reg):
    det = GMM(reg=reg).fit_features(data["z"], data["y"])
    np.testing.assert_allclose(det.predict_features(data["test"].double()).numpy(),
                               ref_gmm(data["z"], data["y"], data["test"], reg), rtol=1e-6)
    assert det.whiteners.dtype == torch.float64 and det.predict_features(data["test"]).dtype == torch.float32


def test_gmm_ranking_ignores_dead_feature_columns(data):
    """Appending constant columns (dead units: zeros; or any constant) shifts every score by the same constant:
    the ranking, the AUROC and the score differences are unchanged (a per-class ridge made them depend on the
    dead columns)."""
    z, y, test = data["z"].double(), data["y"], data["test"].double()

    def dead(x):
        return torch.cat([x, torch.zeros(len(x), 100, dtype=x.dtype), torch.full((len(x), 20), 2.7, dtype=x.dtype)], 1)

    for reg in (1e-6, 1e-2):
        before = GMM(reg=reg).fit_features(z, y).predict_features(test)
        after = GMM(reg=reg).fit_features(dead(z), y).predict_features(dead(test))
        shift = after - before
        torch.testing.assert_close(shift, shift.mean().expand_as(shift), rtol=0, atol=1e-8)
        assert torch.equal(torch.argsort(after), torch.argsort(before))
        assert _auroc(after[:100], after[100:]) == _auroc(before[:100], before[100:]) > 0.75


@pytest.mark.parametrize("d,use_max_logit", [(1, False), (5, False), (20, True), (32, True)])
def test_neco_matches_sklearn_reference(data, d, use_max_logit):
    det = NECO(d=d, use_max_logit=use_max_logit, head=(data["w"], data["b"])).fit_features(data["z"], data["y"])
    logits = data["test"] @ data["w"].T + data["b"] if use_max_logit else None
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_neco(data["z"], data["test"], d, logits), rtol=1e-4, atol=1e-5)
    assert det.components.dtype == torch.float64


def test_neco_constant_features_keep_scale_one(data):
    z, test = data["z"].clone(), data["test"].clone()
    z[:, :3], test[:, :3] = 0.0, 0.0  # dead units
    z[:, 3], test[:, 3] = 2.5, 2.5
    det = NECO(d=5).fit_features(z, data["y"])
    torch.testing.assert_close(det.std[:4], torch.ones(4, dtype=torch.float64))
    np.testing.assert_allclose(det.predict_features(test).double().numpy(), ref_neco(z, test, 5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1e-2, 0.1])
def test_nci_matches_reference(data, alpha):
    det = NCI(head=(data["w"], data["b"]), alpha=alpha).fit_features(data["z"], data["y"])
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_nci(data["z"], data["w"], data["b"], data["test"], alpha), rtol=1e-4, atol=1e-5)


def test_fdbd_matches_reference(data):
    det = fDBD(head=(data["w"], data["b"])).fit_features(data["z"], data["y"])
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_fdbd(data["z"], data["w"], data["b"], data["test"]), rtol=1e-4, atol=1e-6)


def test_fdbd_classes_with_equal_weights_have_no_boundary():
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    det = fDBD(head=(w, torch.zeros(3))).fit_features(torch.randn(20, 2), torch.arange(20) % 3)
    assert float(det.inv_gaps[0, 1]) == 0.0 and torch.isfinite(det.predict_features(torch.randn(5, 2))).all()


@pytest.mark.parametrize("name", NAMES)
def test_far_ood_scores_higher_and_ood_labels_are_ignored(data, name):
    det = _build(name, data).fit_features(data["z"], data["y"])
    id_s, ood_s = det.predict_features(data["test"][:100]), det.predict_features(data["test"][100:])
    assert _auroc(id_s, ood_s) > 0.75, name
    z = torch.cat([data["z"], data["test"][100:]])
    y = torch.cat([data["y"], -torch.ones(100, dtype=torch.long)])
    torch.testing.assert_close(_build(name, data).fit_features(z, y).predict_features(data["test"][:100]), id_s)


def _robust_cases():
    cases, g = degenerate_features()
    return {
        **cases,
        "single_sample_class": (torch.randn(31, 16, generator=g), torch.cat([torch.zeros(30), torch.ones(1)]).long()),
    }


@pytest.mark.parametrize("case", list(_robust_cases()))
def test_singular_covariances_give_finite_scores(case):
    z, y = _robust_cases()[case]
    g = torch.Generator().manual_seed(5)
    d = z.shape[1]
    head = (torch.randn(3, d, generator=g), torch.randn(3, generator=g))
    test = torch.cat([z[:5], z[:5] + torch.randn(5, d, generator=g), 100 * torch.randn(5, d, generator=g)])
    for det in (RMD(), GMM(), NECO(d=2), NECO(d=2, use_max_logit=True, head=head), NCI(head=head), fDBD(head=head)):
        s = det.fit_features(z, y).predict_features(test)
        assert s.shape == (15,) and torch.isfinite(s).all(), (case, type(det).__name__, s)


# -- constraints and search spaces --------------------------------------------------------------------
def test_neco_d_may_reach_the_feature_dimension_not_beyond(data):
    z, y = data["z"], data["y"]
    assert torch.isfinite(NECO(d=32).fit_features(z, y).predict_features(data["test"])).all()
    with pytest.raises(ParameterError, match=r"NECO: d=33 must be in \[1, D=32\]"):
        NECO(d=33).fit_features(z, y)


@pytest.mark.parametrize("call,match", [
    (lambda: NECO(d=0), r"NECO: d=0 must be in \[1, D\]"),
    (lambda: NECO(d=2.5), "NECO: d=2.5 must be an integer"),
    (lambda: GMM(reg=0), r"GMM: reg=0 must be in \(0, inf\)"),
    (lambda: NCI(alpha=-1), r"NCI: alpha=-1 must be in \[0, inf\)"),
])
def test_static_constraints(call, match):
    with pytest.raises(ParameterError, match=match):
        call()


def test_head_is_required_where_used(data):
    z, y = data["z"], data["y"]
    for det in (NCI(), fDBD(), NECO(use_max_logit=True)):
        with pytest.raises(DetectorError, match=f"{type(det).__name__}: needs the classifier head"):
            det.fit_features(z, y)
    assert NECO().fit_features(z, y).predict_features(data["test"]).shape == (200,)  # the ratio alone needs none


@pytest.mark.parametrize("dim,grid", [
    (None, [5, 10, 20, 50, 100]), (2048, [5, 10, 20, 50, 100]), (64, [5, 10, 20, 50]), (16, [5, 10]),
    (8, [2, 4, 5, 6]), (2, [1]),
])
def test_neco_search_space_adapts_to_the_feature_dimension(dim, grid):
    data = None if dim is None else {"D": dim, "C": 10, "N": 1000}
    assert NECO.search_space(data) == {"d": {"grid": grid}}
    for d in grid:
        NECO.check_params({"d": d}, data)
    assert NECO.search_space({"D": 1}) == {}


def test_default_grids():
    assert GMM.search_space({"D": 16, "C": 3, "N": 50}) == {"reg": {"grid": [1e-6, 1e-4, 1e-2, 1e-1]}}
    assert NCI.search_space({"D": 16, "C": 3, "N": 50}) == {"alpha": {"grid": [1e-4, 1e-3, 1e-2, 0.1]}}
    assert RMD.search_space() == {} and fDBD.search_space() == {}


# -- pytorch-ood 0.4.0 --------------------------------------------------------------------------------
pod = pytest.importorskip("pytorch_ood.detector")


def _agree(ours, theirs, scale=1.0, rtol=1e-4, atol=1e-4):
    ours = ours.double().numpy()
    theirs = np.asarray(theirs.detach().double() if isinstance(theirs, torch.Tensor) else theirs, dtype=np.float64)
    assert spearmanr(ours, theirs).statistic >= 0.999
    np.testing.assert_allclose(ours, scale * theirs, rtol=rtol, atol=atol)


def test_rmd_equals_pytorch_ood_times_n(data):
    theirs = pod.RMD(None).fit_features(data["z"], data["y"]).predict_features(data["test"])
    ours = RMD(None).fit_features(data["z"], data["y"]).predict_features(data["test"].double())
    _agree(ours, theirs, scale=len(data["z"]), rtol=1e-3, atol=5e-2)


def test_gmm_equals_pytorch_ood_where_the_ridges_agree(data):
    """Features scaled to a mean pooled variance of 1: our ridge (reg times it) is theirs (reg, absolute), at
    any reg. Well-conditioned class covariances: both ridges are negligible at reg = 1e-6. ReLU features whose
    class covariances are singular (D = 32 from 24 latent dimensions): the ridges dominate and the two differ."""
    z, y, test = data["z"].double(), data["y"], data["test"].double()
    scale = (GMM(reg=1e-6).fit_features(z, y).ridge / 1e-6) ** -0.5
    for reg in (1e-6, 1e-1):
        theirs = pod.GMM(None, reg=reg).fit_features(z * scale, y).predict_features(test * scale)
        _agree(GMM(None, reg).fit_features(z * scale, y).predict_features(test * scale), theirs, rtol=1e-9, atol=1e-6)
    theirs = pod.GMM(None, reg=1e-6).fit_features(z, y).predict_features(test).numpy()
    assert not np.allclose(GMM(reg=1e-6).fit_features(z, y).predict_features(test).numpy(), theirs, rtol=1e-2)
    g = torch.Generator().manual_seed(12)
    means = torch.randn(4, 10, generator=g) * 3
    y = torch.arange(400) % 4
    z = means[y] + torch.randn(400, 10, generator=g) * torch.linspace(0.5, 2, 10)
    test = torch.cat([means[y[:60]] + torch.randn(60, 10, generator=g), torch.randn(60, 10, generator=g) * 4])
    theirs = pod.GMM(None, reg=1e-6).fit_features(z, y).predict_features(test)
    _agree(GMM(reg=1e-6).fit_features(z, y).predict_features(test.double()), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 0.1])
def test_nci_equals_pytorch_ood(data, alpha):
    lin = _linear(data["w"], data["b"])
    theirs = pod.NCI(None, lin, alpha=alpha).fit_features(data["z"])
    for ours in (NCI(None, lin, alpha), NCI(encoder=None, head=lin, alpha=alpha)):  # pytorch-ood's ways
        ours.fit_features(data["z"], data["y"])
        _agree(ours.predict_features(data["test"]), theirs.predict_features(data["test"]), rtol=1e-5, atol=1e-5)


def test_fdbd_equals_pytorch_ood(data):
    lin = _linear(data["w"], data["b"])
    theirs = pod.fDBD(None, lin).fit_features(data["z"])
    for ours in (fDBD(None, lin), fDBD(encoder=None, head=lin)):
        ours.fit_features(data["z"], data["y"])
        _agree(ours.predict_features(data["test"]), theirs.predict_features(data["test"]), rtol=1e-5, atol=1e-6)


def test_pytorch_ood_constructors_fit_on_a_loader(data):
    """``RMD(encoder)`` / ``GMM(encoder, reg)`` built positionally and with keywords, fitted on a loader."""
    encoder = torch.nn.Identity()
    loader = [(data["z"][i : i + 200], data["y"][i : i + 200]) for i in range(0, len(data["z"]), 200)]
    test = data["test"]
    rmd = RMD(encoder).fit(loader)
    assert rmd.model is encoder and RMD(encoder=encoder).model is encoder
    _agree(rmd.predict(test), pod.RMD(encoder).fit(loader).predict(test), scale=len(data["z"]), rtol=1e-3, atol=5e-2)
    scale = (GMM(reg=1e-2).fit_features(data["z"], data["y"]).ridge / 1e-2) ** -0.5  # where the ridges agree
    loader = [(x * scale, y) for x, y in loader]
    theirs = pod.GMM(encoder, 1e-2).fit(loader).predict(test * scale)
    for gmm in (GMM(encoder, 1e-2), GMM(encoder=encoder, reg=1e-2)):
        assert gmm.fit(loader) is gmm and gmm.reg == 1e-2 and gmm.model is encoder
        _agree(gmm.predict(test * scale), theirs, rtol=1e-4, atol=1e-3)
