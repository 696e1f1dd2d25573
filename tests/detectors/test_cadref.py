"""CADRef / CARef vs a plainly written reference of the official code (LingAndZero/CADRef: ``utils/get_stat.py``
groups the training features by *predicted* class, ``ood_methods/CADRef.py`` scores), and its quirks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ood_core.constraints import ParameterError
from ood_core.detectors import CADRef, build_detector, fit_detector, score_detector


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(5)
    c, d = 5, 12
    means = 2 * torch.rand(c, d, generator=g)
    y = torch.arange(200) % c
    z = torch.relu(means[y] + 0.5 * torch.randn(200, d, generator=g))
    w = torch.randn(c, d, generator=g)
    w[0, 3] = 0.0  # sign(0) = 0: the entry counts in neither error
    b = 0.1 * torch.randn(c, generator=g)
    test = torch.cat([torch.relu(means[torch.arange(20) % c] + 0.5 * torch.randn(20, d, generator=g)),
                      3 * torch.rand(20, d, generator=g)])
    return {"z": z, "y": y, "w": w, "b": b, "test": test}


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def ref_logit_score(row, method):
    if method == "energy":
        m = max(row)
        return m + math.log(sum(math.exp(v - m) for v in row))
    if method == "maxlogit":
        return max(row)
    p = _softmax(row)
    if method == "msp":
        return max(p)
    m = max(len(row) // 10, 10)
    top = sorted(p)[-m:]
    return 1 / sum(v ** 0.1 * (1 - v) ** 0.1 for v in top)


def ref_cadref(train, test, w, b, method, decoupled=True):
    """Loops over samples, as the official get_features / get_state / eval."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    groups = {}
    scores_train = []
    for z in train:
        logits = list(w @ z + b)
        groups.setdefault(int(np.argmax(logits)), []).append(z)
        scores_train.append(ref_logit_score(logits, method))
    mean = {c: np.mean(rows, axis=0) for c, rows in groups.items()}
    global_score = sum(scores_train) / len(scores_train)
    out = []
    for z in test:
        logits = list(w @ z + b)
        c = int(np.argmax(logits))
        dist = z - mean[c]
        norm = sum(abs(v) for v in z)
        if not decoupled:
            out.append(sum(abs(v) for v in dist) / norm)
            continue
        sg = np.sign(w[c])
        ep = sum(max(0.0, v) for v in dist * sg) / norm
        en = sum(max(0.0, v) for v in -dist * sg) / norm
        out.append(ep / ref_logit_score(logits, method) + en / global_score)
    return np.array(out)


@pytest.mark.parametrize("method", ["energy", "msp", "maxlogit", "gen"])
def test_cadref_matches_the_official_code(data, method):
    det = CADRef(head=(data["w"], data["b"]), logit_score=method).fit_features(data["z"], data["y"])
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_cadref(data["z"], data["test"], data["w"], data["b"], method), rtol=1e-5)


def test_caref_matches_the_official_code(data):
    det = CADRef(head=(data["w"], data["b"]), decoupled=False).fit_features(data["z"], data["y"])
    np.testing.assert_allclose(det.predict_features(data["test"]).double().numpy(),
                               ref_cadref(data["z"], data["test"], data["w"], data["b"], "energy", False), rtol=1e-5)


def test_class_means_follow_the_predicted_class_not_the_label(data):
    y = (data["y"] + 1) % 5  # labels that disagree with the head everywhere
    a = CADRef(head=(data["w"], data["b"])).fit_features(data["z"], data["y"])
    b = CADRef(head=(data["w"], data["b"])).fit_features(data["z"], y)
    torch.testing.assert_close(a.predict_features(data["test"]), b.predict_features(data["test"]))


def test_a_class_never_predicted_falls_back_to_its_labelled_rows(data):
    w, b = data["w"].clone(), data["b"].clone()
    b[4] = -1e4  # nothing is predicted as class 4 in training
    det = CADRef(head=(w, b)).fit_features(data["z"], data["y"])
    torch.testing.assert_close(det.class_means[4], data["z"][data["y"] == 4].double().mean(dim=0))
    assert torch.isfinite(det.class_means).all()


def test_logit_score_is_not_structural_and_has_the_official_name(data):
    det = CADRef(head=(data["w"], data["b"]), logit_method="msp")  # the official argument's name
    assert det.logit_score == "msp"
    det.fit_features(data["z"], data["y"]).set_params(logit_score="gen")
    fresh = CADRef(head=(data["w"], data["b"]), logit_score="gen").fit_features(data["z"], data["y"])
    torch.testing.assert_close(det.predict_features(data["test"]), fresh.predict_features(data["test"]))


def test_cadref_constraints_and_registry(data):
    with pytest.raises(ParameterError, match="CADRef: logit_score="):
        CADRef(head=(data["w"], data["b"]), logit_score="odin")
    det = build_detector("CADRef", {"logit_score": "maxlogit"}, head=(data["w"], data["b"]))
    fit_detector(det, {"features": data["z"]}, data["y"])
    np.testing.assert_allclose(score_detector(det, {"features": data["test"]}).double().numpy(),
                               ref_cadref(data["z"], data["test"], data["w"], data["b"], "maxlogit"), rtol=1e-5)
