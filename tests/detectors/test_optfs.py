"""OptFS vs a plainly written reference of the official code (Qinyu-Allen-Zhao/OptFSOOD, ``detector/ours.py``:
``np.quantile`` tails, ``np.arange`` left ends, the interval masks ``x <= z < x + width``, theta = 1000 I / |I|)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ood_core.constraints import ParameterError
from ood_core.detectors import OptFS, build_detector, fit_detector, score_detector


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(7)
    c, d = 4, 10
    means = 2 * torch.randn(c, d, generator=g)
    y = torch.arange(300) % c
    z = means[y] + torch.randn(300, d, generator=g)  # negative values too (ViT-like features)
    w = torch.randn(c, d, generator=g)
    b = 0.2 * torch.randn(c, generator=g)
    test = torch.cat([means[torch.arange(20) % c] + torch.randn(20, d, generator=g),
                      6 * torch.rand(20, d, generator=g) - 3, torch.full((1, d), 50.0)])
    return {"z": z, "y": y, "w": w, "b": b, "test": test}


def ref_optfs(train, test, w, b, variant, bins=100):
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    pred = np.argmax(train @ w.T + b, axis=1)
    left, right = np.quantile(train, 1e-3), np.quantile(train, 1 - 1e-3)
    width = (right - left) / bins
    lefts = np.arange(left, right, width)
    lc = w[pred] * train
    info = np.array([np.mean(np.sum(((train >= x) & (train < x + width)) * lc, axis=1)) for x in lefts])
    theta = info / np.linalg.norm(info) * 1000
    out = []
    for z in test:
        shaped = np.zeros_like(z)
        for i, x in enumerate(lefts):
            for j in range(len(z)):
                if x <= z[j] < x + width:
                    shaped[j] += z[j] * theta[i]
        logits = w @ z + b
        if variant == "energy":
            s = w @ shaped + b
            m = max(s)
            out.append(-(m + math.log(sum(math.exp(v - m) for v in s))))
        else:
            out.append(-float(w[int(np.argmax(logits))] @ shaped))
    return np.array(out)


@pytest.mark.parametrize("variant", ["vanilla", "energy"])
def test_optfs_matches_the_official_code(data, variant):
    det = OptFS(head=(data["w"], data["b"]), variant=variant).fit_features(data["z"], data["y"])
    ours = det.predict_features(data["test"]).double().numpy()
    np.testing.assert_allclose(ours, ref_optfs(data["z"], data["test"], data["w"], data["b"], variant),
                               rtol=1e-4, atol=1e-3)


def test_values_outside_the_fitted_range_are_zeroed(data):
    det = OptFS(head=(data["w"], data["b"])).fit_features(data["z"], data["y"])
    assert float(det.predict_features(torch.full((1, 10), 50.0))) == 0.0
    assert det.theta.shape[0] in (100, 101)  # np.arange's count of left ends
    shaped = det.shape(data["test"][:5])
    assert torch.isfinite(shaped).all()


def test_optfs_bins_and_registry(data):
    with pytest.raises(ParameterError, match="OptFS: bins="):
        OptFS(head=(data["w"], data["b"]), bins=0)
    det = build_detector("OptFS", {"bins": 20, "variant": "energy"}, head=(data["w"], data["b"]))
    fit_detector(det, {"features": data["z"]}, data["y"])
    np.testing.assert_allclose(score_detector(det, {"features": data["test"]}).double().numpy(),
                               ref_optfs(data["z"], data["test"], data["w"], data["b"], "energy", bins=20),
                               rtol=1e-4, atol=1e-3)
