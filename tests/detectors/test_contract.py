"""One contract test suite over every registered detector (after scikit-learn's ``parametrize_with_checks``).

Each detector is built with its defaults (plus the wiring it needs: layers, a model, a head), fitted through
its representation method on small synthetic data and checked for: fit returns self; finite ``(N,)`` scores;
batch invariance; a refit giving the same scores; NaN / inf and wrong widths refused with the class name;
predict before fit refused; its declared constraints enforced at construction and against the data; a complete
declaration (every constructor hyperparameter declared); default search spaces inside the declared
constraints, for small and for large data; the protocol of :mod:`ood_core.evaluation` giving the same scores;
the CPU result equal to the CUDA result when a GPU exists.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from ood_core.api import DetectorError, InvalidInputError, RequiresFitException
from ood_core.constraints import DataSize, Interval, Options, ParameterError
from ood_core.detectors.registry import REGISTRY, build_detector
from ood_core.evaluation import EvalSet, run_protocol

C, D, N, N_TEST = 4, 16, 400, 60
NAMES = sorted(REGISTRY)
#: wiring each detector needs besides its defaults (kept small so the suite stays fast)
EXTRA = {
    "MultiMahalanobis": {"layers": ["conv2", "penultimate"]},
    "LayerEnergy": {"layers": ["conv2.energy"]},
    "LayerEnergyAggregate": {"layers": ["conv2.energy", "conv2"]},
    "Gram": {"layers": ["conv2.none"], "powers": 2},
    "LAOOD": {"layers": ["conv2", "penultimate"]},
    "LAOODEarlyExit": {"layers": ["conv2", "penultimate"]},
    "LayerFusion": {"layers": ["conv2.energy", "conv2", "penultimate"]},
    "NACUE": {"layers": ["bn1", "conv2"]},
    "MCD": {"samples": 3, "seed": 0},
    "HeatmapOOD": {"epochs": 1, "width": 16, "latent_dim": 8, "seed": 0},
    "KNN": {"k": 5},
    "NNGuide": {"k": 5},
    "ViM": {"d": 8},
    "NECO": {"d": 4},
}


class TinyNet(nn.Module):
    """conv / bn / relu -> conv / relu -> dropout -> pool -> head: the ood_core model interface."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, C)

    def feature_maps(self, x):
        return self.drop(self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))

    def features(self, x):
        return self.feature_maps(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _data():
    g = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(C, D, generator=g)
    proj = torch.randn(D, 8, generator=g) / D**0.5
    w = means / means.norm(dim=1, keepdim=True) + 0.1 * torch.randn(C, D, generator=g)
    b = 0.1 * torch.randn(C, generator=g)

    def rows(n, ood=False):
        y = torch.arange(n) % C
        centre = 4 * torch.rand(n, D, generator=g) if ood else means[y]
        z = torch.relu(centre + torch.randn(n, D, generator=g))
        maps = torch.relu(torch.randn(n, 8, 3, 3, generator=g) + (z @ proj)[:, :, None, None])
        reps = {"features": z, "penultimate": z, "logits": z @ w.T + b, "conv2": maps.mean(dim=(2, 3)),
                "conv2.none": maps, "conv2.energy": -torch.logsumexp(maps.flatten(1), dim=1),
                "feature_maps": maps}
        return reps, y

    train, y = rows(N)
    test_id, y_id = rows(N_TEST // 2)
    test_ood, _ = rows(N_TEST // 2, ood=True)
    test = {k: torch.cat([test_id[k], test_ood[k]]) for k in train}
    # the feature-map detector's head reads the maps' channels
    return {"train": train, "y": y, "test": test, "y_test": torch.cat([y_id, torch.full((N_TEST // 2,), -1)]),
            "head": (w, b), "maps_head": (torch.randn(C, 8, generator=g), torch.zeros(C))}


DATA = _data()


def _net():
    torch.manual_seed(0)
    return TinyNet().eval()


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n // 2, 3, 6, 6, generator=g), 3 * torch.rand(n - n // 2, 3, 6, 6, generator=g)])
    return x, torch.arange(n) % C


def _build(name, **over):
    spec = REGISTRY[name]
    params = {**EXTRA.get(name, {}), **over}
    head = DATA["maps_head"] if spec.representation == "feature_maps" else DATA["head"]
    det = build_detector(name, params, head=head if spec.needs_head else None)
    if spec.representation == "model":
        det.model = _net()
    return det


def _fit(det, name, device="cpu"):
    """Fit through the detector's own representation method; returns what the method returned."""
    rep = REGISTRY[name].representation
    tr = {k: v.to(device) for k, v in DATA["train"].items()}
    y = DATA["y"].to(device)
    if rep == "logits":
        return det.fit_logits(tr["logits"], y)
    if rep == "features":
        return det.fit_features(tr["features"], y)
    if rep == "feature_maps":
        return det.fit_feature_maps(tr["feature_maps"], y)
    if rep == "layers":
        return det.fit_structured(tr, y)
    x, yy = _images(64, 1)
    if REGISTRY[name].needs_outliers:
        xo, _ = _images(32, 2)
        x, yy = torch.cat([x, xo]), torch.cat([yy, torch.full((32,), -1)])
    det.model = det.model.to(device)
    return det.fit([(x[i:i + 32].to(device), yy[i:i + 32].to(device)) for i in range(0, len(x), 32)])


def _inputs(name, rows=slice(None), device="cpu"):
    rep = REGISTRY[name].representation
    if rep == "model":
        return _images(24, 3)[0][rows].to(device)
    test = {k: v[rows].to(device) for k, v in DATA["test"].items()}
    return test if rep == "layers" else test[rep]


def _predict(det, name, x):
    rep = REGISTRY[name].representation
    method = {"logits": "predict_logits", "features": "predict_features", "feature_maps": "predict_feature_maps",
              "layers": "predict_structured"}.get(rep, "predict")
    return getattr(det, method)(x)


@pytest.fixture(scope="module")
def fitted():
    cache = {}

    def get(name):
        if name not in cache:
            det = _build(name)
            cache[name] = (det, _fit(det, name), _predict(det, name, _inputs(name)))
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_self_and_scores_are_finite(name, fitted):
    det, returned, scores = fitted(name)
    assert returned is det
    n = 24 if REGISTRY[name].representation == "model" else N_TEST
    assert isinstance(scores, torch.Tensor) and scores.shape == (n,) and scores.is_floating_point()
    assert torch.isfinite(scores).all()
    assert scores.std() > 0, f"{name}: constant scores on ID + OOD rows"


@pytest.mark.parametrize("name", NAMES)
def test_batch_invariance(name, fitted):
    det, _, scores = fitted(name)
    part = _predict(det, name, _inputs(name, slice(3, 10)))
    torch.testing.assert_close(part, scores[3:10], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_refit_gives_the_same_scores(name, fitted):
    det, _, scores = fitted(name)
    again = _build(name)
    _fit(again, name)
    torch.testing.assert_close(_predict(again, name, _inputs(name)), scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_with_the_class_name(name, bad, fitted):
    det, _, _ = fitted(name)
    x = _inputs(name)
    if isinstance(x, dict):
        col = EXTRA.get(name, {}).get("layers", ["conv2"])[0]
        x = {**x, col: x[col].clone()}
        x[col].view(-1)[5] = bad
    else:
        x = x.clone()
        x.view(-1)[5] = bad
    with pytest.raises(DetectorError, match=name):
        _predict(det, name, x)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].representation in ("logits", "features")])
def test_wrong_width_is_refused_with_the_class_name(name, fitted):
    det, _, _ = fitted(name)
    x = _inputs(name)
    with pytest.raises(InvalidInputError, match=name):
        _predict(det, name, torch.cat([x, x[:, :1]], dim=1))
    with pytest.raises(InvalidInputError, match=name):
        _predict(det, name, x[0])  # one dimension


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].cls.requires_fit])
def test_predict_before_fit_is_refused(name):
    det = _build(name)
    if not det.requires_fit:  # an instance that needs no fit (e.g. an absolute threshold)
        pytest.skip("this configuration needs no fit")
    with pytest.raises(RequiresFitException, match=name):
        _predict(det, name, _inputs(name))


@pytest.mark.parametrize("name", NAMES)
def test_every_hyperparameter_is_declared(name):
    cls = REGISTRY[name].cls
    from ood_core.detectors.registry import _WIRING as wiring

    params = {p for p, v in inspect.signature(cls.__init__).parameters.items()
              if p not in wiring and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)}
    assert params == set(cls.parameter_constraints), f"{name}: declare exactly its constructor hyperparameters"
    assert cls.__doc__ and ("arXiv" in cls.__doc__ or "http" in cls.__doc__), f"{name}: cite the paper"


def _violations(decl):
    """Values that every constraint of ``decl`` refuses, statically (no data)."""
    out = []
    for c in decl.constraints:
        if isinstance(c, Interval) and c.low is not None and not isinstance(c.low, DataSize):
            out.append(c.low - 1 if c.type is int else c.low - abs(c.low) - 1.0)
        if isinstance(c, Options):
            out.append("no-such-option")
    return [v for v in out if decl.problem(v) is not None]


@pytest.mark.parametrize("name", NAMES)
def test_declared_constraints_are_enforced_at_construction(name):
    cls = REGISTRY[name].cls
    checked = 0
    for param, decl in cls.parameter_constraints.items():
        for value in _violations(decl):
            with pytest.raises(ParameterError, match=f"{name}: {param}="):
                _build(name, **{param: value})
            checked += 1
    if not checked:
        assert all(not any(isinstance(c, (Interval, Options)) for c in d.constraints)
                   for d in cls.parameter_constraints.values())


def _data_bounds(name):
    """(param, value beyond a data-relative upper bound of the suite's data) pairs."""
    sizes = {"D": {"logits": C, "feature_maps": 8}.get(REGISTRY[name].representation, D), "C": C, "N": N,
             "L": len(EXTRA.get(name, {}).get("layers", []))}
    out = []
    for param, decl in REGISTRY[name].cls.parameter_constraints.items():
        for c in decl.constraints:
            if isinstance(c, Interval) and isinstance(c.high, DataSize):
                out.append((param, c.high.resolve(sizes) + 1 if c.type is int else c.high.resolve(sizes) * 2 + 1))
    return out


@pytest.mark.parametrize("name", [n for n in NAMES if _data_bounds(n)])
def test_data_relative_bounds_are_checked_in_fit(name):
    for param, value in _data_bounds(name):
        det = _build(name, **{param: value})
        with pytest.raises(ParameterError, match=f"{param}="):
            _fit(det, name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sizes", [{"D": 8, "C": 3, "N": 40, "L": 2}, {"D": 2048, "C": 1000, "N": 1_281_167, "L": 2}])
def test_default_search_space_fits_the_data(name, sizes):
    cls = REGISTRY[name].cls
    space = cls.search_space(sizes)
    for param, spec in space.items():
        assert param in cls.parameter_constraints, f"{name}: searches undeclared {param!r}"
        kind, values = next(iter(spec.items()))
        for value in values:
            cls.check_params({param: value}, sizes)


def _sizes(name):
    return {"D": {"logits": C, "feature_maps": 8}.get(REGISTRY[name].representation, D), "C": C, "N": N,
            "L": len(EXTRA.get(name, {}).get("layers", [])) or None}


def _alternative(name, param):
    """A valid value of non-structural ``param`` other than the one the suite builds with, or None."""
    cls = REGISTRY[name].cls
    decl, sizes = cls.parameter_constraints[param], _sizes(name)
    current = _build(name).get_params().get(param)
    candidates = []
    spec = cls.search_space(sizes).get(param)
    if isinstance(spec, dict) and next(iter(spec)) in ("grid", "choice"):
        candidates += list(next(iter(spec.values())))
    for c in decl.constraints:
        if isinstance(c, Options):
            candidates += list(c.values)
        if type(c).__name__ == "Boolean":
            candidates += [True, False]
        if isinstance(c, Interval) and isinstance(current, (int, float)) and not isinstance(current, bool):
            candidates += [current + 1, current * 2, current / 2] if c.type is float else [current + 1, current - 1]
        if type(c).__name__ == "ListOf" and isinstance(current, (list, tuple)) and current and \
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in current):
            candidates.append([v * 0.5 + i for i, v in enumerate(current)])
    if current is None:  # "not set": try plain values, and lists of them one per layer
        length = sizes["L"] or 2
        candidates += [1.0, 0.5, 1, [0.5 + i for i in range(length)], [(-1) ** i for i in range(length)]]
    for value in candidates:
        if value != current and value is not None and decl.problem(value, sizes) is None:
            return value
    return None


NON_STRUCTURAL = [(n, p) for n in NAMES for p, d in REGISTRY[n].cls.parameter_constraints.items()
                  if not d.structural and p not in ("micro_batch_size",)]


@pytest.mark.parametrize("name,param", NON_STRUCTURAL)
def test_non_structural_hyperparameters_need_no_refit(name, param):
    """What a search relies on to fit once per structural configuration: ``set_params`` of a hyperparameter
    declared ``structural=False`` on a fitted detector scores as a detector built and fitted with that value."""
    value = _alternative(name, param)
    if value is None:
        pytest.skip(f"no second valid value of {param} on the suite's data")
    reused = _build(name)
    _fit(reused, name)
    reused.set_params(**{param: value})
    fresh = _build(name, **{param: value})
    _fit(fresh, name)
    torch.testing.assert_close(_predict(reused, name, _inputs(name)), _predict(fresh, name, _inputs(name)),
                               rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}.{param}={value!r}: {m}")


@pytest.mark.parametrize("name", [n for n in NAMES if any(d.structural for d in
                                                          REGISTRY[n].cls.parameter_constraints.values())])
def test_structural_hyperparameters_cannot_change_after_fit(name, fitted):
    det = _build(name)
    _fit(det, name)
    for param, decl in REGISTRY[name].cls.parameter_constraints.items():
        value = _alternative_structural(name, param) if decl.structural else None
        if value is not None:
            with pytest.raises(ValueError, match=f"{name}: {param} changes the fitted state"):
                det.set_params(**{param: value})
            return
    pytest.skip("no second valid value of a structural hyperparameter")


def _alternative_structural(name, param):
    decl = REGISTRY[name].cls.parameter_constraints[param]
    current = _build(name).get_params().get(param)
    for value in ([current + 1] if isinstance(current, int) and not isinstance(current, bool) else []) + \
            ([current * 2] if isinstance(current, float) else []):
        if decl.problem(value, _sizes(name)) is None:
            return value
    return None


def _protocol_on_inputs(name):
    """Model-in-the-loop and feature-map detectors: the protocol on loaders of images equals fit + predict."""
    net = _net()
    head = (net.head.weight.detach(), net.head.bias.detach())
    x, y = _images(64, 1)
    if REGISTRY[name].needs_outliers:
        xo, _ = _images(32, 2)
        x, y = torch.cat([x, xo]), torch.cat([y, torch.full((32,), -1)])
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]
    xt, yt = _images(24, 3)
    params = EXTRA.get(name, {})
    det = build_detector(name, params, head=head if REGISTRY[name].needs_head else None)
    out = run_protocol(det, {"train": EvalSet("id_train", train), "test": EvalSet("far", [(xt, yt)])}, model=net)
    ref = build_detector(name, params, head=head if REGISTRY[name].needs_head else None)
    if REGISTRY[name].representation == "model":
        ref.model = net
        expected = ref.fit(train).predict(xt)
    else:
        with torch.no_grad():
            ref.fit_feature_maps(net.feature_maps(x), y)
            expected = ref.predict_feature_maps(net.feature_maps(xt))
    return out, expected


@pytest.mark.parametrize("name", NAMES)
def test_protocol_gives_the_detectors_scores(name, fitted):
    if REGISTRY[name].representation in ("model", "feature_maps"):
        out, expected = _protocol_on_inputs(name)
        assert set(out) == {"test"}
        torch.testing.assert_close(torch.as_tensor(out["test"].scores), expected.detach().float(), rtol=1e-4, atol=1e-5)
        return
    _, _, scores = fitted(name)
    det = _build(name)
    val = {k: v[:20] for k, v in DATA["test"].items()}
    ood_val = {k: v[-20:] for k, v in DATA["test"].items()}
    sets = {"train": EvalSet("id_train", DATA["train"], DATA["y"]),
            "val": EvalSet("id_val", val, DATA["y_test"][:20]),
            "oodval": EvalSet("ood_val", ood_val, DATA["y_test"][-20:]),
            "test": EvalSet("near", DATA["test"], DATA["y_test"])}
    out = run_protocol(det, sets)
    assert set(out) == {"val", "oodval", "test"}
    if not det.uses_validation:  # a validation-time choice may change the scores
        torch.testing.assert_close(torch.as_tensor(out["test"].scores), scores.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_equals_cpu(name, fitted):
    _, _, scores = fitted(name)
    det = _build(name)
    _fit(det, name, device="cuda")
    out = _predict(det, name, _inputs(name, device="cuda"))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), scores, rtol=1e-3, atol=1e-3)
