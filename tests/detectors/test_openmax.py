"""OpenMax and its Weibull fit: a loop reference (scipy's Weibull MLE), pytorch-ood 0.4.0, the contract.

pytorch-ood agrees up to the Weibull fit (their scipy optimiser vs our exact MLE) when the batch holds every
class as a top prediction; their scores change with the batch, ours do not.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr, weibull_min

from ood_core.api import InvalidInputError
from ood_core.constraints import ParameterError
from ood_core.detectors import OpenMax
from ood_core.detectors.openmax import weibull_mle

pod = pytest.importorskip("pytorch_ood.detector")


def _softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


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


def _agree(ours, theirs, rtol, atol=1e-6):
    ours, theirs = ours.double().numpy(), np.asarray(theirs, np.float64)
    assert spearmanr(ours, theirs).statistic >= 0.999
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol)


# -- references ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tailsize,alpha,euclid_weight", [(20, 2, 1.0), (5, 6, 1.0), (15, 3, 0.5), (30, 1, 0.0)])
def test_openmax_matches_reference(data, tailsize, alpha, euclid_weight):
    det = OpenMax(tailsize=tailsize, alpha=alpha, euclid_weight=euclid_weight).fit_logits(data["logits"], data["y"])
    got = det.predict_logits(data["test"]).double().numpy()
    ref = ref_openmax(data["logits"], data["y"], data["test"], tailsize, alpha, euclid_weight)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-6)


def test_alpha_above_the_class_count_revises_every_class(data):
    big = OpenMax(alpha=50).fit_logits(data["logits"], data["y"])
    all_c = OpenMax(alpha=data["n_classes"]).fit_logits(data["logits"], data["y"])
    torch.testing.assert_close(big.predict_logits(data["test"]), all_c.predict_logits(data["test"]))


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


# -- the contract ---------------------------------------------------------------------------------------
def test_declared_constraints(data):
    for bad in ({"tailsize": 0}, {"alpha": 1.5}, {"alpha": 0}, {"euclid_weight": 2.0}, {"euclid_weight": -0.1}):
        with pytest.raises(ParameterError, match=f"OpenMax: {next(iter(bad))}="):
            OpenMax(**bad)
    as_floats = OpenMax(tailsize=20.0, alpha=3.0).fit_logits(data["logits"], data["y"])  # integral floats (YAML)
    as_ints = OpenMax(tailsize=20, alpha=3).fit_logits(data["logits"], data["y"])
    torch.testing.assert_close(as_floats.predict_logits(data["test"]), as_ints.predict_logits(data["test"]))
    decl = OpenMax.parameter_constraints
    assert decl["tailsize"].structural and decl["euclid_weight"].structural and not decl["alpha"].structural
    with pytest.raises(InvalidInputError, match="OpenMax: labels must be smaller than the number of classes C=6"):
        OpenMax().fit_logits(data["logits"], data["y"] + 1)


def test_search_space_adapts_alpha_to_the_class_count():
    assert OpenMax.search_space() == {"tailsize": {"grid": [10, 20, 50, 100]}, "alpha": {"grid": [1, 2, 3, 5, 10]}}
    assert OpenMax.search_space({"C": 1000}) == OpenMax.search_space()
    assert OpenMax.search_space({"C": 4})["alpha"] == {"grid": [1, 2, 3]}


# -- pytorch-ood 0.4.0 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1, 3, 6])
def test_vs_pytorch_ood_and_batch_dependence(data, alpha):
    ours = OpenMax(tailsize=20, alpha=alpha).fit_logits(data["logits"], data["y"])
    keep = data["logits"].argmax(dim=1) == data["y"]  # theirs fits on every sample: give it the correct ones
    theirs = pod.OpenMax(None, tailsize=20, alpha=alpha).fit_logits(data["logits"][keep], data["y"][keep])
    test = data["test"]
    assert set(test.argmax(dim=1).tolist()) == set(range(data["n_classes"]))  # every class a top prediction
    _agree(ours.predict_logits(test), theirs.predict_logits(test), rtol=5e-3)
    single_ours = torch.cat([ours.predict_logits(test[i : i + 1]) for i in range(40)])
    torch.testing.assert_close(single_ours, ours.predict_logits(test)[:40])
    if alpha > 1:  # theirs: a sample scored alone gets other scores than in the batch
        single_theirs = torch.cat([theirs.predict_logits(test[i : i + 1]) for i in range(40)])
        assert (single_theirs - theirs.predict_logits(test)[:40]).abs().max() > 1e-3


@pytest.mark.parametrize("args,kwargs", [((20, 3, 0.5), {}), ((), {"tailsize": 15, "alpha": 2, "euclid_weight": 1.0})])
def test_built_the_pytorch_ood_way(data, args, kwargs):
    """``OpenMax(model, tailsize, alpha, euclid_weight)`` as a pytorch-ood user writes it, fitted with ``fit``."""
    model = torch.nn.Identity()
    keep = data["logits"].argmax(dim=1) == data["y"]
    loader = [(data["logits"][keep][i : i + 100], data["y"][keep][i : i + 100]) for i in range(0, int(keep.sum()), 100)]
    ours, theirs = OpenMax(model, *args, **kwargs), pod.OpenMax(model, *args, **kwargs)
    assert ours.fit(loader) is ours
    theirs.fit(loader)
    _agree(ours.predict(data["test"]), theirs.predict(data["test"]), rtol=1e-2)  # up to the Weibull fits


# -- robustness ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["constant", "duplicated", "huge", "one_class", "float64", "none_correct"])
def test_robust_inputs_give_finite_scores(case):
    g = torch.Generator().manual_seed(3)
    y = torch.arange(60) % 4
    logits = {
        "constant": torch.full((60, 4), 2.0),
        "duplicated": torch.randn(6, 4, generator=g).repeat(10, 1),
        "huge": torch.randn(60, 4, generator=g) * 1e4,
        "one_class": torch.randn(60, 4, generator=g) + torch.tensor([9.0, 0, 0, 0]),
        "float64": torch.randn(60, 4, generator=g, dtype=torch.float64),
        "none_correct": torch.nn.functional.one_hot((y + 1) % 4, 4).float(),
    }[case]
    if case == "duplicated":
        y = logits.argmax(dim=1)
    test = torch.cat([logits[:5], torch.randn(5, 4, generator=g, dtype=logits.dtype) * 50])
    for det in (OpenMax(tailsize=5, alpha=2), OpenMax(euclid_weight=0.0)):
        s = det.fit_logits(logits, y).predict_logits(test)
        assert s.shape == (10,) and torch.isfinite(s).all() and s.dtype == logits.dtype, case


def test_ood_rows_are_ignored_in_fit(data):
    logits = torch.cat([data["logits"], data["test"][120:]])
    y = torch.cat([data["y"], -torch.ones(120, dtype=torch.long)])
    torch.testing.assert_close(OpenMax().fit_logits(logits, y).predict_logits(data["test"]),
                               OpenMax().fit_logits(data["logits"], data["y"]).predict_logits(data["test"]))
