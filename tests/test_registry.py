"""Detector registry: specs, lookup, construction, dispatch on representation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ood_core.api import Detector, FeaturesDetector, LogitsDetector
from ood_core.detectors import (
    KNN,
    REGISTRY,
    DetectorSpec,
    EnergyBased,
    Mahalanobis,
    MaxSoftmax,
    ReAct,
    ViM,
    build_detector,
    detector_params,
    fit_detector,
    get_spec,
    register,
    score_detector,
)

EXPECTED = {
    "MaxSoftmax": ("logits", False),
    "MaxLogit": ("logits", False),
    "EnergyBased": ("logits", False),
    "Mahalanobis": ("features", False),
    "ViM": ("features", True),
    "KNN": ("features", False),
    "ReAct": ("features", True),
}


@pytest.fixture(scope="module")
def reps():
    g = torch.Generator().manual_seed(0)
    n, d, c = 120, 12, 3
    y = torch.arange(n) % c
    means = torch.randn(c, d, generator=g) * 4
    z = torch.relu(means[y] + torch.randn(n, d, generator=g))
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    return dict(features=z, logits=z @ w.T + b, y=y, head=(w, b))


def test_registry_contents():
    for name, (rep, needs_head) in EXPECTED.items():
        spec = REGISTRY[name]
        assert spec.name == name and spec.cls.__name__ == name
        assert (spec.representation, spec.needs_head) == (rep, needs_head)
        assert issubclass(spec.cls, LogitsDetector if rep == "logits" else FeaturesDetector)
        assert spec.search_space == spec.cls.default_search_space
        assert spec.cls.__doc__ and "arXiv" in spec.cls.__doc__


def test_spec_is_frozen_and_validates_representation():
    with pytest.raises(Exception):
        REGISTRY["KNN"].name = "other"
    class Pixels(KNN):
        representation = "pixels"

    with pytest.raises(ValueError, match="unknown representation"):
        DetectorSpec("X", Pixels)


def test_get_spec_case_insensitive_and_clear_key_error():
    assert get_spec("knn") is REGISTRY["KNN"]
    assert get_spec("MAXSOFTMAX") is REGISTRY["MaxSoftmax"]
    with pytest.raises(KeyError) as err:
        get_spec("Mahalanobiss")
    msg = str(err.value)
    assert "Mahalanobiss" in msg and all(name in msg for name in EXPECTED)


def test_detector_params_exclude_wiring():
    assert detector_params("MaxSoftmax") == ["t"]
    assert detector_params("MaxLogit") == []
    assert detector_params("EnergyBased") == ["t"]
    assert detector_params("Mahalanobis") == []  # eps: MahalanobisPreprocessed
    assert detector_params("vim") == ["d"]
    assert detector_params("KNN") == ["k", "normalize", "alpha", "seed", "index", "nlist", "nprobe"]
    assert detector_params("ReAct") == ["threshold", "percentile", "detector"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_default_search_space_keys_are_params(name):
    space = get_spec(name).search_space
    assert set(space) <= set(detector_params(name))
    for spec in space.values():
        assert isinstance(spec, dict) and len(spec) == 1 and "grid" in spec


def test_openood_grids():
    assert get_spec("ReAct").search_space == {"percentile": {"grid": [85, 90, 95, 99]}}
    assert get_spec("KNN").search_space == {"k": {"grid": [50, 100, 200, 500, 1000]}}
    assert get_spec("ViM").search_space == {"d": {"grid": [256, 1000]}}
    assert get_spec("MaxSoftmax").search_space == {"t": {"grid": [1, 2, 5, 10, 100, 1000]}}
    assert get_spec("EnergyBased").search_space == {"t": {"grid": [0.5, 1, 2, 5]}}


def test_build_detector_passes_params_and_head(reps):
    det = build_detector("maxsoftmax", {"t": 10})
    assert isinstance(det, MaxSoftmax) and det.t == 10.0
    vim = build_detector("ViM", {"d": 4}, head=reps["head"])
    assert isinstance(vim, ViM) and torch.equal(vim.w, reps["head"][0]) and torch.equal(vim.b, reps["head"][1])
    react = build_detector("ReAct", {"percentile": 95}, head=reps["head"])
    assert isinstance(react, ReAct) and torch.equal(react.w, reps["head"][0]) and react.requires_fit
    assert not build_detector("ReAct", {"threshold": 1.0}, head=reps["head"]).requires_fit
    # the head is ignored by detectors that do not need it
    assert isinstance(build_detector("KNN", {"k": 3}, head=reps["head"]), KNN)
    assert isinstance(build_detector("EnergyBased", None), EnergyBased)


def test_build_detector_errors(reps):
    with pytest.raises(TypeError) as err:
        build_detector("KNN", {"kk": 5})
    assert "KNN" in str(err.value) and "'kk'" in str(err.value) and "k, normalize" in str(err.value)
    with pytest.raises(TypeError, match="MaxLogit: unknown parameter"):
        build_detector("MaxLogit", {"t": 2})
    with pytest.raises(TypeError, match="'model'"):
        build_detector("Mahalanobis", {"model": None})
    with pytest.raises(ValueError, match="ViM: needs the classifier head"):
        build_detector("ViM", {"d": 4})
    # pytorch-ood's rule: a given threshold is used as it is (percentile then only applies without one)
    assert build_detector("ReAct", {"threshold": 1.0, "percentile": 90}, head=reps["head"]).threshold == 1.0
    with pytest.raises(KeyError, match="known detectors"):
        build_detector("NoSuch", {})


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fit_and_score_dispatch(reps, name):
    params = {"ViM": {"d": 4}, "KNN": {"k": 5}}.get(name, {})
    det = build_detector(name, params, head=reps["head"])
    train = {"features": reps["features"], "logits": reps["logits"]}
    assert fit_detector(det, train, reps["y"]) is det
    scores = score_detector(det, train)
    assert scores.shape == (len(reps["y"]),) and torch.isfinite(scores).all()
    rep = EXPECTED[name][0]
    direct = det.predict_logits(reps["logits"]) if rep == "logits" else det.predict_features(reps["features"])
    torch.testing.assert_close(scores, direct)
    # numpy representations from the feature store work too
    as_numpy = {k: v.numpy() for k, v in train.items()}
    fit_detector(det, as_numpy, reps["y"].numpy())
    torch.testing.assert_close(score_detector(det, as_numpy), direct)


def test_dispatch_uses_the_right_representation(reps):
    det = build_detector("Mahalanobis", {})
    with pytest.raises(KeyError, match="'features'"):
        fit_detector(det, {"logits": reps["logits"]}, reps["y"])
    fit_detector(det, {"features": reps["features"], "logits": torch.full_like(reps["logits"], float("nan"))}, reps["y"])
    logit_det = build_detector("MaxLogit", {})
    scores = score_detector(logit_det, {"logits": reps["logits"], "features": reps["features"][:, :1]})
    torch.testing.assert_close(scores, -reps["logits"].max(dim=1).values)


def test_unregistered_detector_and_register():
    class Custom(FeaturesDetector):
        def predict_features(self, z):
            return z.sum(dim=1)

    with pytest.raises(KeyError, match="not a registered detector"):
        score_detector(Custom(), {"features": torch.ones(2, 3)})
    try:
        spec = register(Custom, "CustomTestDetector")
        assert get_spec("customtestdetector") is spec
        torch.testing.assert_close(score_detector(Custom(), {"features": torch.ones(2, 3)}), torch.full((2,), 3.0))
        with pytest.raises(ValueError, match="already registered"):
            register(KNN, "customTestDetector")
    finally:
        REGISTRY.pop("CustomTestDetector", None)


def test_model_representation_cannot_use_cached_reps():
    class InLoop(Detector):
        def predict(self, x):
            return x

    register(InLoop, "InLoopTestDetector")
    try:
        with pytest.raises(ValueError, match="model in the loop"):
            score_detector(InLoop(), {"features": torch.ones(2, 3)})
    finally:
        REGISTRY.pop("InLoopTestDetector", None)


def test_subclass_of_registered_detector_dispatches_like_parent(reps):
    class MyMaha(Mahalanobis):
        pass

    det = MyMaha()
    fit_detector(det, {"features": reps["features"]}, reps["y"])
    assert np.isfinite(score_detector(det, {"features": reps["features"]}).numpy()).all()
