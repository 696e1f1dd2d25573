"""CFOOD vs a plainly written reference of OpenOOD's ``cfood_postprocessor.py`` (a sort per reference point, a loop
per test sample), its quirks (the kappa grid, the rank ``int(kappa n - 1) + 1``, kappa = 1 when never reached), and
its constraints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ood_core.constraints import ParameterError
from ood_core.detectors import CFOOD, build_detector, fit_detector, score_detector
from ood_core.detectors.cfood import kappa_grid


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(11)
    y = torch.arange(240) % 3
    centres = 3 * torch.randn(3, 8, generator=g)
    z = centres[y] + torch.randn(240, 8, generator=g)
    test = torch.cat([centres[torch.arange(30) % 3] + torch.randn(30, 8, generator=g),
                      4 * torch.randn(30, 8, generator=g), torch.zeros(1, 8)])  # a zero row: |v - r|^2 = 1
    return {"z": z, "y": y, "test": test}


def ref_cfood(train, test, rho, rows=None):
    """OpenOOD's setup + postprocess in float64, with the reference rows ``rows`` (all by default)."""
    feats = np.asarray(train, np.float64)
    feats = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-10)
    ref = feats if rows is None else feats[rows]
    n = len(ref)
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    kval, kpos = kval[keep], kpos[keep]
    knndst = np.zeros((n, len(kpos)))
    for i in range(n):
        dst = np.sort(np.sum((ref[i] - ref) ** 2, axis=1))
        knndst[i] = dst[kpos + 1]
    out = []
    for v in np.asarray(test, np.float64):
        v = v / (np.linalg.norm(v) + 1e-10)
        dst = np.sum((v - ref) ** 2, axis=1)
        count = (knndst >= dst[:, None]).sum(axis=0).astype(np.float32) / np.float32(n)
        pos = np.nonzero(count >= np.float32(rho))[0]
        out.append(kval[pos[0]] if len(pos) else 1.0)
    return np.array(out)


@pytest.mark.parametrize("rho", [0.001, 0.01, 0.05, 0.3])
def test_cfood_matches_openood_on_the_whole_reference_set(data, rho):
    det = CFOOD(alpha=1.0, rho=rho).fit_features(data["z"])
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_cfood(data["z"], data["test"], rho), rtol=1e-6)


def test_cfood_subsample_is_seeded(data):
    det = CFOOD(alpha=0.5, rho=0.01, seed=3).fit_features(data["z"])
    rows = torch.randperm(240, generator=torch.Generator().manual_seed(3))[:120].numpy()
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_cfood(data["z"], data["test"], 0.01, rows), rtol=1e-6)
    again = CFOOD(alpha=0.5, rho=0.01, seed=3).fit_features(data["z"])
    torch.testing.assert_close(again.predict_features(data["test"]), det.predict_features(data["test"]))


def test_cfood_scores_are_grid_values_and_rank_outliers_higher(data):
    det = CFOOD(alpha=1.0).fit_features(data["z"])
    s = det.predict_features(data["test"])  # in the features' dtype (float32)
    grid = set(kappa_grid(240)[0].astype(np.float32).tolist()) | {1.0}
    assert set(s.numpy().tolist()) <= grid
    assert float(s[30:60].mean()) > float(s[:30].mean())


def test_kappa_grid_keeps_strictly_increasing_ranks():
    kval, kpos = kappa_grid(50)
    assert (np.diff(kpos) > 0).all() and kpos[0] == 0 and len(kval) == len(kpos)
    assert len(kappa_grid(100_000)[0]) == 230


def test_cfood_constraints(data):
    with pytest.raises(ParameterError, match="CFOOD: alpha="):
        CFOOD(alpha=1.5)
    with pytest.raises(ParameterError, match="CFOOD: rho="):
        CFOOD(rho=0.0)
    with pytest.raises(ParameterError, match=r"CFOOD: alpha=0.005 keeps 1 of the 240"):
        CFOOD(alpha=0.005).fit_features(data["z"])
    assert CFOOD(k=0.05).rho == 0.05  # OpenOOD's name


def test_cfood_through_the_registry(data):
    det = build_detector("CFOOD", {"alpha": 1.0, "rho": 0.05})
    fit_detector(det, {"features": data["z"]}, data["y"])
    np.testing.assert_allclose(score_detector(det, {"features": data["test"]}).double().numpy(),
                               ref_cfood(data["z"], data["test"], 0.05), rtol=1e-6)
