"""ood_core/detectors/gram.py: Gram against plainly written references of the authors' code (variant "paper") and
of pytorch-ood's reading (variant "pytorch-ood"), and against pytorch-ood 0.4.0 itself (equal up to float32 with
``torch.manual_seed(seed)`` before its fit, so that the 10 % hold-outs coincide)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import ood_core.detectors.gram as gram_module
from ood_core.api import InvalidInputError, ModelNotSetException, RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import Gram, build_detector, fit_detector, score_detector


# -- references ------------------------------------------------------------------------------------
def ref_gram_stats(sample, powers):
    """One sample's map (C, ...): row sums of the p-th order Gram matrix, sign(r) |r|^(1/p), by matrix product."""
    f = np.asarray(sample, np.float64).reshape(sample.shape[0], -1)
    out = np.zeros((f.shape[0], len(powers)))
    for j, p in enumerate(powers):
        fp = f**p
        gram = fp @ fp.T
        for i in range(f.shape[0]):
            r = gram[i].sum()
            out[i, j] = math.copysign(abs(r) ** (1.0 / p), r)
    return out


def ref_softmax(logits):
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_gram(layers_train, group, layers_test, pred_test, powers, holdout, seed, conf_train=None, conf_test=None):
    """Ranges per ``group`` (true or predicted class) on the rows not held out (seeded torch.randperm per group,
    in sorted order), expected deviation per layer on the held-out rows, score = sum of layer deviations against
    the ranges of the predicted class over the expected deviation; with ``conf_*``, every deviation is divided
    by the max softmax probability (the authors' code)."""
    group = np.asarray(group)
    n_train = len(group)
    conf_train = np.ones(n_train) if conf_train is None else conf_train
    conf_test = np.ones(len(pred_test)) if conf_test is None else conf_test
    gen = torch.Generator().manual_seed(seed)
    train_rows, val_rows = [], []
    for c in sorted(set(group[group >= 0].tolist())):
        rows = np.nonzero(group == c)[0]
        perm = torch.randperm(len(rows), generator=gen).numpy()
        n_val = int(holdout * len(rows))
        val_rows += list(rows[perm[:n_val]])
        train_rows += list(rows[perm[n_val:]])
    total = np.zeros(len(pred_test))
    for tr, te in zip(layers_train, layers_test):
        stats = [ref_gram_stats(s, powers) for s in np.asarray(tr, np.float64)]
        lo, hi = {}, {}
        for i in train_rows:
            c = int(group[i])
            lo[c] = stats[i] if c not in lo else np.minimum(lo[c], stats[i])
            hi[c] = stats[i] if c not in hi else np.maximum(hi[c], stats[i])
        lo_all, hi_all = np.min(list(lo.values()), axis=0), np.max(list(hi.values()), axis=0)

        def dev(s, c):
            low, high = lo.get(c, lo_all), hi.get(c, hi_all)
            return float((np.maximum(low - s, 0) / np.abs(low + 1e-6)).sum()
                         + (np.maximum(s - high, 0) / np.abs(high + 1e-6)).sum())

        vals = [dev(stats[i], int(group[i])) / conf_train[i] for i in val_rows]
        norm = np.mean(vals) if vals and np.mean(vals) > 0 else 1.0
        for k, s in enumerate(np.asarray(te, np.float64)):
            total[k] += dev(ref_gram_stats(s, powers), int(pred_test[k])) / conf_test[k] / norm
    return total


# -- data ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reps():
    g = torch.Generator().manual_seed(0)
    n, c = 90, 3
    y = torch.arange(n) % c
    m1, m2 = torch.randn(c, 6, generator=g) * 3, torch.randn(c, 4, 1, 1, generator=g) * 2
    logits = torch.nn.functional.one_hot(y, c).float() * 2 + torch.randn(n, c, generator=g)  # some mistakes
    train = {"l1": m1[y] + torch.randn(n, 6, generator=g),
             "l2": torch.relu(m2[y] + torch.randn(n, 4, 3, 3, generator=g)), "logits": logits}
    nt = 20
    yt = torch.arange(nt) % c
    test = {"l1": torch.cat([m1[yt[:10]] + torch.randn(10, 6, generator=g), 4 * torch.randn(10, 6, generator=g)]),
            "l2": torch.relu(torch.cat([m2[yt[:10]] + torch.randn(10, 4, 3, 3, generator=g),
                                        3 * torch.randn(10, 4, 3, 3, generator=g)])),
            "logits": torch.randn(nt, c, generator=g) * 2}
    return dict(train=train, y=y, test=test)


@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_paper_variant_matches_the_authors_code(reps, holdout):
    """Ranges per predicted class, every deviation divided by the max softmax probability."""
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = Gram(layers=["l1", "l2"], powers=3, holdout=holdout, seed=7).fit_structured(tr, y)
    p_tr, p_te = ref_softmax(tr["logits"]), ref_softmax(te["logits"])
    assert (p_tr.argmax(1) != y.numpy()).any()  # predicted classes differ from the labels somewhere
    ref = ref_gram([tr["l1"][:, :, None], tr["l2"]], p_tr.argmax(1), [te["l1"][:, :, None], te["l2"]], p_te.argmax(1),
                   [1, 2, 3], holdout, 7, conf_train=p_tr.max(1), conf_test=p_te.max(1))
    np.testing.assert_allclose(det.predict_structured(te).numpy(), ref, rtol=1e-6, atol=1e-8)
    other = Gram(layers=["l1", "l2"], powers=3, holdout=holdout, seed=7, variant="pytorch-ood").fit_structured(tr, y)
    assert not np.allclose(other.predict_structured(te).numpy(), ref, rtol=1e-2)
    # labels are only used to leave out rows < 0: the paper variant needs none
    torch.testing.assert_close(Gram(layers=["l1", "l2"], powers=3, holdout=holdout, seed=7).fit_structured(tr)
                               .predict_structured(te), det.predict_structured(te))


@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_pytorch_ood_variant_matches_reference(reps, holdout):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = Gram(layers=["l1", "l2"], powers=3, holdout=holdout, seed=7, variant="pytorch-ood").fit_structured(tr, y)
    pred = te["logits"].argmax(1).numpy()
    ref = ref_gram([tr["l1"][:, :, None], tr["l2"]], y, [te["l1"][:, :, None], te["l2"]], pred, [1, 2, 3], holdout, 7)
    np.testing.assert_allclose(det.predict_structured(te).numpy(), ref, rtol=1e-6, atol=1e-8)


def test_labels_below_zero_are_left_out(reps):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    y_ood = y.clone()
    y_ood[:12] = -1
    det = Gram(layers=["l2"], powers=2, variant="pytorch-ood").fit_structured(tr, y_ood)
    kept = {k: v[12:] for k, v in tr.items()}
    ref = Gram(layers=["l2"], powers=2, variant="pytorch-ood").fit_structured(kept, y[12:])
    torch.testing.assert_close(det.predict_structured(te), ref.predict_structured(te))


def test_chunking_is_exact(reps, monkeypatch):
    tr, te, y = {k: v[:30] for k, v in reps["train"].items()}, reps["test"], reps["y"][:30]
    full = Gram(layers=["l2"], powers=4).fit_structured(tr, y)
    monkeypatch.setattr(gram_module, "CHUNK_ELEMENTS", 80)  # 2 rows of 4 x 9 per chunk
    chunked = Gram(layers=["l2"], powers=4).fit_structured(tr, y)
    torch.testing.assert_close(chunked.mins_[0], full.mins_[0])
    torch.testing.assert_close(chunked.predict_structured(te), full.predict_structured(te))


def _pod_setup():
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 3, 5, 5, generator=g)
    y = torch.arange(90) % 3
    x_test = torch.cat([torch.randn(20, 3, 5, 5, generator=g), 3 * torch.randn(20, 3, 5, 5, generator=g)])

    def reps_of(inp):
        with torch.no_grad():
            f1 = layers[0](inp)
            f2 = layers[1](f1)
            return {"a": f1, "b": f2, "logits": head(f2)}

    return layers, head, x, y, x_test, reps_of


def test_pytorch_ood_variant_vs_pytorch_ood():
    pod = pytest.importorskip("pytorch_ood.detector")
    from scipy.stats import spearmanr

    layers, head, x, y, x_test, reps_of = _pod_setup()
    theirs = pod.Gram(head=head, feature_layers=layers, num_classes=3, num_poles_list=[1, 2, 3])
    torch.manual_seed(5)
    theirs.fit([(x, y)])
    t = theirs.predict(x_test).double().numpy()
    ours = Gram(layers=["a", "b"], powers=3, seed=5, variant="pytorch-ood").fit_structured(reps_of(x), y)
    torch.testing.assert_close(ours.layer_norm_.float(), theirs.layer_norm.float(), rtol=1e-4, atol=1e-6)
    o = ours.predict_structured(reps_of(x_test)).numpy()
    assert spearmanr(o, t).statistic >= 0.999
    np.testing.assert_allclose(o, t, rtol=1e-3, atol=1e-4)


def test_built_the_pytorch_ood_way():
    """``Gram(head, feature_layers, num_classes, num_poles_list)`` positionally and by keyword, fit(loader) /
    predict(x) and predict_structured(logits, feature_list): the scores of pytorch-ood (variant "pytorch-ood")
    and of our reps form."""
    pod = pytest.importorskip("pytorch_ood.detector")
    layers, head, x, y, x_test, reps_of = _pod_setup()
    loader = [(x[:45], y[:45]), (x[45:], y[45:])]
    theirs = pod.Gram(head, layers, 3, [1, 2, 3])
    torch.manual_seed(5)
    theirs.fit(loader)
    t = theirs.predict(x_test)
    ours = Gram(head, layers, 3, [1, 2, 3], seed=5, variant="pytorch-ood").fit(loader)
    torch.testing.assert_close(ours.predict(x_test).float(), t, rtol=1e-3, atol=1e-4)
    keyword = Gram(head=head, feature_layers=layers, num_classes=3, num_poles_list=[1, 2, 3], seed=5,
                   variant="pytorch-ood").fit(loader)
    torch.testing.assert_close(keyword.predict(x_test), ours.predict(x_test))
    r = reps_of(x_test)
    torch.testing.assert_close(ours.predict_structured(r["logits"], [r["a"], r["b"]]), ours.predict(x_test))
    # the paper variant (our default) on the same data: the model path equals the reps path
    paper = Gram(head, layers, 3, [1, 2, 3], seed=5).fit(loader)
    named = Gram(powers=[1, 2, 3], layers=["a", "b"], seed=5).fit_structured(reps_of(x), y)
    torch.testing.assert_close(paper.predict(x_test), named.predict_structured(r))
    with pytest.raises(InvalidInputError, match="Gram: num_classes=4, but the logits have 3 columns"):
        Gram(head, layers, 4).fit(loader)
    with pytest.raises(ModelNotSetException, match="Gram: fit"):
        Gram(layers=["a"]).fit(loader)


def test_declared_constraints():
    with pytest.raises(ParameterError, match="Gram: variant='paperr' must be one of 'paper', 'pytorch-ood'"):
        Gram(layers=["a"], variant="paperr")
    with pytest.raises(ParameterError, match=r"Gram: powers=0 must be in \[1, inf\)"):
        Gram(layers=["a"], powers=0)
    with pytest.raises(ParameterError, match=r"Gram: powers=\[1, 0\] item 1 \(0\) must be in \[1, inf\)"):
        Gram(layers=["a"], num_poles_list=[1, 0])
    with pytest.raises(ParameterError, match=r"Gram: holdout=1.0 must be in \[0, 1\)"):
        Gram(layers=["a"], holdout=1.0)
    assert all(p.structural for p in Gram.parameter_constraints.values())


def test_invalid_inputs(reps):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = Gram(layers=["l1", "l2"], powers=2).fit_structured(tr, y)
    with pytest.raises(InvalidInputError, match="Gram: needs the column 'logits'"):
        Gram(layers=["l1"]).fit_structured({"l1": tr["l1"]}, y)
    with pytest.raises(InvalidInputError, match="Gram: no in-distribution"):
        Gram(layers=["l1"]).fit_structured(tr, -torch.ones(90))
    with pytest.raises(InvalidInputError, match="Gram: labels go up to 5, but the logits have 3 classes"):
        Gram(layers=["l1"], variant="pytorch-ood").fit_structured(tr, torch.full((90,), 5))
    with pytest.raises(InvalidInputError, match="Gram: columns .* different row counts"):
        det.predict_structured({**te, "logits": te["logits"][:5]})
    with pytest.raises(InvalidInputError, match="Gram: column 'logits' has width 4"):
        det.predict_structured({**te, "logits": torch.randn(20, 4)})
    with pytest.raises(InvalidInputError, match="Gram: column 'l2' has width 3"):
        det.predict_structured({**te, "l2": te["l2"][:, :3]})
    bad = {**te, "l2": te["l2"].clone()}
    bad["l2"][0, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidInputError, match="Gram: column 'l2' contains NaN or inf"):
        det.predict_structured(bad)
    with pytest.raises(RequiresFitException, match="Gram"):
        Gram(layers=["l1"]).predict_structured(te)


def test_batch_independence_constant_inputs_and_registry(reps):
    tr, te, y = reps["train"], reps["test"], reps["y"]
    det = Gram(layers=["l1", "l2"]).fit_structured(tr, y)
    full = det.predict_structured(te)
    parts = torch.cat([det.predict_structured({k: v[i:i + 6] for k, v in te.items()}) for i in range(0, 20, 6)])
    torch.testing.assert_close(parts, full)
    n = 30
    for r in ({"a": torch.zeros(n, 4), "b": torch.zeros(n, 2, 3, 3), "logits": torch.zeros(n, 3)},
              {"a": torch.randn(1, 4).repeat(n, 1), "b": torch.rand(1, 2, 3, 3).repeat(n, 1, 1, 1),
               "logits": torch.randn(1, 3).repeat(n, 1)}):
        for variant in ("paper", "pytorch-ood"):
            s = Gram(layers=["a", "b"], variant=variant).fit_structured(r, torch.arange(n) % 3)
            s = s.predict_structured({k: torch.cat([v, 5 + v]) for k, v in r.items()})
            assert s.shape == (2 * n,) and torch.isfinite(s).all()
    built = build_detector("Gram", {"layers": ["l2"], "powers": 2})
    assert fit_detector(built, {k: v.numpy() for k, v in tr.items()}, y.numpy()) is built
    torch.testing.assert_close(score_detector(built, te), built.predict_structured(te))
    det.to("meta")
    assert det.mins_[0].device.type == "meta" and det.layer_norm_.device.type == "meta"
