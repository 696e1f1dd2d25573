"""ood_core/detectors/la_ood.py: LA-OOD and its early-exit variant vs plainly written references (scikit-learn
OneClassSVM, loops)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.svm import OneClassSVM

from ood_core.api import InvalidInputError, RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import (
    LAOOD, LAOODEarlyExit, build_detector, detector_params, fit_detector, get_spec, score_detector,
)
from ood_core.detectors.ocsvm import rbf_decision
from ood_core.metrics import auroc

LAYERS = ["l0", "l1", "l2"]
DIMS = [4, 6, 8]


def make_reps(rng, n, far_layer=None, shift=2.0):
    """Correlated Gaussian features per layer; OOD rows shifted by ``shift`` ID-stds per dim in one layer."""
    reps = {}
    for i, (key, d) in enumerate(zip(LAYERS, DIMS)):
        mix = np.random.default_rng(100 + i).normal(size=(d, d))  # same map for ID and OOD
        z = rng.normal(size=(n, d))
        if i == far_layer:
            z = z + shift
        reps[key] = torch.tensor(z @ mix + 3.0 * i, dtype=torch.float32)
    return reps


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = make_reps(rng, 500)
    y = torch.tensor(rng.integers(0, 3, 500))
    y[:20] = -1  # unlabelled / outlier rows are ignored by fit
    return {
        "train": train,
        "y": y,
        "id": make_reps(rng, 200),
        "ood": make_reps(rng, 200, far_layer=1),
        "ood0": make_reps(rng, 200, far_layer=0, shift=4.0),
    }


@pytest.fixture(scope="module")
def fitted(data):
    return LAOOD(layers=LAYERS, seed=3).fit_structured(data["train"], data["y"])


# -- references --------------------------------------------------------------------------------------
def ref_laood(det, train, y, test):
    """Per layer: standardise on ID train, sklearn OneClassSVM(nu, det's gamma) on det's rows, z-score of
    -decision_function with held-out ID statistics; max over layers."""
    keep = np.asarray(y) >= 0
    per_layer = []
    for l, key in enumerate(det.layers):
        x = np.asarray(train[key], np.float64)[keep]
        mean, std = x.mean(axis=0), x.std(axis=0)
        xs = (x - mean) / std
        svm = OneClassSVM(kernel="rbf", nu=0.001, gamma=det.gammas_[l]).fit(xs[det.fit_index_])
        held = -svm.decision_function(xs[det.stats_index_])
        t = -svm.decision_function((np.asarray(test[key], np.float64) - mean) / std)
        per_layer.append((t - held.mean()) / held.std())
    z = np.stack(per_layer, axis=1)
    return z, z.max(axis=1)


def exits_of(det, reps):
    scores, details = det.predict_structured_details(reps)
    assert set(details) == {"exit_layer"}
    return scores, details["exit_layer"]


def ref_exits(z, lo, hi):
    """Plain loop over samples and layers: exit at the first decisive layer, score = running max."""
    n, n_layers = z.shape
    scores, exits = np.zeros(n), np.zeros(n, dtype=np.int64)
    for i in range(n):
        best = -np.inf
        for l in range(n_layers):
            best = max(best, z[i, l])
            if l == n_layers - 1 or z[i, l] > hi[l] or z[i, l] < lo[l]:
                scores[i], exits[i] = best, l
                break
    return scores, exits


# -- LAOOD -------------------------------------------------------------------------------------------
def test_matches_plain_reference(data, fitted):
    test = {k: torch.cat([data["id"][k], data["ood"][k]]) for k in LAYERS}
    z_ref, s_ref = ref_laood(fitted, data["train"], data["y"], test)
    np.testing.assert_allclose(fitted.predict_per_layer(test).double().numpy(), z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fitted.predict_structured(test).double().numpy(), s_ref, rtol=1e-4, atol=1e-4)
    # the split: held-out rows disjoint from the SVM's rows, both among the 480 ID rows
    assert not set(fitted.fit_index_) & set(fitted.stats_index_)
    assert len(fitted.fit_index_) + len(fitted.stats_index_) == 480 and len(fitted.stats_index_) == 96
    # the torch decision function is scikit-learn's
    svm = fitted.svms_[1]
    x = torch.randn(50, DIMS[1], dtype=torch.float64)
    got = rbf_decision(x, fitted.support_vectors_[1], fitted.dual_coef_[1], fitted.intercept_[1], fitted.gammas_[1])
    np.testing.assert_allclose(got.numpy(), svm.decision_function(x.numpy()), rtol=1e-9, atol=1e-9)


def test_detects_ood_far_in_one_layer_only(data, fitted):
    z_id, z_ood = fitted.predict_per_layer(data["id"]), fitted.predict_per_layer(data["ood"])
    per_layer = [auroc(z_id[:, l].numpy(), z_ood[:, l].numpy()) for l in range(3)]
    assert per_layer[1] > 0.95 and per_layer[0] < 0.65 and per_layer[2] < 0.65
    assert auroc(fitted.predict_structured(data["id"]).numpy(), fitted.predict_structured(data["ood"]).numpy()) > 0.95
    # without layer l1 (max over the other two layers) the OOD is missed
    others = [0, 2]
    assert auroc(z_id[:, others].max(dim=1).values.numpy(), z_ood[:, others].max(dim=1).values.numpy()) < 0.65


def test_nchw_columns_are_pooled(data, fitted):
    maps = {k: v[:, :, None, None].expand(-1, -1, 3, 2).contiguous() for k, v in data["id"].items()}
    torch.testing.assert_close(fitted.predict_structured(maps), fitted.predict_structured(data["id"]))
    numpy_reps = {k: v.numpy() for k, v in data["id"].items()}
    torch.testing.assert_close(fitted.predict_structured(numpy_reps), fitted.predict_structured(data["id"]))


def test_batch_independence(data, fitted):
    full = fitted.predict_structured(data["ood"])
    parts = [fitted.predict_structured({k: v[i : i + 37] for k, v in data["ood"].items()}) for i in range(0, 200, 37)]
    torch.testing.assert_close(torch.cat(parts), full)
    one = fitted.predict_structured({k: v[5:6] for k, v in data["ood"].items()})
    torch.testing.assert_close(one, full[5:6])
    assert full.dtype == torch.float32 and full.device == data["ood"]["l0"].device


def test_fixed_gamma_and_seed_reproducible(data):
    a = LAOOD(layers=["l0", "l1"], gamma=[0.3, 0.1], seed=1).fit_structured(data["train"], data["y"])
    b = LAOOD(layers=["l0", "l1"], gamma=[0.3, 0.1], seed=1).fit_structured(data["train"], data["y"])
    assert a.gammas_ == [0.3, 0.1] and a.selection_errors_ == [None, None]
    torch.testing.assert_close(a.predict_structured(data["ood"]), b.predict_structured(data["ood"]))
    small = LAOOD(layers=["l0"], max_fit_samples=50, gamma=0.2).fit_structured(data["train"], data["y"])
    assert len(small.fit_index_) == 50 and len(small.stats_index_) == 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_inputs(data, fitted):
    cuda = {k: v.cuda() for k, v in data["ood"].items()}
    scores = copy.deepcopy(fitted).to("cuda").predict_structured(cuda)
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), fitted.predict_structured(data["ood"]), rtol=1e-5, atol=1e-5)
    early = LAOODEarlyExit(layers=LAYERS, seed=3, gamma=fitted.gammas_).fit_structured(
        {k: v.cuda() for k, v in data["train"].items()}, data["y"].cuda()
    )
    s, details = early.predict_structured_details(cuda)
    assert s.device.type == "cuda" and details["exit_layer"].device.type == "cuda"


# -- early exit ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def early(data, fitted):
    return LAOODEarlyExit(layers=LAYERS, seed=3, gamma=fitted.gammas_).fit_structured(data["train"], data["y"])


def test_early_exit_matches_loop(data, fitted, early):
    test = {k: torch.cat([data["id"][k], data["ood"][k], data["ood0"][k]]) for k in LAYERS}
    z = fitted.predict_per_layer(test).double().numpy()
    torch.testing.assert_close(early.predict_per_layer(test), fitted.predict_per_layer(test))
    lo, hi = early.thresholds()
    h = early.holdout_scores_.numpy()
    lo, hi = lo.numpy(), hi.numpy()
    np.testing.assert_allclose(lo, np.quantile(h, 0.1, axis=0))
    np.testing.assert_allclose(hi, np.quantile(h, 0.99, axis=0))
    scores, details = early.predict_structured_details(test)
    exits = details["exit_layer"]
    ref_s, ref_e = ref_exits(z, lo, hi)
    np.testing.assert_array_equal(exits.numpy(), ref_e)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(early.predict_structured(test), scores)
    # explicit thresholds, one per layer
    ex = LAOODEarlyExit(layers=LAYERS, seed=3, gamma=fitted.gammas_, t_low=[-1.0, -0.5, -2.0], t_high=2.5)
    ex.fit_structured(data["train"], data["y"])
    ref_s, ref_e = ref_exits(z, [-1.0, -0.5, -2.0], [2.5] * 3)
    scores, exits = exits_of(ex, test)
    np.testing.assert_array_equal(exits.numpy(), ref_e)
    np.testing.assert_allclose(scores.double().numpy(), ref_s, rtol=1e-5, atol=1e-5)


def test_early_exit_saves_layers_when_decisive(data, early):
    used = early.average_layers_used(data["ood0"])  # far in the first layer: stops there
    assert 1.0 <= used < 1.2 and early.compute_saved(data["ood0"]) == pytest.approx(1 - used / 3)
    assert early.average_layers_used(data["id"]) < 3.0  # ~10 % of ID stop at the first layer as ID
    s_id = early.predict_structured(data["id"]).numpy()
    assert auroc(s_id, early.predict_structured(data["ood0"]).numpy()) > 0.95


def test_early_exit_without_exits_is_laood(data, fitted):
    never = LAOODEarlyExit(layers=LAYERS, seed=3, gamma=fitted.gammas_, q_low=0.0, q_high=1.0)
    never.fit_structured(data["train"], data["y"])
    scores, exits = exits_of(never, data["ood"])
    assert (exits == 2).all() and never.average_layers_used(data["ood"]) == 3.0
    torch.testing.assert_close(scores, fitted.predict_structured(data["ood"]))


def test_early_exit_batch_independence(data, early):
    full_s, full_e = exits_of(early, data["ood0"])
    parts = [exits_of(early, {k: v[i : i + 50] for k, v in data["ood0"].items()}) for i in range(0, 200, 50)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), full_s)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_e)


# -- registry and errors -------------------------------------------------------------------------------
def test_registry(data):
    for name in ("LAOOD", "LAOODEarlyExit"):
        spec = get_spec(name)
        assert spec.representation == "layers" and not spec.needs_head
        assert "layers" in detector_params(name)
        assert set(spec.search_space) <= set(detector_params(name))
    assert get_spec("LAOOD").search_space == {}
    assert get_spec("LAOODEarlyExit").search_space == {"q_low": {"grid": [0.0, 0.1, 0.5]},
                                                       "q_high": {"grid": [0.95, 0.99]}}
    det = build_detector("LAOODEarlyExit", {"layers": ["l0", "l1"], "q_low": 0.0, "gamma": 0.2})
    assert fit_detector(det, data["train"], data["y"]) is det
    scores = score_detector(det, data["id"])
    assert scores.shape == (200,) and torch.isfinite(scores).all()


def test_errors_name_the_detector(data, fitted):
    with pytest.raises(RequiresFitException, match="LAOOD: call fit"):
        LAOOD(layers=LAYERS).predict_structured(data["id"])
    with pytest.raises(RequiresFitException, match="LAOODEarlyExit: call fit"):
        LAOODEarlyExit(layers=LAYERS).predict_structured_details(data["id"])
    bad = dict(data["id"])
    bad["l1"] = bad["l1"].clone()
    bad["l1"][3, 0] = float("nan")
    with pytest.raises(InvalidInputError, match=r"LAOOD: column 'l1' contains NaN"):
        fitted.predict_structured(bad)
    with pytest.raises(InvalidInputError, match=r"LAOOD: needs the column 'l2'"):
        fitted.predict_structured({"l0": data["id"]["l0"], "l1": data["id"]["l1"]})
    with pytest.raises(InvalidInputError, match=r"LAOOD: column 'l0' has width 3, but .* fitted for width 4"):
        fitted.predict_structured({**data["id"], "l0": data["id"]["l0"][:, :3]})
    with pytest.raises(InvalidInputError, match="LAOOD: columns .* different row counts"):
        fitted.predict_structured({**data["id"], "l0": data["id"]["l0"][:10]})
    with pytest.raises(InvalidInputError, match="LAOOD: needs at least 10 ID training rows"):
        LAOOD(layers=["l0"]).fit_structured({"l0": torch.randn(5, 2)}, torch.zeros(5))
    with pytest.raises(InvalidInputError, match="LAOODEarlyExit: column 'l0' contains NaN"):
        LAOODEarlyExit(layers=["l0"]).fit_structured({"l0": torch.full((20, 2), float("nan"))}, torch.zeros(20))


def test_declared_constraints():
    with pytest.raises(ParameterError, match=r"LAOOD: layers=\[\] must have at least 1"):
        LAOOD(layers=[])
    with pytest.raises(ParameterError, match=r"LAOODEarlyExit: t_low=\[0.0, 1.0\] must have 3 items \(L: the number"):
        LAOODEarlyExit(layers=LAYERS, t_low=[0.0, 1.0])
    with pytest.raises(ParameterError, match=r"LAOOD: nu=0.0 must be in \(0, 1\]"):
        LAOOD(layers=LAYERS, nu=0.0)
    with pytest.raises(ParameterError, match=r"LAOOD: gamma=\[0.1, 0.0\] item 1 \(0.0\) must be in \(0, inf\)"):
        LAOOD(layers=["a", "b"], gamma=[0.1, 0.0])
    with pytest.raises(ParameterError, match=r"LAOOD: max_fit_samples=5 must be in \[10, inf\)"):
        LAOOD(layers=LAYERS, max_fit_samples=5)
    with pytest.raises(ParameterError, match=r"LAOODEarlyExit: q_high=1.5 must be in \[0, 1\]"):
        LAOODEarlyExit(layers=LAYERS, q_high=1.5)
    structural = {k for k, p in LAOODEarlyExit.parameter_constraints.items() if p.structural}
    assert structural == set(LAOOD.parameter_constraints)  # the exit thresholds only change the scoring


def test_k_beyond_the_training_rows_is_refused_in_fit(data):
    """k (neighbours of the edge detection) <= N - 1, N the ID training rows (480 here: 20 rows are < 0)."""
    with pytest.raises(ParameterError, match=r"LAOOD: k=480 must be in \[1, N - 1=479\]"):
        LAOOD(layers=["l0"], k=480).fit_structured(data["train"], data["y"])
