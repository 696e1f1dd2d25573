"""Probability-based logit detectors vs plain reference implementations and pytorch-ood 0.4.0.

Agreement with pytorch-ood (Spearman >= 0.999 everywhere):

* KLMatching, WeightedEBO: equal.
* Entropy: equal up to pytorch-ood's clipping of p at 1e-7 (atol 1e-5).
* GEN: ours (sum over the top M) == min(M, C) * theirs (mean over the top M).
* TemperatureScaling: equal scores at the same T; our fitted T has an NLL <= theirs (they stop
  after 50 small L-BFGS steps).
* OpenMax: equal up to the Weibull fit (their scipy optimiser vs our exact MLE) when the batch
  holds every class as a top prediction; their scores change with the batch, ours do not.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr, weibull_min

from ood_core.api import InvalidInputError, RequiresFitException
from ood_core.detectors import GEN, Entropy, KLMatching, OpenMax, TemperatureScaling, WeightedEBO
from ood_core.detectors.openmax import weibull_mle

SPEARMAN_MIN = 0.999


# -- reference implementations (loops, numpy float64) ----------------------------------------------
def _softmax(row):
    row = np.asarray(row, np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


def ref_nll(logits, y, t):
    total = 0.0
    for row, label in zip(np.asarray(logits, np.float64), np.asarray(y)):
        scaled = row / t
        m = scaled.max()
        total += m + math.log(np.exp(scaled - m).sum()) - scaled[label]
    return total / len(y)


def ref_msp(logits, t):
    return np.array([-_softmax(np.asarray(row, np.float64) / t).max() for row in logits])


def ref_kl_matching(train_logits, test_logits):
    probs = [_softmax(r) for r in train_logits]
    groups = {}
    for p in probs:
        groups.setdefault(int(np.argmax(p)), []).append(p)
    templates = [np.mean(v, axis=0) for _, v in sorted(groups.items())]
    out = []
    for row in test_logits:
        p = _softmax(row)
        kls = [sum(pi * math.log(pi / di) for pi, di in zip(p, d) if pi > 0) for d in templates]
        out.append(min(kls))
    return np.array(out)


def ref_entropy(logits):
    return np.array([-sum(p * math.log(p) for p in _softmax(row) if p > 0) for row in logits])


def ref_gen(logits, gamma, m=None):
    out = []
    for row in logits:
        p = sorted(_softmax(row), reverse=True)[: (len(row) if m is None else m)]
        out.append(sum(pi**gamma * (1 - pi) ** gamma for pi in p))
    return np.array(out)


def ref_weighted_energy(logits, weights):
    w = np.maximum(np.asarray(weights, np.float64), 0)
    rows = np.asarray(logits, np.float64)
    return np.array([-math.log(sum(wi * math.exp(li) for wi, li in zip(w, row))) for row in rows])


def ref_openmax(train_logits, train_y, test_logits, tailsize, alpha, euclid_weight=1.0):
    """Bendale & Boult / OSDN with libMR's translation; Weibull MLE by scipy.stats.weibull_min.fit."""
    x, y = np.asarray(train_logits, np.float64), np.asarray(train_y)
    n_classes = x.shape[1]

    def dist(v, mu):
        cos = v @ mu / (np.linalg.norm(v) * np.linalg.norm(mu))
        return euclid_weight * np.linalg.norm(v - mu) + (1 - euclid_weight) * (1 - cos)

    models = {}
    for c in range(n_classes):
        rows = [v for v, label in zip(x, y) if label == c and np.argmax(v) == c]
        if not rows:
            continue
        mu = np.mean(rows, axis=0)
        tail = sorted(dist(v, mu) for v in rows)[-tailsize:]
        shift = 10000.0 - min(tail)
        k, _, scale = weibull_min.fit(np.array(tail) + shift, floc=0)
        models[c] = (mu, shift, k, scale)
    a = min(alpha, n_classes)
    scores = []
    for v in np.asarray(test_logits, np.float64):
        ranked = np.argsort(-v)[:a]
        omega = np.ones(n_classes)
        for r, c in enumerate(ranked, start=1):
            if c in models:
                mu, shift, k, scale = models[c]
                cdf = weibull_min.cdf(dist(v, mu) + shift, k, scale=scale)
            else:
                cdf = 1.0
            omega[c] = 1 - (a + 1 - r) / a * cdf
        revised = np.concatenate([[np.sum(v * (1 - omega))], v * omega])
        scores.append(_softmax(revised)[0])
    return np.array(scores)


# -- data ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    """Logits of a linear head on Gaussian class clusters: ID train, and ID + OOD test logits."""
    g = torch.Generator().manual_seed(21)
    c, d, n = 6, 16, 600
    means = torch.randn(c, d, generator=g)
    y = torch.arange(n) % c
    w = means / means.norm(dim=1, keepdim=True) * 2.0
    b = 0.1 * torch.randn(c, generator=g)
    z = means[y] + torch.randn(n, d, generator=g)
    y_test = torch.arange(120) % c
    z_test = torch.cat([means[y_test] + torch.randn(120, d, generator=g), torch.randn(120, d, generator=g) * 2.5])
    return dict(logits=z @ w.T + b, y=y, test=z_test @ w.T + b, n_classes=c)


def _agree(ours, theirs, scale=1.0, rtol=1e-4, atol=1e-5):
    ours = ours.double().numpy()
    theirs = np.asarray(theirs, dtype=np.float64)
    rho = spearmanr(ours, theirs).statistic
    assert rho >= SPEARMAN_MIN, rho
    np.testing.assert_allclose(ours, scale * theirs, rtol=rtol, atol=atol)
    return rho


def _fitted(name, data, **kw):
    det = {
        "TemperatureScaling": TemperatureScaling,
        "KLMatching": KLMatching,
        "Entropy": Entropy,
        "GEN": GEN,
        "OpenMax": OpenMax,
        "WeightedEBO": WeightedEBO,
    }[name](**kw)
    return det.fit_logits(data["logits"], data["y"])


NAMES = ["TemperatureScaling", "KLMatching", "Entropy", "GEN", "OpenMax", "WeightedEBO"]


# -- references ---------------------------------------------------------------------------------------
def test_temperature_scaling_minimises_nll(data):
    det = _fitted("TemperatureScaling", data)
    grid = np.exp(np.linspace(math.log(0.1), math.log(10), 300))
    nlls = [ref_nll(data["logits"], data["y"], t) for t in grid]
    best = grid[int(np.argmin(nlls))]
    assert det.t == pytest.approx(best, rel=0.03)
    assert ref_nll(data["logits"], data["y"], det.t) <= min(nlls) + 1e-9
    assert det.nll == pytest.approx(ref_nll(data["logits"], data["y"], det.t), rel=1e-9)
    got = det.predict_logits(data["test"]).double().numpy()
    np.testing.assert_allclose(got, ref_msp(data["test"], det.t), rtol=1e-5, atol=1e-7)


def test_temperature_scaling_edge_cases():
    y = torch.arange(40) % 4
    separable = torch.nn.functional.one_hot(y, 4).float() * 5.0
    sharp = TemperatureScaling().fit_logits(separable, y)  # NLL falls towards 0 as T -> 0
    assert sharp.t < 0.5 and sharp.nll < 1e-6 and TemperatureScaling.T_MIN <= sharp.t
    flat = TemperatureScaling().fit_logits(torch.zeros(40, 4), y)
    assert flat.t == pytest.approx(1.0)  # NLL = log C for every T: stays at the start
    wrong = TemperatureScaling().fit_logits(separable.roll(1, dims=1), y)  # always wrong: NLL falls as T grows
    assert 100 < wrong.t <= TemperatureScaling.T_MAX
    with torch.inference_mode():  # fitting works under inference mode too
        assert TemperatureScaling().fit_logits(separable + torch.randn(40, 4), y).t > 0


def test_kl_matching_matches_reference(data):
    det = _fitted("KLMatching", data)
    np.testing.assert_allclose(det.predict_logits(data["test"]).double().numpy(),
                               ref_kl_matching(data["logits"], data["test"]), rtol=1e-4, atol=1e-6)
    # only the predicted classes of the fit data get a template; labels play no role but < 0 drops rows
    only_two = torch.tensor([[5.0, 0, 0], [0, 4.0, 0], [6.0, 1, 0]])
    det2 = KLMatching().fit_logits(only_two, torch.tensor([2, 2, -1]))
    assert det2.template_classes.tolist() == [0, 1]
    np.testing.assert_allclose(det2.predict_logits(only_two).numpy(), ref_kl_matching(only_two[:2], only_two),
                               rtol=1e-5, atol=1e-6)


def test_entropy_matches_reference(data):
    np.testing.assert_allclose(Entropy().predict_logits(data["test"]).double().numpy(), ref_entropy(data["test"]),
                               rtol=1e-5, atol=1e-6)
    assert float(Entropy().predict_logits(torch.zeros(1, 8))) == pytest.approx(math.log(8), rel=1e-6)


@pytest.mark.parametrize("gamma,m", [(0.1, None), (0.01, 2), (1.0, 3), (5.0, 1000)])
def test_gen_matches_reference(data, gamma, m):
    got = GEN(gamma=gamma, M=m).predict_logits(data["test"]).double().numpy()
    np.testing.assert_allclose(got, ref_gen(data["test"].double(), gamma, m), rtol=1e-4, atol=1e-7)


def test_gen_keeps_confident_samples_apart_in_float32():
    logits = torch.tensor([[12.0, 0.0, 0.0], [15.0, 0.0, 0.0], [18.0, 1.0, 0.0]])
    got = GEN(gamma=0.1).predict_logits(logits)
    np.testing.assert_allclose(got.double().numpy(), ref_gen(logits.double(), 0.1), rtol=1e-4)
    assert got[0] > got[1] > got[2] > 0
    p = torch.softmax(logits, dim=1)  # the plain float32 formula loses 1 - p_max to rounding
    plain = (p.pow(0.1) * (1 - p).pow(0.1)).sum(dim=1)
    assert not np.allclose(plain.double().numpy(), ref_gen(logits.double(), 0.1), rtol=1e-4)


@pytest.mark.parametrize("tailsize,alpha,euclid_weight", [(20, 2, 1.0), (5, 6, 1.0), (15, 3, 0.5), (30, 1, 0.0)])
def test_openmax_matches_reference(data, tailsize, alpha, euclid_weight):
    det = _fitted("OpenMax", data, tailsize=tailsize, alpha=alpha, euclid_weight=euclid_weight)
    got = det.predict_logits(data["test"]).double().numpy()
    ref = ref_openmax(data["logits"], data["y"], data["test"], tailsize, alpha, euclid_weight)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-6)


def test_weibull_mle_matches_scipy_and_maximises_likelihood():
    rng = np.random.default_rng(0)
    rows = [rng.weibull(2.0, 30) * 3, rng.weibull(0.7, 12) + 0.1, rng.random(20) + 10000.0]
    mask = torch.zeros(3, 30, dtype=torch.bool)
    x = torch.ones(3, 30, dtype=torch.float64)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.from_numpy(r)
        mask[i, : len(r)] = True
    k, scale = weibull_mle(x, mask)
    for i, r in enumerate(rows):
        c, _, s = weibull_min.fit(r, floc=0)
        assert float(k[i]) == pytest.approx(c, rel=1e-4) and float(scale[i]) == pytest.approx(s, rel=1e-4)
        ll = weibull_min.logpdf(r, float(k[i]), scale=float(scale[i])).sum()
        assert ll >= weibull_min.logpdf(r, c, scale=s).sum() - 1e-9  # scipy's optimiser stops a bit short
        for dk in (0.999, 1.001):  # a local maximum of the likelihood in the shape
            assert ll >= weibull_min.logpdf(r, float(k[i]) * dk, scale=float(scale[i])).sum()
    # degenerate rows (a single value, all equal) give a finite step
    k, scale = weibull_mle(torch.tensor([[3.0, 3.0], [5.0, 1.0]], dtype=torch.float64),
                           torch.tensor([[True, True], [True, False]]))
    assert torch.isfinite(k).all() and torch.allclose(scale, torch.tensor([3.0, 5.0], dtype=torch.float64))


def test_weighted_energy_matches_reference(data):
    weights = [0.5, 2.0, 0.0, -1.0, 1.0, 3.0]
    det = WeightedEBO(weights=weights)
    assert det.requires_fit is False
    np.testing.assert_allclose(det.predict_logits(data["test"]).double().numpy(),
                               ref_weighted_energy(data["test"], weights), rtol=1e-5, atol=1e-5)
    fitted = WeightedEBO().fit_logits(data["logits"][:100], data["y"][:100])  # class frequencies
    freq = np.bincount(data["y"][:100].numpy(), minlength=6) / 100
    np.testing.assert_allclose(fitted.weights.numpy(), freq)
    np.testing.assert_allclose(fitted.predict_logits(data["test"]).double().numpy(),
                               ref_weighted_energy(data["test"], freq), rtol=1e-5, atol=1e-5)
    big = torch.tensor([[500.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # exp overflows in a direct float32 sum
    assert float(det.predict_logits(big)) == pytest.approx(-500.0 - math.log(0.5), rel=1e-6)


# -- pytorch-ood 0.4.0 --------------------------------------------------------------------------------
pod = pytest.importorskip("pytorch_ood.detector")


def test_vs_pytorch_ood_temperature_scaling(data):
    ours = _fitted("TemperatureScaling", data)
    theirs = pod.TemperatureScaling(None).fit_logits(data["logits"], data["y"])
    t_theirs = float(theirs.t.detach())
    assert ours.nll <= ref_nll(data["logits"], data["y"], t_theirs) + 1e-7
    with torch.no_grad():
        theirs.t.fill_(ours.t)
        test = data["test"].double()  # float32 rounds confident MSPs to -1: ties in different places
        _agree(ours.predict_logits(test), theirs.predict_logits(test), rtol=1e-5, atol=1e-6)


def test_vs_pytorch_ood_kl_matching(data):
    theirs = pod.KLMatching(None).fit_logits(data["logits"], data["y"])
    _agree(_fitted("KLMatching", data).predict_logits(data["test"]), theirs.predict_logits(data["test"]))


def test_vs_pytorch_ood_entropy(data):
    _agree(Entropy().predict_logits(data["test"]), pod.Entropy(None).predict_logits(data["test"]), atol=1e-5)


@pytest.mark.parametrize("gamma,m", [(0.1, None), (0.5, 3), (2.0, 100)])
def test_vs_pytorch_ood_gen(data, gamma, m):
    test = data["test"] * 0.5  # keep every p above pytorch-ood's clamp at 1e-7
    assert torch.softmax(test, dim=1).min() > 1e-7
    theirs = pod.GEN(None, gamma=gamma, M=m).predict_logits(test)
    m_eff = data["n_classes"] if m is None else min(m, data["n_classes"])
    _agree(GEN(gamma=gamma, M=m).predict_logits(test), theirs, scale=m_eff, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1, 3, 6])
def test_vs_pytorch_ood_openmax_and_batch_dependence(data, alpha):
    ours = _fitted("OpenMax", data, tailsize=20, alpha=alpha)
    keep = data["logits"].argmax(dim=1) == data["y"]  # theirs fits on every sample: give it the correct ones
    theirs = pod.OpenMax(None, tailsize=20, alpha=alpha).fit_logits(data["logits"][keep], data["y"][keep])
    test = data["test"]
    assert set(test.argmax(dim=1).tolist()) == set(range(data["n_classes"]))  # every class a top prediction
    _agree(ours.predict_logits(test), theirs.predict_logits(test), rtol=5e-3, atol=1e-6)
    single_ours = torch.cat([ours.predict_logits(test[i : i + 1]) for i in range(40)])
    torch.testing.assert_close(single_ours, ours.predict_logits(test)[:40])
    if alpha > 1:  # theirs: a sample scored alone gets other scores than in the batch
        single_theirs = torch.cat([theirs.predict_logits(test[i : i + 1]) for i in range(40)])
        assert (single_theirs - theirs.predict_logits(test)[:40]).abs().max() > 1e-3


def test_vs_pytorch_ood_weighted_energy(data):
    weights = torch.tensor([0.5, 2.0, 0.1, 1.0, 1.0, 3.0])
    _agree(WeightedEBO(weights=weights).predict_logits(data["test"]),
           pod.WeightedEBO(None, weights).predict_logits(data["test"]), rtol=1e-5)


# -- batch independence, robustness, errors ------------------------------------------------------------
def test_batch_independence(data):
    test = data["test"][::6]
    for name in NAMES:
        det = _fitted(name, data)
        batch = det.predict_logits(test)
        single = torch.cat([det.predict_logits(test[i : i + 1]) for i in range(len(test))])
        assert batch.shape == (len(test),)
        torch.testing.assert_close(single, batch, rtol=1e-5, atol=1e-6, msg=name)
        assert det.predict_logits(test[:0]).shape == (0,)


@pytest.mark.parametrize("case", ["constant", "duplicated", "huge", "one_class", "float64"])
def test_robust_inputs_give_finite_scores(case):
    g = torch.Generator().manual_seed(3)
    y = torch.arange(60) % 4
    logits = {
        "constant": torch.full((60, 4), 2.0),
        "duplicated": torch.randn(6, 4, generator=g).repeat(10, 1),
        "huge": torch.randn(60, 4, generator=g) * 1e4,
        "one_class": torch.randn(60, 4, generator=g) + torch.tensor([9.0, 0, 0, 0]),
        "float64": torch.randn(60, 4, generator=g, dtype=torch.float64),
    }[case]
    if case == "duplicated":
        y = logits.argmax(dim=1)
    test = torch.cat([logits[:5], torch.randn(5, 4, generator=g, dtype=logits.dtype) * 50])
    for det in (TemperatureScaling(), KLMatching(), Entropy(), GEN(gamma=0.01, M=2), OpenMax(tailsize=5, alpha=2),
                OpenMax(euclid_weight=0.0), WeightedEBO()):
        det.fit_logits(logits, y)
        s = det.predict_logits(test)
        assert s.shape == (10,) and torch.isfinite(s).all() and s.dtype == logits.dtype, (case, type(det).__name__)


@pytest.mark.parametrize("name", ["TemperatureScaling", "KLMatching", "OpenMax", "WeightedEBO"])
def test_predict_before_fit_raises(name, data):
    det = {"TemperatureScaling": TemperatureScaling, "KLMatching": KLMatching, "OpenMax": OpenMax,
           "WeightedEBO": WeightedEBO}[name]()
    with pytest.raises(RequiresFitException, match=name):
        det.predict_logits(data["test"])


def test_invalid_inputs_raise(data):
    bad = data["test"].clone()
    bad[3, 2] = float("nan")
    inf = data["test"].clone()
    inf[0, 0] = float("inf")
    for name in NAMES:
        det = _fitted(name, data)
        for x in (bad, inf, data["test"][0], data["test"][None]):
            with pytest.raises(InvalidInputError, match=name):
                det.predict_logits(x)
        if name not in ("Entropy", "GEN", "TemperatureScaling"):  # fitted on C classes: other C is an error
            with pytest.raises(InvalidInputError, match="classes"):
                det.predict_logits(data["test"][:, :4])
    for cls in (TemperatureScaling, OpenMax, WeightedEBO):
        name = cls.__name__
        with pytest.raises(InvalidInputError, match=f"{name}.*NaN"):
            cls().fit_logits(bad, torch.zeros(len(bad), dtype=torch.long))
        with pytest.raises(InvalidInputError, match=f"{name}: labels must be < the number of classes"):
            cls().fit_logits(data["logits"], data["y"] + 1)
        with pytest.raises(InvalidInputError, match=f"{name}: no in-distribution"):
            cls().fit_logits(data["logits"], -torch.ones(len(data["y"]), dtype=torch.long))
        with pytest.raises(InvalidInputError, match=f"{name}: labels must have shape"):
            cls().fit_logits(data["logits"], data["y"][:5])


def test_parameter_errors():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="GEN: gamma"):
            GEN(gamma=bad)
    with pytest.raises(ValueError, match="GEN: M"):
        GEN(M=0)
    with pytest.raises(ValueError, match="OpenMax: tailsize"):
        OpenMax(tailsize=0)
    with pytest.raises(ValueError, match="OpenMax: alpha"):
        OpenMax(alpha=1.5)
    with pytest.raises(ValueError, match="OpenMax: euclid_weight"):
        OpenMax(euclid_weight=2.0)
    for bad in ([0.0, -1.0], [float("nan"), 1.0], []):
        with pytest.raises(ValueError, match="WeightedEBO: weights"):
            WeightedEBO(weights=bad)


def test_fit_with_model_and_loader_and_device_moves(data):
    model = torch.nn.Identity()
    loader = [(data["logits"][i : i + 100], data["y"][i : i + 100]) for i in range(0, len(data["y"]), 100)]
    for name in NAMES:
        direct = _fitted(name, data)
        det = type(direct)(model)
        assert det.fit(loader) is det
        torch.testing.assert_close(det.predict(data["test"]), direct.predict_logits(data["test"]), msg=name)
        meta = copy.deepcopy(det).to("meta")
        for key, value in vars(meta).items():
            if isinstance(value, torch.Tensor):
                assert value.device.type == "meta", (name, key)
    # OOD rows (label < 0) are ignored in fit
    logits = torch.cat([data["logits"], data["test"][120:]])
    y = torch.cat([data["y"], -torch.ones(120, dtype=torch.long)])
    for name in NAMES:
        det = type(_fitted(name, data))().fit_logits(logits, y)
        torch.testing.assert_close(det.predict_logits(data["test"]), _fitted(name, data).predict_logits(data["test"]))
