"""ReAct vs a plainly written reference (numpy float64, loops) and vs pytorch-ood 0.4.0; its constructor
(pytorch-ood's positional order and names, percent units), threshold semantics and scoring functions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ood_core.api import RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import EnergyBased, MaxLogit, MaxSoftmax, ReAct

from .agreement import agree as _agree


# -- references (loops, numpy float64) -------------------------------------------------------------
def ref_msp(logits):
    out = []
    for row in np.asarray(logits, dtype=np.float64):
        m = max(row)
        out.append(-1.0 / sum(math.exp(v - m) for v in row))
    return np.array(out)


def ref_maxlogit(logits):
    return np.array([-max(row) for row in np.asarray(logits, dtype=np.float64)])


def ref_energy(logits):
    out = []
    for row in np.asarray(logits, dtype=np.float64):
        m = max(row)
        out.append(-(m + math.log(sum(math.exp(v - m) for v in row))))
    return np.array(out)


def ref_react(z_train, w, b, z_test, percentile=None, threshold=None, score="energy"):
    if threshold is None:
        threshold = np.percentile(np.asarray(z_train, np.float64).ravel(), percentile)
    logits = [np.asarray(w, np.float64) @ np.minimum(row, threshold) + np.asarray(b, np.float64)
              for row in np.asarray(z_test, np.float64)]
    return {"energy": ref_energy, "msp": ref_msp, "maxlogit": ref_maxlogit}[score](np.array(logits))


# -- data ---------------------------------------------------------------------------------------------


# -- the formula --------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["energy", "msp", "maxlogit"])
@pytest.mark.parametrize("percentile", [50, 90, 99])
def test_percentile_matches_reference(data, score, percentile):
    det = ReAct(head=(data["w"], data["b"]), percentile=percentile, detector=score).fit_features(data["z"], data["y"])
    assert det.threshold_ == pytest.approx(np.percentile(data["z"].double().numpy().ravel(), percentile), rel=1e-6)
    ref = ref_react(data["z"], data["w"], data["b"], data["z_test"], percentile=percentile, score=score)
    np.testing.assert_allclose(det.predict_features(data["z_test"]).double().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_absolute_threshold_needs_no_fit_and_is_never_overwritten(data):
    det = ReAct(head=data["lin"], threshold=0.5)
    assert det.requires_fit is False and ReAct(head=data["lin"]).requires_fit is True
    ref = ref_react(None, data["w"], data["b"], data["z_test"], threshold=0.5)
    np.testing.assert_allclose(det.predict_features(data["z_test"]).double().numpy(), ref, rtol=1e-5, atol=1e-5)
    det.fit_features(data["z"], data["y"])  # fits threshold_ from percentile; the given threshold stays in use
    assert det.threshold == 0.5 and det.threshold_ != 0.5
    np.testing.assert_allclose(det.predict_features(data["z_test"]).double().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert ReAct(head=data["lin"]).percentile == 90  # the default, pytorch-ood's 0.9


def test_percentile_is_exact_beyond_torch_quantile_size_limit():
    from ood_core.detectors.react import percentile

    g = torch.Generator().manual_seed(7)
    x = torch.relu(torch.randn((1 << 24) + 5, generator=g)).reshape(-1, 1)  # half ties at 0; > 2^24 entries
    for q in (37.3, 90, 100):
        assert percentile(x, q) == pytest.approx(float(np.percentile(x.numpy(), q)), rel=1e-6, abs=1e-12)


def test_predict_before_fit_raises(data):
    with pytest.raises(RequiresFitException, match="ReAct"):
        ReAct(head=data["lin"]).predict_features(data["z_test"])


def test_refit_recomputes_the_threshold(data):
    det = ReAct(head=data["lin"], percentile=90).fit_features(data["z"], data["y"])
    first = det.threshold_
    det.fit_features(2 * data["z"], data["y"])
    assert det.threshold_ == pytest.approx(2 * first, rel=1e-6)


def test_fit_through_the_model_and_ood_labels_ignored(data):
    z, y = data["z"], data["y"]
    direct = ReAct(head=data["lin"]).fit_features(z, y)
    loader = [(z[i:i + 100], y[i:i + 100]) for i in range(0, len(z), 100)]
    loader.append((10 * z[:50], -torch.ones(50, dtype=torch.long)))  # auxiliary outliers: not ID, ignored
    det = ReAct(backbone=nn.Identity(), head=data["lin"]).fit(loader)
    assert det.threshold_ == direct.threshold_
    torch.testing.assert_close(det.predict(data["z_test"]), direct.predict_features(data["z_test"]))


def test_robust_inputs_give_finite_scores():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(3, 16, generator=g), torch.randn(3, generator=g)
    cases = [torch.full((60, 16), 1.5), torch.zeros(60, 16), torch.randn(10, 16, generator=g).repeat(6, 1),
             torch.randn(20, 16, generator=g) * 1e4]
    test = torch.cat([cases[2][:5], 100 * torch.randn(5, 16, generator=g)])
    for z in cases:
        s = ReAct(head=(w, b)).fit_features(z, torch.zeros(len(z), dtype=torch.long)).predict_features(test)
        assert s.shape == (10,) and torch.isfinite(s).all()


# -- constructor: pytorch-ood's order and names, units ----------------------------------------------------
def test_pytorch_ood_positional_signature(data):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.ReAct(nn.Identity(), data["lin"], None, 0.9, pod.EnergyBased.score)
    theirs.fit_feature_maps(data["z"], data["y"])
    ours = ReAct(nn.Identity(), data["lin"], None, 90, pod.EnergyBased.score).fit_features(data["z"], data["y"])
    assert ours.model is not None and ours.threshold_ == pytest.approx(theirs.threshold, rel=1e-6)
    with torch.no_grad():
        _agree(ours.predict(data["z_test"]), theirs.predict(data["z_test"]))
    # keywords: backbone=, head=, threshold=, detector=
    kw = ReAct(backbone=nn.Identity(), head=data["lin"], threshold=0.7, detector=pod.MaxLogit.score)
    them = pod.ReAct(backbone=nn.Identity(), head=data["lin"], threshold=0.7, detector=pod.MaxLogit.score)
    with torch.no_grad():
        _agree(kw.predict(data["z_test"]), them.predict(data["z_test"]))


@pytest.mark.parametrize("value", [0.9, 0.99, 1, 0])
def test_fractions_are_refused_with_the_hint(data, value):
    with pytest.raises(ParameterError, match=rf"ReAct: percentile={value!r} must be in \(1, 100\]; it is in percent: "
                                             r"write percentile=90 for the 90th percentile"):
        ReAct(head=data["lin"], percentile=value)


def test_other_parameter_errors(data):
    with pytest.raises(ParameterError, match=r"ReAct: percentile=150 must be in \(1, 100\]"):
        ReAct(head=data["lin"], percentile=150)
    with pytest.raises(ParameterError, match=r"ReAct: detector='entropy' must be one of 'energy', 'msp', 'maxlogit'"):
        ReAct(head=data["lin"], detector="entropy")
    with pytest.raises(ParameterError, match=r"ReAct: threshold=nan must be a number, got NaN"):
        ReAct(head=data["lin"], threshold=float("nan"))
    with pytest.raises(ParameterError, match=r"ReAct: threshold='1' must be a number"):
        ReAct(head=data["lin"], threshold="1")


@pytest.mark.parametrize("name,ours,pod_name", [("energy", EnergyBased.score, "EnergyBased"),
                                                ("msp", MaxSoftmax.score, "MaxSoftmax"),
                                                ("maxlogit", MaxLogit.score, "MaxLogit")])
def test_scoring_functions_as_callables(data, name, ours, pod_name):
    pod = pytest.importorskip("pytorch_ood.detector")
    ref = ReAct(head=data["lin"], threshold=1.0, detector=name).predict_features(data["z_test"])
    for fn in (ours, getattr(pod, pod_name).score, lambda logits: ours(logits)):
        torch.testing.assert_close(ReAct(head=data["lin"], threshold=1.0, detector=fn).predict_features(data["z_test"]),
                                   ref)
    tempered = ReAct(head=data["lin"], threshold=1.0, detector=EnergyBased(t=3.0)).predict_features(data["z_test"])
    clipped = data["z_test"].clamp(max=1.0) @ data["w"].T + data["b"]
    torch.testing.assert_close(tempered, EnergyBased.score(clipped, 3.0))


def test_contract_declaration():
    decl = ReAct.parameter_constraints
    assert list(decl) == ["threshold", "percentile", "detector"]
    assert decl["percentile"].structural and not decl["detector"].structural and not decl["threshold"].structural
    assert ReAct.needs_head and ReAct.representation == "features"
    assert ReAct.search_space({"D": 8, "C": 3, "N": 40}) == {"percentile": {"grid": [85, 90, 95, 99]}}


# -- pytorch-ood ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("percentile", [85, 90, 99])
def test_vs_pytorch_ood(data, percentile):
    pod = pytest.importorskip("pytorch_ood.detector")
    ours = ReAct(head=data["lin"], percentile=percentile).fit_features(data["z"], data["y"])
    theirs = pod.ReAct(backbone=nn.Identity(), head=data["lin"], percentile=percentile / 100)
    theirs.fit_feature_maps(data["z"], data["y"])
    assert ours.threshold_ == pytest.approx(theirs.threshold, rel=1e-6)
    with torch.no_grad():
        _agree(ours.predict_features(data["z_test"]), theirs.predict_feature_maps(data["z_test"]))


def test_vs_pytorch_ood_absolute_threshold(data):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.ReAct(backbone=nn.Identity(), head=data["lin"], threshold=0.7)
    with torch.no_grad():
        _agree(ReAct(head=(data["w"], data["b"]), threshold=0.7).predict_features(data["z_test"]),
               theirs.predict_feature_maps(data["z_test"]))
