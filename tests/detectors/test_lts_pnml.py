"""LTS and PNML vs plainly written references (numpy float64, loops) and pytorch-ood 0.4.0 on the same inputs.

Agreement with pytorch-ood: LTS (``p = 1 - percentile / 100``) equal scores; PNML equal scores on
well-conditioned features (N >> D), Spearman 1.0.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ood_core.constraints import ParameterError
from ood_core.detectors import LTS, PNML, build_detector, fit_detector, score_detector

from .agreement import agree


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300, 24, generator=g) + 0.2
    fc = nn.Linear(24, 6)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(6, 24, generator=g) / 4)
        fc.bias.copy_(torch.randn(6, generator=g) / 4)
    return {"z": z, "y": torch.arange(300) % 6, "fc": fc, "w": fc.weight.detach().double().numpy(),
            "b": fc.bias.detach().double().numpy()}


# -- references ------------------------------------------------------------------------------------------
def ref_lts(z, w, b, percentile):
    """The official lts.py: relu, s1 / (sum of the top k), squared; logits times it; energy (negated)."""
    out = []
    for row in np.asarray(z, np.float64):
        a = [max(0.0, v) for v in row]
        n = len(a)
        k = max(1, n - int(round(n * percentile / 100.0)))
        s1, s2 = sum(a), sum(sorted(a, reverse=True)[:k])
        scale = (s1 / s2) ** 2 if s2 else 1.0
        logits = [scale * (sum(w[c][j] * row[j] for j in range(n)) + b[c]) for c in range(len(b))]
        m = max(logits)
        out.append(-(m + math.log(sum(math.exp(v - m) for v in logits))))
    return np.array(out)


def ref_pnml(train, test, w, b):
    """The official baseline_lit_utils.calc_regrets: unit features, pinv(X^T X), |x G x|, regret / log C."""
    x = np.asarray(train, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    g = np.linalg.pinv(x.T @ x)
    out = []
    for row in np.asarray(test, np.float64):
        v = row / np.linalg.norm(row)
        proj = abs(v @ g @ v)
        xtg = proj / (1 + proj)
        logits = w @ v + b
        p = np.exp(logits - logits.max())
        p /= p.sum()
        nf = sum(pc / (pc + (1 - pc) * pc ** xtg) for pc in p)
        out.append(math.log(nf) / math.log(len(p)))
    return np.array(out)


# -- LTS ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("percentile", [65, 95, 99])
def test_lts_matches_the_official_formula(data, percentile):
    ours = LTS(head=data["fc"], percentile=percentile).predict_features(data["z"][:40])
    np.testing.assert_allclose(ours.double().numpy(), ref_lts(data["z"][:40], data["w"], data["b"], percentile),
                               rtol=1e-5, atol=1e-5)


def test_lts_features_without_positive_activation_score_as_unscaled_logits(data):
    z = -data["z"].abs()[:5]
    ours = LTS(head=data["fc"]).predict_features(z)
    plain = -torch.logsumexp(data["fc"](z), dim=1).detach()
    torch.testing.assert_close(ours, plain)


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_lts_vs_pytorch_ood(data, p):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.LTS(None, data["fc"], p=p).predict_features(data["z"])
    agree(LTS(head=data["fc"], percentile=100 * (1 - p)).predict_features(data["z"]), theirs)


def test_lts_refuses_a_fraction_for_percentile(data):
    with pytest.raises(ParameterError, match=r"LTS: percentile=0.05 .*in percent"):
        LTS(head=data["fc"], percentile=0.05)


def test_lts_through_the_registry_needs_no_fit(data):
    det = build_detector("LTS", {"percentile": 90}, head=(data["fc"].weight, data["fc"].bias))
    assert not det.requires_fit
    fit_detector(det, {"features": data["z"]}, data["y"])
    scores = score_detector(det, {"features": data["z"][:10]})
    np.testing.assert_allclose(scores.double().numpy(), ref_lts(data["z"][:10], data["w"], data["b"], 90),
                               rtol=1e-5, atol=1e-5)


# -- PNML --------------------------------------------------------------------------------------------------
def test_pnml_matches_the_official_formula(data):
    det = PNML(head=data["fc"], eps=0.0).fit_features(data["z"], data["y"])
    test = torch.cat([data["z"][:20], 3 * torch.rand(20, 24, generator=torch.Generator().manual_seed(1))])
    np.testing.assert_allclose(det.predict_features(test).double().numpy(),
                               ref_pnml(data["z"], test, data["w"], data["b"]), rtol=1e-5, atol=1e-6)


def test_pnml_is_a_normalised_regret(data):
    det = PNML(head=data["fc"]).fit_features(data["z"], data["y"])
    s = det.predict_features(torch.randn(50, 24))
    assert bool(((s >= 0) & (s <= 1 + 1e-6)).all())
    # the pseudo-inverse is zero off the span of the training features: a sample there has g = 0 and regret 0,
    # as in the official code and pytorch-ood (the paper assumes X^T X invertible)
    z = torch.zeros(30, 24)
    z[:, :12] = data["z"][:30, :12]
    det = PNML(head=data["fc"]).fit_features(z, data["y"][:30])
    off = torch.zeros(1, 24)
    off[0, 20] = 1.0
    assert float(det.predict_features(off)) == pytest.approx(0.0, abs=1e-9)
    assert float(det.predict_features(z[:1])) > 0.01


def test_pnml_vs_pytorch_ood(data):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.PNML(None, data["fc"]).fit_features(data["z"], data["y"])
    ours = PNML(head=data["fc"]).fit_features(data["z"], data["y"])
    test = torch.cat([data["z"][:50], torch.randn(50, 24)])
    agree(ours.predict_features(test), theirs.predict_features(test), rtol=1e-4, atol=1e-5)


def test_pnml_constraints(data):
    with pytest.raises(ParameterError, match="PNML: eps="):
        PNML(head=data["fc"], eps=0.7)
    det = PNML(encoder=None, head=data["fc"], eps=1e-6)  # pytorch-ood's keyword names
    assert det.eps == 1e-6
