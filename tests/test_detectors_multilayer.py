"""Layer detectors (MultiMahalanobis, LayerEnergy, LayerEnergyAggregate, Gram, NAC-UE on states) vs
plainly written references and pytorch-ood 0.4.0.

Agreement with pytorch-ood: MultiMahalanobis = 2N x pytorch-ood's (its covariance is not divided by N,
its score has a factor 1/2), Spearman >= 0.999; Gram (powers [1, 2, 3], torch.manual_seed(seed) before
its fit so the 10 % hold-outs coincide): equal up to float32, Spearman >= 0.999.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ood_core.detectors.gram as gram_module
from ood_core.api import DetectorError, InvalidInputError, RequiresFitException
from ood_core.detectors import (
    NACUE, Gram, LayerEnergy, LayerEnergyAggregate, MultiMahalanobis, build_detector, fit_detector, get_spec,
    score_detector,
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


def ref_gram_stats(sample, powers):
    f = np.asarray(sample, np.float64).reshape(sample.shape[0], -1)
    out = np.zeros((f.shape[0], len(powers)))
    for j, p in enumerate(powers):
        fp = f**p
        gram = fp @ fp.T
        for i in range(f.shape[0]):
            r = gram[i].sum()
            out[i, j] = math.copysign(abs(r) ** (1.0 / p), r)
    return out


def ref_gram(layers_train, y, layers_test, pred_test, powers, holdout, seed):
    y = np.asarray(y)
    gen = torch.Generator().manual_seed(seed)
    train_rows, val_rows = [], []
    for c in sorted(set(y[y >= 0].tolist())):
        rows = np.nonzero(y == c)[0]
        perm = torch.randperm(len(rows), generator=gen).numpy()
        n_val = int(holdout * len(rows))
        val_rows += list(rows[perm[:n_val]])
        train_rows += list(rows[perm[n_val:]])
    total = np.zeros(len(pred_test))
    for tr, te in zip(layers_train, layers_test):
        stats = [ref_gram_stats(s, powers) for s in np.asarray(tr, np.float64)]
        lo, hi = {}, {}
        for i in train_rows:
            c = int(y[i])
            lo[c] = stats[i] if c not in lo else np.minimum(lo[c], stats[i])
            hi[c] = stats[i] if c not in hi else np.maximum(hi[c], stats[i])

        def dev(s, c):
            return float((np.maximum(lo[c] - s, 0) / np.abs(lo[c] + 1e-6)).sum()
                         + (np.maximum(s - hi[c], 0) / np.abs(hi[c] + 1e-6)).sum())

        vals = [dev(stats[i], int(y[i])) for i in val_rows]
        norm = np.mean(vals) if vals and np.mean(vals) > 0 else 1.0
        for k, s in enumerate(np.asarray(te, np.float64)):
            total[k] += dev(ref_gram_stats(s, powers), int(pred_test[k])) / norm
    return total


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


def test_multi_mahalanobis_matches_reference(reps):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = MultiMahalanobis(layers=["l1", "l2"], alpha=[0.5, 2.0]).fit_structured(tr, y)
    l2_pooled = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    d1 = ref_maha(tr["l1"], y, te["l1"])
    d2 = ref_maha(l2_pooled(tr["l2"]), y, l2_pooled(te["l2"]))
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
    theirs = pod.MultiMahalanobis([torch.nn.Identity(), torch.nn.Identity()])
    theirs.fit_structured([tr["l1"], tr["l2"].mean(dim=(2, 3))], y)
    t = theirs.predict_structured([te["l1"], te["l2"]]).double().numpy()
    ours = MultiMahalanobis(layers=["l1", "l2"]).fit_structured(tr, y).predict_structured(te).double().numpy()
    assert spearmanr(ours, t).statistic >= 0.999
    np.testing.assert_allclose(ours, 2 * len(y) * t, rtol=2e-3, atol=1e-2)


def test_layer_energy(reps):
    te = reps["test"]
    det = LayerEnergy(layers=["l2"])
    np.testing.assert_allclose(det.predict_structured(te).double().numpy(), ref_energy_of(te["l2"]), rtol=1e-5)
    np.testing.assert_allclose(LayerEnergy("e", sign=-1).predict_structured(te).numpy(), -te["e"].numpy())
    per = LayerEnergy(["e", "l1", "logits"]).predict_per_layer(te)
    assert per.shape == (20, 3)
    np.testing.assert_allclose(per[:, 2].double().numpy(), ref_energy_of(te["logits"]), rtol=1e-5)
    with pytest.raises(DetectorError, match="LayerEnergy: predict_structured scores one layer"):
        LayerEnergy(["e", "l1"]).predict_structured(te)
    with pytest.raises(ValueError, match="LayerEnergy: sign"):
        LayerEnergy("e", sign=2)


def test_layer_energy_aggregate(reps):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = LayerEnergyAggregate(["e", "l2", "logits"], signs=[1, -1, 1]).fit_structured(tr, y)
    ref = np.zeros(20)
    for key, sign in zip(["e", "l2", "logits"], [1, -1, 1]):
        e_tr, e_te = ref_energy_of(tr[key]), ref_energy_of(te[key])
        ref += sign * (e_te - e_tr.mean()) / e_tr.std()
    np.testing.assert_allclose(det.predict_structured(te).double().numpy(), ref / 3, rtol=1e-4, atol=1e-5)
    # signs are chosen on validation data: a layer whose energy is lower on OOD gets -1
    g = torch.Generator().manual_seed(3)
    val_id = {"a": torch.randn(40, generator=g), "b": torch.randn(40, generator=g)}
    val_ood = {"a": torch.randn(40, generator=g) + 3, "b": torch.randn(40, generator=g) - 3}
    agg = LayerEnergyAggregate(["a", "b"]).fit_structured(val_id, torch.zeros(40))
    assert agg.select_signs(val_id, val_ood) == [1, -1] and agg.signs == [1.0, -1.0]
    assert signs_from_validation(torch.stack([val_id["a"], val_id["b"]], 1),
                                 torch.stack([val_ood["a"], val_ood["b"]], 1)) == [1, -1]
    s_id, s_ood = agg.predict_structured(val_id), agg.predict_structured(val_ood)
    assert (s_ood.mean() > s_id.mean() + 2).item()


@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_gram_matches_reference(reps, holdout):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = Gram(layers=["l1", "l2"], powers=3, holdout=holdout, seed=7).fit_structured(tr, y)
    pred = te["logits"].argmax(1).numpy()
    ref = ref_gram([tr["l1"][:, :, None], tr["l2"]], y, [te["l1"][:, :, None], te["l2"]], pred, [1, 2, 3], holdout, 7)
    np.testing.assert_allclose(det.predict_structured(te).numpy(), ref, rtol=1e-6, atol=1e-8)


def test_gram_chunking_is_exact(reps, monkeypatch):
    tr, te, y = {k: v[:30] for k, v in reps["train"].items()}, reps["test"], reps["y"][:30]
    full = Gram(["l2"], powers=4).fit_structured(tr, y)
    monkeypatch.setattr(gram_module, "CHUNK_ELEMENTS", 80)  # 2 rows of 4 x 9 per chunk
    chunked = Gram(["l2"], powers=4).fit_structured(tr, y)
    torch.testing.assert_close(chunked.mins[0], full.mins[0])
    torch.testing.assert_close(chunked.predict_structured(te), full.predict_structured(te))


def test_gram_vs_pytorch_ood():
    pod = pytest.importorskip("pytorch_ood.detector")
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()),
              torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU())]
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 3, 5, 5, generator=g)
    y = torch.arange(90) % 3
    x_test = torch.cat([torch.randn(20, 3, 5, 5, generator=g), 3 * torch.randn(20, 3, 5, 5, generator=g)])

    def reps_of(inp):
        with torch.no_grad():
            f1 = layers[0](inp)
            f2 = layers[1](f1)
            return {"a": f1, "b": f2, "logits": head(f2)}

    theirs = pod.Gram(head=head, feature_layers=layers, num_classes=3, num_poles_list=[1, 2, 3])
    torch.manual_seed(5)
    theirs.fit([(x, y)])
    t = theirs.predict(x_test).double().numpy()
    ours = Gram(["a", "b"], powers=3, seed=5).fit_structured(reps_of(x), y)
    torch.testing.assert_close(ours.layer_norm.float(), theirs.layer_norm.float(), rtol=1e-4, atol=1e-6)
    o = ours.predict_structured(reps_of(x_test)).numpy()
    assert spearmanr(o, t).statistic >= 0.999
    np.testing.assert_allclose(o, t, rtol=1e-3, atol=1e-4)


def test_nacue_states_reference():
    g = torch.Generator().manual_seed(2)
    states = {"s1": torch.randn(50, 5, generator=g) * 0.02, "s2": torch.randn(50, 3, generator=g) * 0.05}
    y = torch.zeros(50, dtype=torch.long)
    y[:5] = -1
    det = NACUE(layers=["s1", "s2"], m_bins=10, alpha=[50.0, 20.0], o_star=4).fit_structured(states, y)
    test = {"s1": torch.randn(12, 5, generator=g) * 0.05, "s2": torch.randn(12, 3, generator=g) * 0.1}

    def bin_of(p, m, eps=1e-6):
        p = min(max(p, eps), 1 - eps)
        edges = list(np.logspace(math.log10(eps), math.log10(0.5), m // 2 + 1))
        edges += [1 - v for v in np.logspace(math.log10(0.5), math.log10(eps), m - m // 2 + 1)][1:]
        below = sum(1 for e in edges if e < p)  # bin i covers (edges[i], edges[i + 1]]
        return min(max(below - 1, 0), m - 1)

    ref = np.zeros(12)
    for key, alpha in (("s1", 50.0), ("s2", 20.0)):
        train = states[key][5:].double().numpy()
        n_neur = train.shape[1]
        counts = np.zeros((n_neur, 10))
        for row in train:
            for j in range(n_neur):
                counts[j, bin_of(1 / (1 + math.exp(-alpha * row[j])), 10)] += 1
        for k, row in enumerate(test[key].double().numpy()):
            cov = [min(counts[j, bin_of(1 / (1 + math.exp(-alpha * row[j])), 10)] / 4, 1.0) for j in range(n_neur)]
            ref[k] -= np.mean(cov)
    np.testing.assert_allclose(det.predict_structured(test).numpy(), ref, rtol=1e-6)
    assert int(det.counts[0].sum()) == 45 * 5


# -- robustness, batch independence, registry ------------------------------------------------------------
def _fitted_all(reps):
    tr, y = reps["train"], reps["y"]
    return [MultiMahalanobis(["l1", "l2"]).fit_structured(tr, y), LayerEnergy(["l2"]),
            LayerEnergyAggregate(["e", "l1"]).fit_structured(tr, y), Gram(["l1", "l2"]).fit_structured(tr, y)]


def test_batch_independence(reps):
    te = reps["test"]
    for det in _fitted_all(reps):
        full = det.predict_structured(te)
        parts = torch.cat([det.predict_structured({k: v[i:i + 6] for k, v in te.items()}) for i in range(0, 20, 6)])
        torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)


def test_invalid_inputs_and_fit_order(reps):
    te = reps["test"]
    for det in _fitted_all(reps):
        name = type(det).__name__
        with pytest.raises(InvalidInputError, match=f"{name}: needs the column"):
            det.predict_structured({"logits": te["logits"]})
        for key in ("l1", "l2", "e"):
            if key in det.layers:
                bad = dict(te)
                bad[key] = te[key].clone()
                bad[key].view(-1)[3] = float("nan")
                with pytest.raises(InvalidInputError, match=name):
                    det.predict_structured(bad)
                if len(det.layers) > 1 or isinstance(det, Gram):  # Gram also reads "logits"
                    with pytest.raises(InvalidInputError, match="row counts"):
                        det.predict_structured({**te, key: te[key][:5]})
    for cls, layers in ((MultiMahalanobis, ["l1"]), (LayerEnergyAggregate, ["e"]), (Gram, ["l2"]),
                        (NACUE, ["l1"])):
        with pytest.raises(RequiresFitException, match=cls.__name__):
            cls(layers=layers).predict_structured(te)
    with pytest.raises(InvalidInputError, match="MultiMahalanobis: layer 'l1'.*dimension"):
        _fitted_all(reps)[0].predict_structured({**te, "l1": te["l1"][:, :3]})
    with pytest.raises(InvalidInputError, match="Gram: needs the column 'logits'"):
        Gram(["l1"]).fit_structured({"l1": reps["train"]["l1"]}, reps["y"])
    with pytest.raises(InvalidInputError, match="no in-distribution"):
        Gram(["l1"]).fit_structured(reps["train"], -torch.ones(90))
    with pytest.raises(ValueError, match="MultiMahalanobis: layers"):
        MultiMahalanobis(layers=[])
    with pytest.raises(ValueError, match="one value per layer"):
        MultiMahalanobis(layers=["a", "b"], alpha=[1.0])


def test_constant_and_duplicated_inputs_are_finite():
    n = 30
    y = torch.arange(n) % 3
    for make in (torch.zeros, torch.ones):
        reps = {"a": make(n, 4), "b": make(n, 2, 3, 3), "e": make(n), "logits": make(n, 3)}
        dup = {"a": torch.randn(1, 4).repeat(n, 1), "b": torch.rand(1, 2, 3, 3).repeat(n, 1, 1, 1),
               "e": torch.full((n,), 2.0), "logits": torch.randn(1, 3).repeat(n, 1)}
        for r in (reps, dup):
            for det in (MultiMahalanobis(["a", "b"]), LayerEnergyAggregate(["e", "b"]), Gram(["a", "b"]),
                        NACUE(layers=["a"])):
                det.fit_structured(r, y)
                s = det.predict_structured({k: torch.cat([v, 5 + v]) for k, v in r.items()})
                assert s.shape == (2 * n,) and torch.isfinite(s).all(), type(det).__name__


def test_registry_dispatch_with_numpy_reps(reps):
    for name in ("MultiMahalanobis", "LayerEnergy", "LayerEnergyAggregate", "Gram"):
        assert get_spec(name).representation == "layers"
    assert get_spec("NACUE").representation == "model"
    train = {k: v.numpy() for k, v in reps["train"].items()}
    for name, params in (("MultiMahalanobis", {"layers": ["l1", "l2"]}), ("LayerEnergy", {"layers": ["e"], "sign": -1}),
                         ("LayerEnergyAggregate", {"layers": ["e", "l2"]}), ("Gram", {"layers": ["l2"], "powers": 2})):
        det = build_detector(name, params)
        fit_detector(det, train, reps["y"].numpy())
        s = score_detector(det, train)
        assert s.shape == (90,) and torch.isfinite(s).all()
        torch.testing.assert_close(s, det.predict_structured(reps["train"]))


def test_to_device_moves_state(reps):
    maha, _, agg, gram = _fitted_all(reps)
    assert maha.to("meta").device.type == "meta" and maha.gaussians[1].whitener.device.type == "meta"
    assert agg.to("meta").mean.device.type == "meta"
    gram.to("meta")
    assert gram.mins[0].device.type == "meta" and gram.layer_norm.device.type == "meta"
