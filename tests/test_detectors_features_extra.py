"""Feature detectors RMD, GMM, NECO, NCI, fDBD, NNGuide, SHE, DICE vs plain references and pytorch-ood 0.4.0.

Agreement with pytorch-ood (Spearman >= 0.999 everywhere):

* GMM, NCI, fDBD, NNGuide, SHE: equal (GMM up to the ridge: relative here, absolute there).
* RMD: pytorch-ood's covariances are not divided by N, so ours == N * theirs (up to the ridges).
* DICE: equal, with their ``p`` a fraction and ours in percent.
* NECO: no pytorch-ood counterpart; checked against scikit-learn's StandardScaler + PCA as in the
  official code.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, spearmanr

from ood_core.api import DetectorError, FeaturesDetector, InvalidInputError, LogitsDetector, RequiresFitException
from ood_core.detectors import (
    DICE,
    GMM,
    NCI,
    NECO,
    RMD,
    SHE,
    NNGuide,
    build_detector,
    detector_params,
    fDBD,
    fit_detector,
    get_spec,
    score_detector,
)

SPEARMAN_MIN = 0.999
HEAD = ("NECO", "NCI", "fDBD", "NNGuide", "SHE", "DICE")


# -- reference implementations (loops, numpy float64) ----------------------------------------------
def _np(x):
    return np.asarray(x, dtype=np.float64)


def _ridged(cov, rel=1e-6):
    d = cov.shape[0]
    trace = np.trace(cov)
    return cov + np.eye(d) * rel * (trace / d if trace > 0 else 1.0)


def ref_rmd(z, y, test):
    z, y, test = _np(z), np.asarray(y), _np(test)
    means = [z[y == c].mean(axis=0) for c in sorted(set(y.tolist()))]
    within = sum(np.outer(r - means[c], r - means[c]) for r, c in zip(z, y)) / len(z)
    prec = np.linalg.inv(_ridged(within))
    mu0 = z.mean(axis=0)
    prec0 = np.linalg.inv(_ridged(np.cov(z.T, bias=True)))
    return np.array([min((x - m) @ prec @ (x - m) for m in means) - (x - mu0) @ prec0 @ (x - mu0) for x in test])


def ref_gmm(z, y, test, reg):
    z, y, test = _np(z), np.asarray(y), _np(test)
    comps = []
    for c in sorted(set(y.tolist())):
        zc = z[y == c]
        gauss = multivariate_normal(zc.mean(axis=0), _ridged(np.cov(zc.T, bias=True), reg))
        comps.append((math.log(len(zc) / len(z)), gauss))
    return np.array([-logsumexp([lp + g.logpdf(x) for lp, g in comps]) for x in test])


def ref_neco(z, test, d, logits=None):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(_np(z))
    pca = PCA(n_components=z.shape[1]).fit(scaler.transform(_np(z)))
    scaled = scaler.transform(_np(test))
    reduced = pca.transform(scaled)[:, :d]
    out = np.array([np.linalg.norm(r) / np.linalg.norm(s) for r, s in zip(reduced, scaled)])
    if logits is not None:
        out = out * _np(logits).max(axis=1)
    return -out


def ref_nci(z, w, b, test, alpha):
    mu = _np(z).mean(axis=0)
    out = []
    for x in _np(test):
        c = int(np.argmax(_np(w) @ x + _np(b)))
        out.append(-(_np(w)[c] @ (x - mu) / np.linalg.norm(x - mu) + alpha * np.abs(x).sum()))
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


def ref_nnguide(z, w, b, test, k):
    def energy(x):
        logits = _np(w) @ x + _np(b)
        return logsumexp(logits)

    bank = [x / np.linalg.norm(x) * energy(x) for x in _np(z)]
    out = []
    for x in _np(test):
        sims = sorted((x / np.linalg.norm(x) @ v for v in bank), reverse=True)
        out.append(-np.mean(sims[:k]) * energy(x))
    return np.array(out)


def ref_she(z, y, w, b, test):
    z, y, w, b = _np(z), np.asarray(y), _np(w), _np(b)
    patterns = {}
    for c in sorted(set(y.tolist())):
        rows = [x for x, label in zip(z, y) if label == c and np.argmax(w @ x + b) == c]
        patterns[c] = np.mean(rows, axis=0)
    return np.array([-(x @ patterns[int(np.argmax(w @ x + b))]) for x in _np(test)])


def ref_dice(z, w, b, test, p):
    w = _np(w)
    contrib = _np(z).mean(axis=0)[None, :] * w
    masked = np.where(contrib > np.percentile(contrib, p), w, 0.0)
    return np.array([-logsumexp(masked @ x + _np(b)) for x in _np(test)])


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
    y_test = torch.arange(100) % c
    z_test = torch.cat([
        feats(means[y_test] + torch.randn(100, d_in, generator=g)),
        feats(torch.randn(100, d_in, generator=g) * 3.0),
    ])
    onehot = torch.nn.functional.one_hot(y, c).double() * 4 - 2
    zb = torch.cat([z, torch.ones(n, 1)], dim=1).double()
    sol = torch.linalg.solve(zb.T @ zb + 50.0 * torch.eye(d + 1, dtype=torch.float64), zb.T @ onehot).float()
    w, b = sol[:-1].T.contiguous(), sol[-1].contiguous()
    return dict(z=z, y=y, test=z_test, w=w, b=b)


def _linear(w, b):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _build(name, data, **kw):
    head = (data["w"], data["b"])
    return {
        "RMD": lambda: RMD(),
        "GMM": lambda: GMM(**kw),
        "NECO": lambda: NECO(head=head, **{"d": 5, **kw}),
        "NCI": lambda: NCI(head=head, **kw),
        "fDBD": lambda: fDBD(head=head),
        "NNGuide": lambda: NNGuide(head=head, **{"k": 5, **kw}),
        "SHE": lambda: SHE(head=head),
        "DICE": lambda: DICE(head=head, **kw),
    }[name]()


def _fitted(name, data, **kw):
    return _build(name, data, **kw).fit_features(data["z"], data["y"])


NAMES = ["RMD", "GMM", "NECO", "NCI", "fDBD", "NNGuide", "SHE", "DICE"]


def _agree(ours, theirs, scale=1.0, rtol=1e-4, atol=1e-4):
    ours = ours.double().numpy()
    theirs = np.asarray(theirs.detach() if isinstance(theirs, torch.Tensor) else theirs, dtype=np.float64)
    rho = spearmanr(ours, theirs).statistic
    assert rho >= SPEARMAN_MIN, rho
    np.testing.assert_allclose(ours, scale * theirs, rtol=rtol, atol=atol)
    return rho


# -- references ---------------------------------------------------------------------------------------
def test_rmd_matches_reference(data):
    det = _fitted("RMD", data)
    np.testing.assert_allclose(det.predict_features(data["test"].double()).numpy(),
                               ref_rmd(data["z"], data["y"], data["test"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_rmd(data["z"], data["y"], data["test"]), rtol=1e-3, atol=2e-2)


@pytest.mark.parametrize("reg", [1e-6, 1e-2])
def test_gmm_matches_reference(data, reg):
    det = _fitted("GMM", data, reg=reg)
    np.testing.assert_allclose(det.predict_features(data["test"].double()).numpy(),
                               ref_gmm(data["z"], data["y"], data["test"], reg), rtol=1e-6)


@pytest.mark.parametrize("d,use_max_logit", [(1, False), (5, False), (20, True)])
def test_neco_matches_sklearn_reference(data, d, use_max_logit):
    det = _fitted("NECO", data, d=d, use_max_logit=use_max_logit)
    logits = data["test"] @ data["w"].T + data["b"] if use_max_logit else None
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_neco(data["z"], data["test"], d, logits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1e-2, 0.1])
def test_nci_matches_reference(data, alpha):
    det = _fitted("NCI", data, alpha=alpha)
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_nci(data["z"], data["w"], data["b"], data["test"], alpha), rtol=1e-4, atol=1e-5)


def test_fdbd_matches_reference(data):
    det = _fitted("fDBD", data)
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_fdbd(data["z"], data["w"], data["b"], data["test"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 7, 600])
def test_nnguide_matches_reference(data, k):
    det = _fitted("NNGuide", data, k=k)
    test = data["test"][::4]
    np.testing.assert_allclose(det.predict_features(test).double().numpy(),
                               ref_nnguide(data["z"], data["w"], data["b"], test, k), rtol=1e-4, atol=1e-4)


def test_nnguide_chunking_gives_same_scores(data, monkeypatch):
    import ood_core.detectors.neighbours as module

    det = _fitted("NNGuide", data, k=3)
    full = det.predict_features(data["test"])
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1500)  # 2 test rows per block
    torch.testing.assert_close(det.predict_features(data["test"]), full)


def test_she_matches_reference(data):
    det = _fitted("SHE", data)
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_she(data["z"], data["y"], data["w"], data["b"], data["test"]), rtol=1e-4, atol=1e-4)


def test_she_class_without_correct_samples_falls_back():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    w = torch.eye(3, 2)  # class 2 can never be predicted; class 1 samples predicted as 1
    det = SHE(head=(w, torch.zeros(3))).fit_features(z, torch.tensor([0, 2, 1, 1]))
    torch.testing.assert_close(det.patterns, torch.tensor([[1.0, 0], [0, 2.0], [2.0, 0]], dtype=torch.float64))


@pytest.mark.parametrize("p", [10, 50, 90])
def test_dice_matches_reference(data, p):
    det = _fitted("DICE", data, p=p)
    kept = (det.masked_w != 0).float().mean()
    assert float(kept) == pytest.approx(1 - p / 100, abs=0.01)
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_dice(data["z"], data["w"], data["b"], data["test"], p), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_far_ood_scores_higher(data, name):
    det = _fitted(name, data, **({"p": 10} if name == "DICE" else {}))  # 32-D head: p=90 keeps too little
    id_s, ood_s = det.predict_features(data["test"][:100]), det.predict_features(data["test"][100:])
    auroc = float((ood_s[:, None] > id_s[None, :]).double().mean())
    assert auroc > 0.75, (name, auroc)


# -- pytorch-ood 0.4.0 --------------------------------------------------------------------------------
pod = pytest.importorskip("pytorch_ood.detector")


def test_vs_pytorch_ood_rmd(data):
    theirs = pod.RMD(None).fit_features(data["z"], data["y"]).predict_features(data["test"])
    ours = _fitted("RMD", data).predict_features(data["test"].double())
    _agree(ours, theirs, scale=len(data["z"]), rtol=1e-3, atol=5e-2)


def test_vs_pytorch_ood_gmm():
    # well-conditioned class covariances (no ReLU zeros), so that the ridges (absolute there,
    # relative here) are negligible; with near-singular ones they dominate and the two differ
    g = torch.Generator().manual_seed(12)
    means = torch.randn(4, 10, generator=g) * 3
    y = torch.arange(400) % 4
    z = means[y] + torch.randn(400, 10, generator=g) * torch.linspace(0.5, 2, 10)
    test = torch.cat([means[y[:60]] + torch.randn(60, 10, generator=g), torch.randn(60, 10, generator=g) * 4])
    theirs = pod.GMM(None, reg=1e-6).fit_features(z, y).predict_features(test)
    _agree(GMM(reg=1e-6).fit_features(z, y).predict_features(test.double()), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 0.1])
def test_vs_pytorch_ood_nci(data, alpha):
    theirs = pod.NCI(None, _linear(data["w"], data["b"]), alpha=alpha).fit_features(data["z"])
    _agree(_fitted("NCI", data, alpha=alpha).predict_features(data["test"]), theirs.predict_features(data["test"]),
           rtol=1e-5, atol=1e-5)


def test_vs_pytorch_ood_fdbd(data):
    theirs = pod.fDBD(None, _linear(data["w"], data["b"])).fit_features(data["z"])
    _agree(_fitted("fDBD", data).predict_features(data["test"]), theirs.predict_features(data["test"]),
           rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 10])
def test_vs_pytorch_ood_nnguide(data, k):
    theirs = pod.NNGuide(None, _linear(data["w"], data["b"]), k=k).fit_features(data["z"], data["y"])
    with torch.no_grad():
        _agree(_fitted("NNGuide", data, k=k).predict_features(data["test"]), theirs.predict_features(data["test"]),
               rtol=1e-5, atol=1e-5)


def test_vs_pytorch_ood_she(data):
    theirs = pod.SHE(None, _linear(data["w"], data["b"])).fit_features(data["z"], data["y"])
    with torch.no_grad():
        _agree(_fitted("SHE", data).predict_features(data["test"]), theirs.predict_features(data["test"]),
               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p", [10, 50, 90])
def test_vs_pytorch_ood_dice(data, p):
    theirs = pod.DICE(None, w=data["w"], b=data["b"], p=p / 100).fit_features(data["z"], data["y"])
    ours = _fitted("DICE", data, p=p)
    assert ours.threshold == pytest.approx(theirs.threshold, rel=1e-5, abs=1e-7)
    _agree(ours.predict_features(data["test"]), theirs.predict_features(data["test"]), rtol=1e-5, atol=1e-5)


# -- batch independence, robustness, errors, registry ------------------------------------------------
def test_batch_independence_and_empty_batch(data):
    test = data["test"][::10]
    for name in NAMES:
        det = _fitted(name, data)
        batch = det.predict_features(test)
        single = torch.cat([det.predict_features(test[i : i + 1]) for i in range(len(test))])
        assert batch.shape == (len(test),)
        torch.testing.assert_close(single, batch, rtol=1e-4, atol=1e-4, msg=name)
        assert det.predict_features(test[:0]).shape == (0,)


def _robust_cases():
    g = torch.Generator().manual_seed(4)
    y20, y60 = torch.arange(20) % 3, torch.arange(60) % 3
    partly_constant = torch.randn(60, 16, generator=g)
    partly_constant[:, :5] = 2.0
    return {
        "d_gt_n": (torch.randn(20, 64, generator=g), y20),
        "low_rank": (torch.randn(60, 3, generator=g) @ torch.randn(3, 16, generator=g), y60),
        "partly_constant": (partly_constant, y60),
        "constant": (torch.full((60, 16), 1.5), y60),
        "duplicated": (torch.randn(10, 16, generator=g).repeat(6, 1), y60),
        "single_sample_class": (torch.randn(31, 16, generator=g), torch.cat([torch.zeros(30), torch.ones(1)]).long()),
    }


@pytest.mark.parametrize("case", list(_robust_cases()))
def test_robust_inputs_give_finite_scores(case):
    z, y = _robust_cases()[case]
    g = torch.Generator().manual_seed(5)
    d = z.shape[1]
    head = (torch.randn(3, d, generator=g), torch.randn(3, generator=g))
    test = torch.cat([z[:5], z[:5] + torch.randn(5, d, generator=g), 100 * torch.randn(5, d, generator=g)])
    dets = [RMD(), GMM(), NECO(d=2), NECO(d=2, use_max_logit=True, head=head), NCI(head=head), fDBD(head=head),
            NNGuide(head=head, k=3), SHE(head=head), DICE(head=head, p=50)]
    for det in dets:
        det.fit_features(z, y)
        s = det.predict_features(test)
        assert s.shape == (15,) and torch.isfinite(s).all(), (case, type(det).__name__, s)
    rmd = dets[0].predict_features(test)
    if case not in ("constant", "duplicated"):
        assert torch.isfinite(rmd).all()


@pytest.mark.parametrize("name", NAMES)
def test_predict_before_fit_raises(name, data):
    with pytest.raises(RequiresFitException, match=name):
        _build(name, data).predict_features(data["test"])


def test_invalid_inputs_raise(data):
    bad = data["test"].clone()
    bad[3, 2] = float("nan")
    inf = data["test"].clone()
    inf[0, 0] = float("inf")
    for name in NAMES:
        det = _fitted(name, data)
        for x in (bad, inf, data["test"][0], data["test"][None]):
            with pytest.raises(InvalidInputError, match=name):
                det.predict_features(x)
        with pytest.raises(InvalidInputError, match="dimension"):
            det.predict_features(data["test"][:, :5])
        with pytest.raises(InvalidInputError, match=name):
            _build(name, data).fit_features(bad, torch.zeros(len(bad), dtype=torch.long))
        with pytest.raises(InvalidInputError, match=f"{name}: no in-distribution"):
            _build(name, data).fit_features(data["z"], -torch.ones(len(data["z"]), dtype=torch.long))
        if name in HEAD and name != "NECO":  # NECO uses the head only with use_max_logit
            with pytest.raises(InvalidInputError, match=f"{name}: features have dimension 5, head weights expect"):
                _build(name, data).fit_features(data["z"][:, :5], data["y"])
            with pytest.raises(DetectorError, match=f"{name}: needs the classifier head"):
                type(det)().fit_features(data["z"], data["y"])
    with pytest.raises(DetectorError, match="NECO: needs the classifier head"):
        NECO(use_max_logit=True).fit_features(data["z"], data["y"])


def test_parameter_errors(data):
    z, y = data["z"], data["y"]
    with pytest.raises(InvalidInputError, match="NECO: principal dimension d=32 must be smaller"):
        NECO(d=32).fit_features(z, y)
    with pytest.raises(InvalidInputError, match="NNGuide: k=601 exceeds"):
        _build("NNGuide", data, k=601).fit_features(z, y)
    with pytest.raises(InvalidInputError, match="SHE: labels must be < the number of classes"):
        _build("SHE", data).fit_features(z, y + 1)
    for call, match in [
        (lambda: GMM(reg=0), "GMM: reg"),
        (lambda: NECO(d=0), "NECO: d"),
        (lambda: NCI(alpha=-1), "NCI: alpha"),
        (lambda: NNGuide(k=0), "NNGuide: k"),
        (lambda: DICE(p=100), "DICE: p"),
        (lambda: DICE(detector="entropy"), "DICE: detector must be one of"),
        (lambda: SHE(head=torch.ones(3)), "SHE: head"),
        (lambda: fDBD(head=(torch.ones(3, 4), torch.ones(2))), "fDBD: head bias"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    assert NECO().fit_features(z, y).predict_features(data["test"]).shape == (200,)  # head optional without max logit


def test_fit_with_model_loader_ood_labels_and_device_moves(data):
    model = torch.nn.Identity()
    loader = [(data["z"][i : i + 100], data["y"][i : i + 100]) for i in range(0, len(data["z"]), 100)]
    z = torch.cat([data["z"], data["test"][100:]])
    y = torch.cat([data["y"], -torch.ones(100, dtype=torch.long)])
    for name in NAMES:
        direct = _fitted(name, data).predict_features(data["test"])
        det = _build(name, data)
        det.model = model
        assert det.fit(loader) is det
        torch.testing.assert_close(det.predict(data["test"]), direct, msg=name)
        torch.testing.assert_close(_build(name, data).fit_features(z, y).predict_features(data["test"]), direct)
        meta = copy.deepcopy(det).to("meta")
        tensors = [k for k, v in vars(det).items() if isinstance(v, torch.Tensor)]
        assert tensors and all(getattr(meta, k).device.type == "meta" for k in tensors), name
        assert det.to(torch.device("cpu")) is det


def test_fitted_state_is_float64_where_inverted(data):
    assert _fitted("RMD", data).background_whitener.dtype == torch.float64
    assert _fitted("GMM", data).whiteners.dtype == torch.float64
    assert _fitted("NECO", data).components.dtype == torch.float64
    assert _fitted("GMM", data).predict_features(data["test"]).dtype == torch.float32


EXPECTED = {
    "TemperatureScaling": ("logits", False), "KLMatching": ("logits", False), "Entropy": ("logits", False),
    "GEN": ("logits", False), "OpenMax": ("logits", False), "WeightedEBO": ("logits", False),
    "RMD": ("features", False), "GMM": ("features", False), "NECO": ("features", True),
    "NCI": ("features", True), "fDBD": ("features", True), "NNGuide": ("features", True),
    "SHE": ("features", True), "DICE": ("features", True),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_registry_specs_build_and_dispatch(data, name):
    spec = get_spec(name.lower())
    assert spec.name == name and spec.cls.__name__ == name
    assert (spec.representation, spec.needs_head) == EXPECTED[name]
    assert issubclass(spec.cls, LogitsDetector if spec.representation == "logits" else FeaturesDetector)
    assert set(spec.search_space) <= set(detector_params(name))
    for value in spec.search_space.values():
        assert isinstance(value, dict) and list(value) == ["grid"]
    assert spec.cls.__doc__ and "Paper" in spec.cls.__doc__ and "math::" in spec.cls.__doc__
    params = {"NNGuide": {"k": 5}, "NECO": {"d": 4}}.get(name, {})
    det = build_detector(name, params, head=(data["w"], data["b"]))
    reps = {"features": data["z"], "logits": data["z"] @ data["w"].T + data["b"]}
    assert fit_detector(det, reps, data["y"]) is det
    scores = score_detector(det, reps)
    assert scores.shape == (len(data["y"]),) and torch.isfinite(scores).all()
    as_numpy = {k: v.numpy() for k, v in reps.items()}
    fit_detector(det, as_numpy, data["y"].numpy())
    torch.testing.assert_close(score_detector(det, as_numpy), scores)
    if spec.needs_head:
        with pytest.raises(ValueError, match="needs the classifier head"):
            build_detector(name, params)


def test_default_grids():
    assert get_spec("GEN").search_space == {"gamma": {"grid": [0.01, 0.1, 0.5, 1, 2, 5, 10]},
                                            "M": {"grid": [10, 50, 100, 200, 500, 1000]}}
    assert get_spec("NCI").search_space == {"alpha": {"grid": [1e-4, 1e-3, 1e-2, 0.1]}}
    assert get_spec("DICE").search_space == {"p": {"grid": [10, 30, 50, 70, 90]}}
