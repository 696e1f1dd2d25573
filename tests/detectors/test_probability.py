"""TemperatureScaling, KLMatching, Entropy, GEN, WeightedEBO: plain references, pytorch-ood 0.4.0, contract.

Agreement with pytorch-ood (Spearman >= 0.999 everywhere):

* KLMatching, WeightedEBO: equal.
* Entropy: equal up to pytorch-ood's clipping of p at 1e-7 (atol 1e-5).
* GEN: ours (sum over the top M) == min(M, C) * theirs (mean over the top M).
* TemperatureScaling: equal scores at the same T; our fitted T has an NLL <= theirs (they stop
  after 50 small L-BFGS steps).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ood_core.api import InvalidInputError
from ood_core.constraints import ParameterError
from ood_core.detectors import GEN, Entropy, KLMatching, TemperatureScaling, WeightedEBO

pod = pytest.importorskip("pytorch_ood.detector")
SPEARMAN_MIN = 0.999
CLASSES = {"TemperatureScaling": TemperatureScaling, "KLMatching": KLMatching, "Entropy": Entropy, "GEN": GEN,
           "WeightedEBO": WeightedEBO}


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


def _fitted(name, data, **kw):
    return CLASSES[name](**kw).fit_logits(data["logits"], data["y"])


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
    sharp = TemperatureScaling().fit_logits(separable, y)  # NLL falls towards 0 as T -> 0: the lower bound
    assert sharp.t == pytest.approx(TemperatureScaling.T_MIN) and sharp.nll < 1e-6
    flat = TemperatureScaling().fit_logits(torch.zeros(40, 4), y)
    assert flat.t == 1.0  # NLL = log C for every T: stays at the start
    wrong = TemperatureScaling().fit_logits(separable.roll(1, dims=1), y)  # always wrong: NLL falls as T grows
    assert wrong.t == pytest.approx(TemperatureScaling.T_MAX)
    with torch.inference_mode():  # fitting works under inference mode too
        assert TemperatureScaling().fit_logits(separable + torch.randn(40, 4), y).t > 0


def test_kl_matching_matches_reference(data):
    det = _fitted("KLMatching", data)
    np.testing.assert_allclose(det.predict_logits(data["test"]).double().numpy(),
                               ref_kl_matching(data["logits"], data["test"]), rtol=1e-4, atol=1e-6)
    # only the predicted classes of the fit data get a template; labels play no role but < 0 drops rows
    only_two = torch.tensor([[5.0, 0, 0], [0, 4.0, 0], [6.0, 1, 0]])
    det2 = KLMatching().fit_logits(only_two, torch.tensor([2, 2, -1]))
    assert det2.template_classes.tolist() == [0, 1] and det2.templates.dtype == torch.float64
    np.testing.assert_allclose(det2.predict_logits(only_two).numpy(), ref_kl_matching(only_two[:2], only_two),
                               rtol=1e-5, atol=1e-6)
    assert torch.isfinite(det2.predict_logits(torch.tensor([[0.0, 0.0, 90.0]]))).all()  # template entry ~ 0


def test_entropy_matches_reference(data):
    np.testing.assert_allclose(Entropy().predict_logits(data["test"]).double().numpy(), ref_entropy(data["test"]),
                               rtol=1e-5, atol=1e-6)
    assert float(Entropy().predict_logits(torch.zeros(1, 8))) == pytest.approx(math.log(8), rel=1e-6)


@pytest.mark.parametrize("gamma,m", [(0.1, None), (0.01, 2), (1.0, 3), (5.0, 6)])
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


def test_weighted_energy_matches_reference(data):
    weights = [0.5, 2.0, 0.0, -1.0, 1.0, 3.0]
    det = WeightedEBO(weights=weights)
    np.testing.assert_allclose(det.predict_logits(data["test"]).double().numpy(),  # no fit needed
                               ref_weighted_energy(data["test"], weights), rtol=1e-5, atol=1e-5)
    fitted = WeightedEBO().fit_logits(data["logits"][:100], data["y"][:100])  # class frequencies
    freq = np.bincount(data["y"][:100].numpy(), minlength=6) / 100
    np.testing.assert_allclose(fitted.class_weights.numpy(), freq)
    assert fitted.get_params() == {"weights": None}
    np.testing.assert_allclose(fitted.predict_logits(data["test"]).double().numpy(),
                               ref_weighted_energy(data["test"], freq), rtol=1e-5, atol=1e-5)
    big = torch.tensor([[500.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # exp overflows in a direct float32 sum
    assert float(det.predict_logits(big)) == pytest.approx(-500.0 - math.log(0.5), rel=1e-6)


# -- the contract: declared constraints, data-relative bounds, search spaces ------------------------------
def test_gen_m_beyond_the_class_count_is_refused(data):
    with pytest.raises(ParameterError, match=r"GEN: M=7 must be in \[1, C=6\]"):
        GEN(M=7).fit_logits(data["logits"], data["y"])
    with pytest.raises(ParameterError, match=r"GEN: M=1000 must be in \[1, C=6\]"):
        GEN(M=1000).predict_logits(data["test"])  # also without a fit
    for bad in ({"gamma": 0}, {"gamma": -1.0}, {"gamma": float("nan")}, {"M": 0}, {"M": 2.5}):
        with pytest.raises(ParameterError, match=f"GEN: {next(iter(bad))}="):
            GEN(**bad)
    # an integral float (as YAML may give it) is an integer
    torch.testing.assert_close(GEN(M=3.0).predict_logits(data["test"]), GEN(M=3).predict_logits(data["test"]))
    # the static score (pytorch-ood's) takes M > C as C, like theirs
    torch.testing.assert_close(GEN.score(data["test"], 0.5, 1000), GEN.score(data["test"], 0.5, None))


def test_gen_search_space_adapts_to_the_class_count():
    gamma = {"grid": [0.01, 0.1, 0.5, 1, 2, 5, 10]}
    assert GEN.search_space() == {"gamma": gamma, "M": {"grid": [10, 50, 100, 200, 500, 1000]}}
    assert GEN.search_space({"C": 1000}) == GEN.search_space()
    assert GEN.search_space({"C": 150, "D": 150})["M"] == {"grid": [10, 50, 100]}
    assert GEN.search_space({"C": 10})["M"] == {"grid": [10]}
    assert GEN.search_space({"C": 6}) == {"gamma": gamma, "M": {"grid": [6]}}  # none fits: M = C
    assert not any(p.structural for p in GEN.parameter_constraints.values())


def test_weighted_ebo_weights_are_checked(data):
    for bad in ([0.0, -1.0], [float("nan"), 1.0], [], [[1.0, 2.0], [3.0, 4.0]], "abc"):
        with pytest.raises(ParameterError, match="WeightedEBO: weights="):
            WeightedEBO(weights=bad)
    with pytest.raises(ParameterError, match="WeightedEBO: weights=.*must have C=6 entries"):
        WeightedEBO(weights=[1.0, 2.0]).fit_logits(data["logits"], data["y"])
    with pytest.raises(ParameterError, match="must have C=6 entries"):
        WeightedEBO(weights=[1.0, 2.0]).predict_logits(data["test"])  # also without a fit


def test_labels_must_index_a_logit(data):
    for cls in (TemperatureScaling, WeightedEBO, KLMatching):  # checked once, in the base class
        with pytest.raises(InvalidInputError, match=f"{cls.__name__}: labels must be smaller than the number of classes C=6"):
            cls().fit_logits(data["logits"], data["y"] + 1)


# -- pytorch-ood 0.4.0 --------------------------------------------------------------------------------
def test_vs_pytorch_ood_temperature_scaling(data):
    ours = _fitted("TemperatureScaling", data)
    theirs = pod.TemperatureScaling(None).fit_logits(data["logits"], data["y"])
    assert ours.nll <= ref_nll(data["logits"], data["y"], float(theirs.t.detach())) + 1e-7
    with torch.no_grad():
        theirs.t.fill_(ours.t)
        test = data["test"].double()  # float32 rounds confident MSPs to -1: ties in different places
        _agree(ours.predict_logits(test), theirs.predict_logits(test), rtol=1e-5, atol=1e-6)


def test_vs_pytorch_ood_kl_matching(data):
    theirs = pod.KLMatching(None).fit_logits(data["logits"], data["y"])
    _agree(_fitted("KLMatching", data).predict_logits(data["test"]), theirs.predict_logits(data["test"]))


def test_vs_pytorch_ood_entropy(data):
    _agree(Entropy().predict_logits(data["test"]), pod.Entropy(None).predict_logits(data["test"]), atol=1e-5)
    _agree(Entropy.score(data["test"]), pod.Entropy.score(data["test"]), atol=1e-5)


@pytest.mark.parametrize("gamma,m", [(0.1, None), (0.5, 3), (2.0, 6)])
def test_vs_pytorch_ood_gen(data, gamma, m):
    test = data["test"] * 0.5  # keep every p above pytorch-ood's clamp at 1e-7
    assert torch.softmax(test, dim=1).min() > 1e-7
    theirs = pod.GEN(None, gamma=gamma, M=m).predict_logits(test)
    m_eff = data["n_classes"] if m is None else m
    _agree(GEN(gamma=gamma, M=m).predict_logits(test), theirs, scale=m_eff, rtol=1e-4)


def test_vs_pytorch_ood_weighted_energy(data):
    weights = torch.tensor([0.5, 2.0, 0.1, 1.0, 1.0, 3.0])
    _agree(WeightedEBO(weights=weights).predict_logits(data["test"]),
           pod.WeightedEBO(None, weights).predict_logits(data["test"]), rtol=1e-5)
    _agree(WeightedEBO.score(data["test"], weights), pod.WeightedEBO.score(data["test"], weights), rtol=1e-5)


@pytest.mark.parametrize("name,kwargs", [("Entropy", {}), ("GEN", {"gamma": 0.5, "M": 3}),
                                         ("WeightedEBO", {"weights": torch.tensor([0.5, 2.0, 0.1, 1.0, 1.0, 3.0])})])
def test_static_score_functions_match_pytorch_ood(data, name, kwargs):
    """pytorch-ood's static ``score`` names and signatures, also on segmentation logits (B, C, H, W)."""
    seg = data["test"][:48].reshape(2, 4, 6, 6).permute(0, 3, 1, 2) * 0.5  # (B, C, H, W), p above their clamp
    scale = 3.0 if name == "GEN" else 1.0
    for x in (data["test"] * 0.5, seg):
        ours, theirs = CLASSES[name].score(x, **kwargs), getattr(pod, name).score(x, **kwargs)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.numpy(), scale * theirs.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,args,kwargs", [
    ("TemperatureScaling", (), {}), ("KLMatching", (), {}), ("Entropy", (), {}),
    ("GEN", (0.5, 3), {}), ("GEN", (), {"gamma": 2.0, "M": 4}), ("GEN", (0.1,), {}),
    ("WeightedEBO", ("linear-weight",), {}),
])
def test_built_the_pytorch_ood_way(data, name, args, kwargs):
    """``Cls(model, *args, **kwargs)`` as a pytorch-ood user writes it (WeightedEBO with a ``Linear(C, 1)``'s
    weight), fitted through ``fit`` on a loader where needed: the same scores through ``predict``."""
    model = torch.nn.Identity()
    if args == ("linear-weight",):
        args = (torch.nn.Linear(data["n_classes"], 1).weight.detach().abs() + 0.1,)
    ours, theirs = CLASSES[name](model, *args, **kwargs), getattr(pod, name)(model, *args, **kwargs)
    loader = [(data["logits"][i : i + 100], data["y"][i : i + 100]) for i in range(0, len(data["y"]), 100)]
    if name in ("TemperatureScaling", "KLMatching"):
        assert ours.fit(loader) is ours
        theirs.fit(loader)
    if name == "TemperatureScaling":
        with torch.no_grad():
            theirs.t.fill_(ours.t)  # theirs stops short of the optimum
    test = data["test"] * 0.5  # GEN: every p above pytorch-ood's clamp
    scale = (ours.M or data["n_classes"]) if name == "GEN" else 1.0
    _agree(ours.predict(test), theirs.predict(test).detach(), scale=scale, rtol=1e-4)


# -- robustness, fitting ------------------------------------------------------------------------------------
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
    for det in (TemperatureScaling(), KLMatching(), Entropy(), GEN(gamma=0.01, M=2), WeightedEBO()):
        det.fit_logits(logits, y)
        s = det.predict_logits(test)
        assert s.shape == (10,) and torch.isfinite(s).all() and s.dtype == logits.dtype, (case, type(det).__name__)


def test_ood_rows_are_ignored_in_fit(data):
    logits = torch.cat([data["logits"], data["test"][120:]])
    y = torch.cat([data["y"], -torch.ones(120, dtype=torch.long)])
    for name in ("TemperatureScaling", "KLMatching", "WeightedEBO"):
        det = CLASSES[name]().fit_logits(logits, y)
        torch.testing.assert_close(det.predict_logits(data["test"]), _fitted(name, data).predict_logits(data["test"]))
