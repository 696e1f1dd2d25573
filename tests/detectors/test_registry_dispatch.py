"""Registry specs of logits detectors (RMD, GMM, NECO, NCI, fDBD: tests/detectors/test_feature_stats.py;
NNGuide: tests/detectors/test_knn.py; SHE: test_she.py; DICE: test_dice.py)."""
from __future__ import annotations


import pytest
import torch

from ood_core.api import FeaturesDetector, LogitsDetector
from ood_core.detectors import (
    build_detector,
    detector_params,
    fit_detector,
    get_spec,
    score_detector,
)


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


EXPECTED = {
    "TemperatureScaling": ("logits", False), "KLMatching": ("logits", False), "Entropy": ("logits", False),
    "GEN": ("logits", False), "OpenMax": ("logits", False), "WeightedEBO": ("logits", False),
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
    params = {}
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
