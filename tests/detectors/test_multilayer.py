"""ood_core/detectors/multilayer.py: MultiMahalanobis, LayerEnergy, LayerEnergyAggregate and the layer-column
validation they share, against plainly written references and pytorch-ood 0.4.0.

Agreement with pytorch-ood: MultiMahalanobis = 2N x pytorch-ood's (its covariance is not divided by N, its score
has a factor 1/2), Spearman >= 0.999.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ood_core.api import InvalidInputError, RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import (
    LayerEnergy, LayerEnergyAggregate, MultiMahalanobis, build_detector, fit_detector, get_spec, score_detector,
)
from ood_core.detectors.multilayer import signs_from_validation


# -- references -----------------------------------------------------------------------------------
def ref_maha(z_train, y_train, z_test):
    z_train, z_test, y_train = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64), np.asarray(y_train)
    keep = y_train >= 0
    z_train, y_train = z_train[keep], y_train[keep]
    n, d = z_train.shape
    means = {c: z_train[y_train == c].mean(axis=0) for c in sorted(set(y_train.tolist()))}
    cov = sum(np.outer(z_train[i] - means[y_train[i]], z_train[i] - means[y_train[i]]) for i in range(n)) / n
    cov += np.eye(d) * 1e-6 * np.trace(cov) / d
    prec = np.linalg.inv(cov)
    return np.array([min((x - m) @ prec @ (x - m) for m in means.values()) for x in z_test])


def ref_energy_of(col):
    col = np.asarray(col, np.float64)
    if col.ndim == 1:
        return col
    out = []
    for row in col.reshape(len(col), -1):
        m = row.max()
        out.append(-(m + math.log(np.exp(row - m).sum())))
    return np.array(out)


# -- data --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reps():
    g = torch.Generator().manual_seed(0)
    n, c = 90, 3
    y = torch.arange(n) % c
    m1, m2 = torch.randn(c, 6, generator=g) * 3, torch.randn(c, 4, 1, 1, generator=g) * 2
    l1 = m1[y] + torch.randn(n, 6, generator=g)
    l2 = torch.relu(m2[y] + torch.randn(n, 4, 3, 3, generator=g))
    e = torch.randn(n, generator=g) * 2 - 5.0
    logits = torch.nn.functional.one_hot(y, c).float() * 3 + torch.randn(n, c, generator=g)
    nt = 20
    yt = torch.arange(nt) % c
    test = {"l1": torch.cat([m1[yt[:10]] + torch.randn(10, 6, generator=g), 4 * torch.randn(10, 6, generator=g)]),
            "l2": torch.relu(torch.cat([m2[yt[:10]] + torch.randn(10, 4, 3, 3, generator=g),
                                        3 * torch.randn(10, 4, 3, 3, generator=g)])),
            "e": torch.randn(nt, generator=g) * 3 - 4.0,
            "logits": torch.randn(nt, c, generator=g) * 2}
    return dict(train={"l1": l1, "l2": l2, "e": e, "logits": logits}, y=y, test=test)


# -- MultiMahalanobis ----------------------------------------------------------------------------------
def test_multi_mahalanobis_matches_reference(reps):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = MultiMahalanobis(layers=["l1", "l2"], alpha=[0.5, 2.0]).fit_structured(tr, y)
    pooled = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    d1, d2 = ref_maha(tr["l1"], y, te["l1"]), ref_maha(pooled(tr["l2"]), y, pooled(te["l2"]))
    np.testing.assert_allclose(det.predict_per_layer(te).double().numpy(), np.stack([d1, d2], 1), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(det.predict_structured(te).double().numpy(), 0.5 * d1 + 2 * d2, rtol=1e-3, atol=1e-3)
    # OOD labels are ignored in fit
    y_ood = y.clone()
    y_ood[:9] = -1
    det2 = MultiMahalanobis(layers="l1").fit_structured(tr, y_ood)
    np.testing.assert_allclose(det2.predict_structured(te).double().numpy(), ref_maha(tr["l1"], y_ood, te["l1"]),
                               rtol=1e-3, atol=1e-3)


def test_multi_mahalanobis_vs_pytorch_ood(reps):
    pod = pytest.importorskip("pytorch_ood.detector")
    from scipy.stats import spearmanr

    tr, te, y = reps["train"], reps["test"], reps["y"]
    theirs = pod.MultiMahalanobis([nn.Identity(), nn.Identity()])
    theirs.fit_structured([tr["l1"], tr["l2"].mean(dim=(2, 3))], y)
    t = theirs.predict_structured([te["l1"], te["l2"]]).double().numpy()
    ours = MultiMahalanobis(layers=["l1", "l2"]).fit_structured(tr, y).predict_structured(te).double().numpy()
    assert spearmanr(ours, t).statistic >= 0.999
    np.testing.assert_allclose(ours, 2 * len(y) * t, rtol=2e-3, atol=1e-2)


def test_multi_mahalanobis_built_the_pytorch_ood_way():
    """``MultiMahalanobis(model, alpha)`` positionally, fit(loader) / predict(x) through the consecutive modules,
    and the list form of fit_structured / predict_structured, as pytorch-ood."""
    pod = pytest.importorskip("pytorch_ood.detector")
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Conv2d(4, 5, 3), nn.ReLU())]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(120, 3, 6, 6, generator=g), torch.arange(120) % 3
    x_test = torch.cat([torch.randn(20, 3, 6, 6, generator=g), 3 * torch.randn(20, 3, 6, 6, generator=g)])
    loader = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 120, 40)]
    with torch.no_grad():
        theirs = pod.MultiMahalanobis(modules, [1.0, 0.5])
        theirs.fit(loader)
        t = theirs.predict(x_test).double().numpy()
        ours = MultiMahalanobis(modules, [1.0, 0.5]).fit(loader)
        o = ours.predict(x_test).double().numpy()
        np.testing.assert_allclose(o, 2 * len(y) * t, rtol=2e-3, atol=1e-2)
        # the list form equals the dict form
        f1 = modules[0](x)
        f2 = modules[1](f1)
        t1 = modules[0](x_test)
        t2 = modules[1](t1)
        listed = MultiMahalanobis(None, [1.0, 0.5]).fit_structured([f1, f2], y).predict_structured([t1, t2])
        named = MultiMahalanobis(alpha=[1.0, 0.5], layers=["a", "b"]).fit_structured({"a": f1, "b": f2}, y)
        torch.testing.assert_close(listed, named.predict_structured({"a": t1, "b": t2}))
        torch.testing.assert_close(listed.double(), torch.as_tensor(o))


def test_alpha_has_one_weight_per_layer(reps):
    with pytest.raises(ParameterError, match=r"MultiMahalanobis: alpha=\[1.0\] must have 2 items \(L: the number"):
        MultiMahalanobis(layers=["a", "b"], alpha=[1.0])
    with pytest.raises(ParameterError, match=r"alpha=\[1.0, -1.0\] item 1 \(-1.0\) must be in \[0, inf\)"):
        MultiMahalanobis(layers=["a", "b"], alpha=[1.0, -1.0])
    # with pytorch-ood's list form the number of layers is known at fit: L checked there
    with pytest.raises(ParameterError, match=r"alpha=\[1.0\] must have 2 items \(L: the number of layers\)"):
        MultiMahalanobis(alpha=[1.0]).fit_structured([reps["train"]["l1"], reps["train"]["e"]], reps["y"])
    assert MultiMahalanobis.parameter_constraints["alpha"].structural is False


# -- LayerEnergy / LayerEnergyAggregate -------------------------------------------------------------------
def test_layer_energy(reps):
    te = reps["test"]
    np.testing.assert_allclose(LayerEnergy(layers=["l2"]).predict_structured(te).double().numpy(),
                               ref_energy_of(te["l2"]), rtol=1e-5)
    np.testing.assert_allclose(LayerEnergy("e", sign=-1).predict_structured(te).numpy(), -te["e"].numpy())
    np.testing.assert_allclose(LayerEnergy("logits").predict_structured(te).double().numpy(),
                               ref_energy_of(te["logits"]), rtol=1e-5)
    with pytest.raises(ParameterError, match=r"LayerEnergy: layers=\['e', 'l1'\] must have 1 items"):
        LayerEnergy(["e", "l1"])
    with pytest.raises(ParameterError, match="LayerEnergy: sign=2 must be 1 or -1"):
        LayerEnergy("e", sign=2)


def test_layer_energy_aggregate(reps):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = LayerEnergyAggregate(["e", "l2", "logits"], signs=[1, -1, 1]).fit_structured(tr, y)
    ref = np.zeros(20)
    for key, sign in zip(["e", "l2", "logits"], [1, -1, 1]):
        e_tr, e_te = ref_energy_of(tr[key]), ref_energy_of(te[key])
        ref += sign * (e_te - e_tr.mean()) / e_tr.std()
    np.testing.assert_allclose(det.predict_structured(te).double().numpy(), ref / 3, rtol=1e-4, atol=1e-5)
    with pytest.raises(ParameterError, match=r"signs=\[1, 0\] item 1 \(0\) must be 1 or -1"):
        LayerEnergyAggregate(["e", "l2"], signs=[1, 0])
    with pytest.raises(ParameterError, match=r"signs=\[1\] must have 2 items"):
        LayerEnergyAggregate(["e", "l2"], signs=[1])


def test_layer_energy_aggregate_signs_chosen_on_validation():
    g = torch.Generator().manual_seed(3)
    val_id = {"a": torch.randn(40, generator=g), "b": torch.randn(40, generator=g)}
    val_ood = {"a": torch.randn(40, generator=g) + 3, "b": torch.randn(40, generator=g) - 3}
    agg = LayerEnergyAggregate(["a", "b"]).fit_structured(val_id, torch.zeros(40))
    assert agg.uses_validation and agg.signs_ == [1.0, 1.0]
    assert agg.select_on_validation(val_id, val_ood) is None and agg.signs_ == [1.0, -1.0] and agg.signs is None
    assert signs_from_validation(torch.stack([val_id["a"], val_id["b"]], 1),
                                 torch.stack([val_ood["a"], val_ood["b"]], 1)) == [1, -1]
    s_id, s_ood = agg.predict_structured(val_id), agg.predict_structured(val_ood)
    assert (s_ood.mean() > s_id.mean() + 2).item()
    # signs given by the user are kept
    fixed = LayerEnergyAggregate(["a", "b"], signs=[1, 1]).fit_structured(val_id)
    fixed.select_on_validation(val_id, val_ood)
    assert fixed.signs_ == [1.0, 1.0]


# -- the shared column validation -----------------------------------------------------------------------
def _fitted_all(reps):
    tr, y = reps["train"], reps["y"]
    return [MultiMahalanobis(layers=["l1", "l2"]).fit_structured(tr, y), LayerEnergy(["l2"]),
            LayerEnergyAggregate(["e", "l1"]).fit_structured(tr, y)]


def test_batch_independence(reps):
    te = reps["test"]
    for det in _fitted_all(reps):
        full = det.predict_structured(te)
        parts = torch.cat([det.predict_structured({k: v[i:i + 6] for k, v in te.items()}) for i in range(0, 20, 6)])
        torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)


def test_invalid_inputs_name_the_detector_and_the_column(reps):
    te = reps["test"]
    for det in _fitted_all(reps):
        name = type(det).__name__
        with pytest.raises(InvalidInputError, match=f"{name}: needs the column"):
            det.predict_structured({"logits": te["logits"]})
        with pytest.raises(InvalidInputError, match=f"{name}: reps must be a dict"):
            det.predict_structured(te["l1"])
        for key in det.layers:
            bad = {**te, key: te[key].clone()}
            bad[key].view(-1)[3] = float("nan")
            with pytest.raises(InvalidInputError, match=f"{name}: column '{key}' contains NaN"):
                det.predict_structured(bad)
    maha, _, agg = _fitted_all(reps)
    with pytest.raises(InvalidInputError, match="MultiMahalanobis: columns .* different row counts"):
        maha.predict_structured({**te, "l2": te["l2"][:5]})
    with pytest.raises(InvalidInputError, match="MultiMahalanobis: column 'l1' has width 3, but the detector was fitted "
                                                "for width 6"):
        maha.predict_structured({**te, "l1": te["l1"][:, :3]})
    with pytest.raises(InvalidInputError, match="LayerEnergyAggregate: column 'e' must have at least one dimension"):
        agg.predict_structured({**te, "e": torch.tensor(1.0)})
    for cls, layers in ((MultiMahalanobis, ["l1"]), (LayerEnergyAggregate, ["e"])):
        with pytest.raises(RequiresFitException, match=cls.__name__):
            cls(layers=layers).predict_structured(te)
    with pytest.raises(InvalidInputError, match="MultiMahalanobis: no in-distribution"):
        MultiMahalanobis(layers=["l1"]).fit_structured(reps["train"], -torch.ones(90))
    with pytest.raises(InvalidInputError, match="MultiMahalanobis: give layers="):
        MultiMahalanobis().fit_structured(reps["train"], reps["y"])
    with pytest.raises(ParameterError, match=r"MultiMahalanobis: layers=\[\] must have at least 1"):
        MultiMahalanobis(layers=[])
    with pytest.raises(ParameterError, match="must not name a column twice"):
        LayerEnergyAggregate(layers=["e", "e"])


def test_constant_and_duplicated_inputs_are_finite():
    n = 30
    y = torch.arange(n) % 3
    for make in (torch.zeros, torch.ones):
        reps = {"a": make(n, 4), "b": make(n, 2, 3, 3), "e": make(n)}
        dup = {"a": torch.randn(1, 4).repeat(n, 1), "b": torch.rand(1, 2, 3, 3).repeat(n, 1, 1, 1),
               "e": torch.full((n,), 2.0)}
        for r in (reps, dup):
            for det in (MultiMahalanobis(layers=["a", "b"]), LayerEnergyAggregate(["e", "b"])):
                det.fit_structured(r, y)
                s = det.predict_structured({k: torch.cat([v, 5 + v]) for k, v in r.items()})
                assert s.shape == (2 * n,) and torch.isfinite(s).all(), type(det).__name__


def test_registry_dispatch_with_numpy_reps(reps):
    train = {k: v.numpy() for k, v in reps["train"].items()}
    for name, params in (("MultiMahalanobis", {"layers": ["l1", "l2"]}), ("LayerEnergy", {"layers": ["e"], "sign": -1}),
                         ("LayerEnergyAggregate", {"layers": ["e", "l2"]})):
        assert get_spec(name).representation == "layers"
        det = build_detector(name, params)
        assert fit_detector(det, train, reps["y"].numpy()) is det
        s = score_detector(det, train)
        assert s.shape == (90,) and torch.isfinite(s).all()
        torch.testing.assert_close(s, det.predict_structured(reps["train"]))


def test_to_device_moves_state(reps):
    maha, _, agg = _fitted_all(reps)
    maha.to("meta")
    assert all(g.device.type == "meta" for g in maha.gaussians)
    assert agg.to("meta").mean_.device.type == "meta" and agg.std_.device.type == "meta"
