"""DICE vs a plainly written reference (numpy float64) and vs pytorch-ood 0.4.0; its constructor (pytorch-ood's
positional order and names, ``p`` in percent) and its scoring functions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

from ood_core.api import DetectorError, RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import DICE, EnergyBased, MaxLogit

from .agreement import agree as _agree


def ref_dice(z, w, b, test, p):
    w = np.asarray(w, np.float64)
    contrib = np.asarray(z, np.float64).mean(axis=0)[None, :] * w
    masked = np.where(contrib > np.percentile(contrib, p), w, 0.0)
    return np.array([-logsumexp(masked @ x + np.asarray(b, np.float64)) for x in np.asarray(test, np.float64)])


# -- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 10, 50, 90, 99.5])
def test_matches_reference(data, p):
    det = DICE(head=(data["w"], data["b"]), p=p).fit_features(data["z"], data["y"])
    kept = float((det.masked_w != 0).float().mean())
    assert kept == pytest.approx(1 - p / 100, abs=0.01)
    np.testing.assert_allclose(det.predict_features(data["z_test"]).double().numpy(),
                               ref_dice(data["z"], data["w"], data["b"], data["z_test"], p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [0.9, 0.5, 1, 1.0])
def test_fractions_are_refused_with_the_hint(data, value):
    with pytest.raises(ParameterError, match=rf"DICE: p={value!r} must be in \(1, 100\); it is in percent: "
                                             r"write p=90 .*\(pytorch-ood's p=0.9\)"):
        DICE(head=data["lin"], p=value)


def test_other_parameter_errors(data):
    with pytest.raises(ParameterError, match=r"DICE: p=100 must be in \(1, 100\)"):  # drops every weight
        DICE(head=data["lin"], p=100)
    with pytest.raises(ParameterError, match=r"DICE: p=-5 must be in"):
        DICE(head=data["lin"], p=-5)
    with pytest.raises(ParameterError, match=r"DICE: detector='entropy' must be one of 'energy', 'msp', 'maxlogit'"):
        DICE(head=data["lin"], detector="entropy")
    with pytest.raises(ValueError, match="DICE: give head= or w= / b=, not both"):
        DICE(head=data["lin"], w=data["w"], b=data["b"])
    with pytest.raises(DetectorError, match="DICE: needs the classifier head"):
        DICE().fit_features(data["z"], data["y"])
    with pytest.raises(RequiresFitException, match="DICE"):
        DICE(head=data["lin"]).predict_features(data["z_test"])


def test_pytorch_ood_signature(data):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.DICE(None, data["w"], data["b"], 0.7, pod.MaxLogit.score).fit_features(data["z"], data["y"])
    want = theirs.predict_features(data["z_test"])
    for ours in (DICE(None, data["w"], data["b"], 70, pod.MaxLogit.score),
                 DICE(encoder=None, w=data["w"], b=data["b"], p=70, detector=MaxLogit.score),
                 DICE(None, p=70, detector="maxlogit", head=data["lin"])):
        ours.fit_features(data["z"], data["y"])
        assert ours.threshold == pytest.approx(theirs.threshold, rel=1e-5, abs=1e-7)
        _agree(ours.predict_features(data["z_test"]), want)
    det = DICE(nn.Identity(), data["w"], data["b"], 70, "maxlogit")  # OOD rows (label -1): ignored
    det.fit([(data["z"], data["y"]), (10 * data["z"][:50], -torch.ones(50, dtype=torch.long))])
    _agree(det.predict(data["z_test"]), want)


@pytest.mark.parametrize("p", [0, 10, 50, 90])
def test_vs_pytorch_ood(data, p):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.DICE(None, w=data["w"], b=data["b"], p=p / 100).fit_features(data["z"], data["y"])
    ours = DICE(w=data["w"], b=data["b"], p=p).fit_features(data["z"], data["y"])
    assert ours.threshold == pytest.approx(theirs.threshold, rel=1e-5, abs=1e-7)
    _agree(ours.predict_features(data["z_test"]), theirs.predict_features(data["z_test"]))


def test_scoring_functions(data):
    det = DICE(head=data["lin"], p=50).fit_features(data["z"], data["y"])
    logits = data["z_test"] @ det.masked_w.T + data["b"]
    torch.testing.assert_close(det.predict_features(data["z_test"]), EnergyBased.score(logits))
    det.detector = EnergyBased(t=2.0)  # only the scoring changes: no refit
    torch.testing.assert_close(det.predict_features(data["z_test"]), EnergyBased.score(logits, 2.0))


def test_robust_inputs_give_finite_scores():
    g = torch.Generator().manual_seed(4)
    head = (torch.randn(3, 16, generator=g), torch.randn(3, generator=g))
    test = 100 * torch.randn(5, 16, generator=g)
    for z in (torch.full((60, 16), 1.5), torch.zeros(60, 16), torch.randn(10, 16, generator=g).repeat(6, 1)):
        s = DICE(head=head, p=50).fit_features(z, torch.arange(60) % 3).predict_features(torch.cat([z[:5], test]))
        assert s.shape == (10,) and torch.isfinite(s).all()


def test_declared_contract():
    decl = DICE.parameter_constraints
    assert list(decl) == ["p", "detector"] and decl["p"].structural and not decl["detector"].structural
    assert DICE.representation == "features" and DICE.needs_head
    assert DICE.search_space({"D": 48, "C": 6, "N": 900}) == {"p": {"grid": [10, 30, 50, 70, 90]}}
