"""ood_core/detectors/fusion.py: conformal p-values, Fisher / Brown / min / max / mean fusion and the LayerFusion
detector, against plainly written references (loops, numpy, scipy.stats) and the calibration the statistics
promise (uniform combined p-values under independent uniform layers; Brown correcting duplicated layers)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ood_core.constraints import ParameterError
from ood_core.detectors import LayerFusion, Mahalanobis, build_detector, fit_detector, score_detector
from ood_core.detectors.fusion import (
    brown_parameters, brown_scale_dof, conformal_pvalues, fuse_pvalues, loo_pvalues,
)


# -- references -----------------------------------------------------------------------------------
def ref_pvalue(s, cal):
    return (1 + sum(1 for v in cal if v >= s)) / (len(cal) + 1)


def ref_loo(cal):
    n = len(cal)
    return [(1 + sum(1 for i in range(n) if i != j and cal[i] >= cal[j])) / n for j in range(n)]


def ref_brown(cal_p):
    """Hand computation of Brown's c, f from calibration p-values (n, L): moments of X = sum_l -2 log p_l."""
    cal_p = np.asarray(cal_p, np.float64)
    n, L = cal_p.shape
    t = -2 * np.log(cal_p)
    mu = sum(t[:, l].mean() for l in range(L))
    var = 0.0
    for a in range(L):
        for b in range(L):
            var += sum((t[i, a] - t[:, a].mean()) * (t[i, b] - t[:, b].mean()) for i in range(n)) / n
    return var / (2 * mu), 2 * mu * mu / var


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the statistics -------------------------------------------------------------------------------
def test_conformal_pvalues_match_the_count_with_ties():
    cal = torch.tensor([[0.1, 5.0], [0.3, 5.0], [0.3, 1.0], [0.9, 2.0]])
    s = torch.tensor([[0.3, 5.0], [1.0, 0.0], [-1.0, 2.0]])
    got = conformal_pvalues(s, cal)
    want = [[ref_pvalue(float(s[i, l]), cal[:, l].tolist()) for l in range(2)] for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want)
    assert got[0, 0] == pytest.approx(4 / 5)  # 0.3, 0.3, 0.9 >= 0.3: ties count as at least as OOD


def test_loo_pvalues_match_the_count():
    cal = torch.tensor([[0.1, 5.0], [0.3, 5.0], [0.3, 1.0], [0.9, 2.0], [0.2, 2.0]])
    want = np.stack([ref_loo(cal[:, l].tolist()) for l in range(2)], axis=1)
    np.testing.assert_allclose(loo_pvalues(cal).numpy(), want)


def test_fisher_matches_scipy():
    p = _rand(20, 4) * 0.99 + 0.005
    got = fuse_pvalues(p, "fisher").exp()
    want = [stats.combine_pvalues(row, method="fisher")[1] for row in p.numpy()]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_brown_matches_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(30, 1, generator=g, dtype=torch.float64)
    cal_p = torch.sigmoid(z + 0.7 * torch.randn(30, 3, generator=g, dtype=torch.float64))  # correlated layers
    c, f = brown_scale_dof(*brown_parameters(cal_p))
    c_ref, f_ref = ref_brown(cal_p.numpy())
    assert (c, f) == (pytest.approx(c_ref, rel=1e-10), pytest.approx(f_ref, rel=1e-10))
    p = _rand(5, 3, seed=2)
    x = -2 * np.log(p.numpy()).sum(axis=1)
    np.testing.assert_allclose(fuse_pvalues(p, "fisher_brown", c, f).exp().numpy(), stats.chi2.sf(x / c_ref, f_ref),
                               rtol=1e-9)


def test_brown_degenerate_moments_fall_back_to_fisher():
    assert brown_scale_dof(*brown_parameters(torch.ones(10, 3))) == (1.0, 6.0)


def test_min_max_mean():
    p = _rand(7, 3, seed=3)
    for fusion, fn in (("min", np.min), ("max", np.max), ("mean", np.mean)):
        np.testing.assert_allclose(fuse_pvalues(p, fusion).exp().numpy(), fn(p.numpy(), axis=1), rtol=1e-12)
    with pytest.raises(ValueError, match="fusion"):
        fuse_pvalues(p, "median")


# -- calibration ----------------------------------------------------------------------------------
def _fused_p(columns_cal, columns_test, fusion):
    names = [f"l{i}" for i in range(len(columns_cal))]
    cal = {k: c for k, c in zip(names, columns_cal)}
    det = LayerFusion(names, fusion=fusion).fit_structured(cal)
    det.select_on_validation(cal, {k: c[:50] for k, c in cal.items()})
    det.signs_ = [1.0] * len(names)  # the columns are already oriented; keep the calibration of select
    det._calibrate(det.predict_per_layer(cal))
    return torch.exp(-det.predict_structured({k: c for k, c in zip(names, columns_test)}).double())


def test_independent_uniform_layers_give_uniform_combined_pvalues():
    cal = [_rand(3000, seed=10 + i).float() for i in range(4)]
    test = [_rand(6000, seed=20 + i).float() for i in range(4)]
    for fusion in ("fisher", "fisher_brown"):
        p = _fused_p(cal, test, fusion).numpy()
        for alpha in (0.01, 0.05, 0.2, 0.5):
            assert abs((p <= alpha).mean() - alpha) < 0.02 + 0.1 * alpha, (fusion, alpha)


def test_brown_corrects_what_fisher_over_counts_on_duplicated_layers():
    a, b = _rand(3000, seed=30).float(), _rand(6000, seed=31).float()
    fisher = _fused_p([a, a, a], [b, b, b], "fisher").numpy()
    brown = _fused_p([a, a, a], [b, b, b], "fisher_brown").numpy()
    assert (fisher <= 0.05).mean() > 0.1  # one layer counted three times: P = exp(-12.59 / 6) = 0.12
    assert abs((brown <= 0.05).mean() - 0.05) < 0.015  # X / c = -2 log p of the one layer ~ chi2_2


# -- the detector ---------------------------------------------------------------------------------
def _layers(n, seed, ood=False):
    g = torch.Generator().manual_seed(seed)
    shift = 1.5 if ood else 0.0
    return {"e1": torch.randn(n, generator=g) + shift,  # high = OOD
            "e2": torch.randn(n, generator=g) - shift,  # low = OOD: the sign is chosen on validation
            "f": torch.randn(n, 5, generator=g) + shift}


def test_energy_fusion_matches_a_plain_reference():
    train, val, ood_val, test = _layers(200, 0), _layers(150, 1), _layers(100, 2, True), _layers(40, 3)
    names = ["e1", "e2", "f"]
    det = LayerFusion(names, fusion="fisher").fit_structured(train)
    det.select_on_validation(val, ood_val)
    assert det.signs_[:2] == [1.0, -1.0]

    def energy(col):
        col = col.double().numpy()
        return col if col.ndim == 1 else -np.log(np.exp(col).sum(axis=1))

    signs = det.signs_
    s_val = [signs[l] * energy(val[k]) for l, k in enumerate(names)]
    s_test = [signs[l] * energy(test[k]) for l, k in enumerate(names)]
    want = []
    for i in range(40):
        ps = [ref_pvalue(s_test[l][i], s_val[l]) for l in range(3)]
        want.append(-math.log(stats.combine_pvalues(ps, method="fisher")[1]))
    np.testing.assert_allclose(det.predict_structured(test).numpy(), want, rtol=1e-5)


def test_feature_detector_base_is_fitted_per_layer():
    train, val, test = _layers(200, 0), _layers(100, 1), _layers(30, 3)
    y = torch.arange(200) % 2
    det = LayerFusion(["f", "e1"], base="Mahalanobis").fit_structured(train, y)
    det.select_on_validation(val, _layers(50, 2, True))
    per_layer = det.predict_per_layer(test)
    ref = Mahalanobis().fit_features(train["f"], y).predict_features(test["f"])
    torch.testing.assert_close(per_layer[:, 0].float(), ref.float(), rtol=1e-5, atol=1e-5)
    ref_val = Mahalanobis().fit_features(train["f"], y).predict_features(val["f"])
    want = [ref_pvalue(float(s), ref_val.double().tolist()) for s in ref.double()]
    np.testing.assert_allclose(det.pvalues(test)[:, 0].numpy(), want, rtol=1e-6)


def test_select_equals_a_detector_on_those_layers():
    train, val, ood_val, test = _layers(200, 0), _layers(150, 1), _layers(100, 2, True), _layers(40, 3)
    for fusion in ("fisher_brown", "mean"):
        full = LayerFusion(["e1", "e2", "f"], fusion=fusion, select=["e1", "f"]).fit_structured(train)
        full.select_on_validation(val, ood_val)
        sub = LayerFusion(["e1", "f"], fusion=fusion).fit_structured(train)
        sub.select_on_validation(val, ood_val)
        torch.testing.assert_close(full.predict_structured(test), sub.predict_structured(test))


def test_brown_on_correlated_layers_is_less_extreme_than_fisher():
    train = _layers(200, 0)
    train["e3"] = train["e1"] + 0.01 * torch.randn(200)  # a near-copy of e1
    val = {k: v[:100] for k, v in train.items()}
    det = LayerFusion(["e1", "e3"], fusion="fisher").fit_structured(train)
    det.select_on_validation(val, {k: v[100:] + 2 for k, v in train.items()})
    x = {"e1": torch.tensor([10.0]), "e3": torch.tensor([10.0])}
    fisher = det.predict_structured(x)
    det.set_params(fusion="fisher_brown")
    assert det.predict_structured(x) < fisher


def test_sweep_path_fits_and_scores():
    train, test = _layers(100, 0), _layers(20, 3)
    det = build_detector("LayerFusion", {"layers": ["e1", "f"], "base": "knn", "base_params": {"k": 3}})
    scores = score_detector(fit_detector(det, train, torch.zeros(100, dtype=torch.long)), test)
    assert scores.shape == (20,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("params,field", [
    ({"fusion": "median"}, "fusion"),
    ({"base": "MaxSoftmax"}, "base"),   # a logits detector cannot score a layer's features
    ({"base": "no-such"}, "base"),
    ({"base_params": [1]}, "base_params"),
    ({"select": ["e1", "zz"]}, "select"),
])
def test_constraint_errors_name_the_field(params, field):
    with pytest.raises(ParameterError, match=f"LayerFusion: {field}="):
        LayerFusion(["e1", "e2"], **params)
    det = LayerFusion(["e1", "e2"]).fit_structured(_layers(50, 0))
    if field in ("fusion", "select"):  # non-structural: checked on set_params too
        with pytest.raises(ParameterError, match=f"{field}="):
            det.set_params(**params)
