"""KNN and NNGuide vs plainly written references (numpy float64, loops) and vs pytorch-ood 0.4.0; their
constructors (pytorch-ood's positional order and names), data-relative bounds and search spaces."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

from ood_core.api import RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import KNN, NNGuide

from .agreement import agree as _agree


# -- references (loops, numpy float64) -------------------------------------------------------------
def ref_knn(z_train, z_test, k, normalize=True):
    z_train, z_test = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)
    if normalize:
        z_train = z_train / np.maximum(np.linalg.norm(z_train, axis=1, keepdims=True), 1e-12)
        z_test = z_test / np.maximum(np.linalg.norm(z_test, axis=1, keepdims=True), 1e-12)
    scores = []
    for q in z_test:
        dists = sorted(float(np.sqrt(((q - t) ** 2).sum())) for t in z_train)
        scores.append(dists[k - 1])
    return np.array(scores)


def ref_nnguide(z, w, b, test, k):
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    bank = [x / np.linalg.norm(x) * logsumexp(w @ x + b) for x in np.asarray(z, np.float64)]
    out = []
    for x in np.asarray(test, np.float64):
        sims = sorted((x / np.linalg.norm(x) @ v for v in bank), reverse=True)
        out.append(-np.mean(sims[:k]) * logsumexp(w @ x + b))
    return np.array(out)


# -- data ---------------------------------------------------------------------------------------------


def _auroc(id_s, ood_s):
    return float((ood_s[:, None] > id_s[None, :]).double().mean())


# -- KNN: the formula ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k,normalize", [(1, True), (5, True), (17, False), (900, True)])
def test_knn_matches_reference(data, k, normalize):
    test = data["z_test"][::10]
    got = KNN(k=k, normalize=normalize).fit_features(data["z"], data["y"]).predict_features(test)
    np.testing.assert_allclose(got.double().numpy(), ref_knn(data["z"], test, k, normalize), rtol=1e-5, atol=1e-6)


def test_knn_float64_features_give_float64_scores(data):
    test = data["z_test"][::10]
    got = KNN(k=3).fit_features(data["z"].double(), data["y"]).predict_features(test.double())
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_knn(data["z"], test, 3), rtol=1e-12)


def test_knn_far_ood_scores_higher(data):
    det = KNN(k=5).fit_features(data["z"], data["y"])
    assert _auroc(det.predict_features(data["z_test"][:150]), det.predict_features(data["z_test"][150:])) > 0.9


def test_knn_near_duplicates_batch_independent(data):
    g = torch.Generator().manual_seed(1)
    z = torch.cat([data["z"], data["z"][:1].repeat(40, 1) + 1e-5 * torch.randn(40, 48, generator=g)])
    test = torch.cat([data["z"][:1] + 3e-6 * torch.randn(5, 48, generator=g), data["z_test"][:5]])
    det = KNN(k=3, normalize=False).fit_features(z, torch.zeros(len(z), dtype=torch.long))
    batch = det.predict_features(test)
    single = torch.cat([det.predict_features(test[i : i + 1]) for i in range(len(test))])
    torch.testing.assert_close(single, batch, rtol=0, atol=0)
    np.testing.assert_allclose(batch.double().numpy(), ref_knn(z, test, 3, normalize=False), rtol=1e-5)


def test_knn_fit_through_the_model_ood_labels_ignored_and_device_moves(data):
    z, y = data["z"], data["y"]
    direct = KNN(k=5).fit_features(z, y).predict_features(data["z_test"])
    loader = [(z[i : i + 100], y[i : i + 100]) for i in range(0, len(z), 100)]
    loader.append((10 * z[:50], -torch.ones(50, dtype=torch.long)))  # auxiliary outliers: not ID, ignored
    det = KNN(nn.Identity(), k=5).fit(loader)
    torch.testing.assert_close(det.predict(data["z_test"]), direct)
    meta = copy.deepcopy(det).to("meta")
    assert meta.bank.device.type == "meta" and det.bank.device.type == "cpu"


def _robust_cases():
    g = torch.Generator().manual_seed(4)
    partly_constant = torch.randn(60, 16, generator=g)
    partly_constant[:, :5] = 2.0
    return {
        "d_gt_n": torch.randn(20, 64, generator=g),
        "low_rank": torch.randn(60, 3, generator=g) @ torch.randn(3, 16, generator=g),
        "partly_constant": partly_constant,
        "constant": torch.full((60, 16), 1.5),
        "zeros": torch.zeros(60, 16),
        "duplicated": torch.randn(10, 16, generator=g).repeat(6, 1),
        "large_offset": torch.randn(60, 16, generator=g) + 1e4,
    }


@pytest.mark.parametrize("case", list(_robust_cases()))
def test_robust_inputs_give_finite_scores(case):
    z = _robust_cases()[case]
    g = torch.Generator().manual_seed(5)
    d = z.shape[1]
    head = (torch.randn(3, d, generator=g), torch.randn(3, generator=g))
    test = torch.cat([z[:5], z[:5] + torch.randn(5, d, generator=g), 100 * torch.randn(5, d, generator=g)])
    y = torch.arange(len(z)) % 3
    for det in (KNN(k=3), KNN(k=3, normalize=False), NNGuide(head=head, k=3)):
        s = det.fit_features(z, y).predict_features(test)
        assert s.shape == (15,) and torch.isfinite(s).all(), (case, type(det).__name__, s)
    s = KNN(k=1, normalize=False).fit_features(z, y).predict_features(z[:5])
    assert (s == 0).all()  # training rows are at distance 0 of themselves


def test_knn_predict_before_fit_raises(data):
    with pytest.raises(RequiresFitException, match="KNN"):
        KNN().predict_features(data["z_test"])


# -- KNN: contract, constructor, search space -------------------------------------------------------------
def test_knn_k_is_checked_against_the_training_rows(data):
    with pytest.raises(ParameterError, match=r"KNN: k=901 must be in \[1, N=900\]"):
        KNN(k=901).fit_features(data["z"], data["y"])
    ood = torch.cat([data["y"][:100], -torch.ones(800, dtype=torch.long)])  # 100 ID rows left
    with pytest.raises(ParameterError, match=r"k=101 must be in \[1, N=100\]"):
        KNN(k=101).fit_features(data["z"], ood)
    for bad in (0, -1, 2.5, "5", None):
        with pytest.raises(ParameterError, match="KNN: k="):
            KNN(k=bad)


def test_knn_search_space_adapts_to_the_training_rows():
    assert KNN.search_space() == {"k": {"grid": [50, 100, 200, 500, 1000]}}
    assert KNN.search_space({"N": 50000, "D": 512}) == {"k": {"grid": [50, 100, 200, 500, 1000]}}
    assert KNN.search_space({"N": 650}) == {"k": {"grid": [50, 100, 200, 500]}}
    assert KNN.search_space({"N": 30}) == {"k": {"grid": [1, 5, 10, 20]}}  # nothing of OpenOOD's grid fits
    assert KNN.search_space({"N": 7}) == {"k": {"grid": [1, 5]}}


def test_knn_pytorch_ood_signature(data):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.KNN(None, 7, False).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    for ours in (KNN(None, 7, False), KNN(encoder=None, k=7, normalize=False), KNN(backbone=None, k=7, normalize=0)):
        _agree(ours.fit_features(data["z"], data["y"]).predict_features(data["z_test"]), theirs, 1e-5, 1e-6)
    with pytest.raises(TypeError, match="KNN: .*accepted: model, k, normalize"):
        KNN(None, k=5, n_jobs=2)  # pytorch-ood's knn_kwargs for scikit-learn


@pytest.mark.parametrize("k,normalize", [(1, False), (1, True), (10, True), (50, True)])
def test_knn_vs_pytorch_ood(data, k, normalize):
    pod = pytest.importorskip("pytorch_ood.detector")
    ours = KNN(k=k, normalize=normalize).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    theirs = pod.KNN(None, k=k, normalize=normalize).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    _agree(ours, theirs, rtol=1e-5, atol=1e-6)


# -- NNGuide ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 900])
def test_nnguide_matches_reference(data, k):
    test = data["z_test"][::10]
    det = NNGuide(head=(data["w"], data["b"]), k=k).fit_features(data["z"], data["y"])
    np.testing.assert_allclose(det.predict_features(test).double().numpy(),
                               ref_nnguide(data["z"], data["w"], data["b"], test, k), rtol=1e-5, atol=1e-5)


def test_nnguide_far_ood_scores_higher_and_batch_independent(data):
    det = NNGuide(head=data["lin"], k=5).fit_features(data["z"], data["y"])
    batch = det.predict_features(data["z_test"])
    assert _auroc(batch[:150], batch[150:]) > 0.9
    single = torch.cat([det.predict_features(data["z_test"][i : i + 1]) for i in range(0, 300, 15)])
    torch.testing.assert_close(single, batch[::15], rtol=1e-6, atol=1e-6)


def test_nnguide_k_is_checked_against_the_training_rows(data):
    with pytest.raises(ParameterError, match=r"NNGuide: k=901 must be in \[1, N=900\]"):
        NNGuide(head=data["lin"], k=901).fit_features(data["z"], data["y"])
    with pytest.raises(ParameterError, match="NNGuide: k=0"):
        NNGuide(head=data["lin"], k=0)
    assert NNGuide.search_space({"N": 60}) == {"k": {"grid": [1, 10, 50]}}


def test_nnguide_pytorch_ood_signature(data):
    pod = pytest.importorskip("pytorch_ood.detector")
    with torch.no_grad():
        theirs = pod.NNGuide(None, data["lin"], 5).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    for ours in (NNGuide(None, data["lin"], 5), NNGuide(encoder=None, head=data["lin"], k=5),
                 NNGuide(None, nn.Sequential(nn.Flatten(), data["lin"]), k=5)):
        _agree(ours.fit_features(data["z"], data["y"]).predict_features(data["z_test"]), theirs)
    det = NNGuide(nn.Identity(), data["lin"], 5)  # OOD rows (label -1) are left out of the bank
    det.fit([(data["z"], data["y"]), (10 * data["z"][:50], -torch.ones(50, dtype=torch.long))])
    _agree(det.predict(data["z_test"]), theirs)


@pytest.mark.parametrize("k", [1, 10, 100])
def test_nnguide_vs_pytorch_ood(data, k):
    pod = pytest.importorskip("pytorch_ood.detector")
    with torch.no_grad():
        theirs = pod.NNGuide(None, data["lin"], k=k).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    ours = NNGuide(head=(data["w"], data["b"]), k=k).fit_features(data["z"], data["y"])
    _agree(ours.predict_features(data["z_test"]), theirs)


def test_declared_contracts():
    assert KNN.representation == NNGuide.representation == "features"
    assert not KNN.needs_head and NNGuide.needs_head
    # k only changes the scoring (the bank does not depend on it); normalize changes the stored bank
    assert not KNN.parameter_constraints["k"].structural and KNN.parameter_constraints["normalize"].structural
    assert not NNGuide.parameter_constraints["k"].structural
