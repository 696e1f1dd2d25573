"""Relation (Kim, Yun & Song, NeurIPS 2023) vs a plainly written loop reference and vs the logic of OpenOOD's
``relation_postprocessor.py`` (chunked kernel, cut-off, signed power), on the same inputs."""
from __future__ import annotations

from math import ceil

import numpy as np
import pytest
import torch

from ood_core.constraints import ParameterError
from ood_core.detectors import Relation
from ood_core.detectors import relation as relation_module


def ref_relation(z, w, b, test, power, threshold=0.03):
    """-sum_j [r_j > t] r_j^power, r_j = max(u.u_j, 0) * p.p_j: loops over the bank, numpy float64."""
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)

    def unit(x):
        return x / np.sqrt((x * x).sum() + 1e-10)

    def prob(x):
        e = np.exp(w @ x + b - (w @ x + b).max())
        return e / e.sum()

    bank = [(unit(x), prob(x)) for x in np.asarray(z, np.float64)]
    out = []
    for x in np.asarray(test, np.float64):
        u, p = unit(x), prob(x)
        total = 0.0
        for uj, pj in bank:
            r = max(float(u @ uj), 0.0) * float(p @ pj)
            if r > threshold:
                total += r**power
        out.append(-total)
    return np.array(out)


def openood_relation(z, w, b, test, power):
    """OpenOOD's logic: normalise, softmax, kernel in query chunks of 50 and bank splits of 2, |rel| > 0.03,
    sum of sign(rel) |rel|^pow; its confidence negated."""
    def normalize(f):
        return f / torch.sqrt((f**2).sum(-1) + 1e-10).reshape(-1, 1)

    feat_t, prob_t = normalize(z), torch.softmax(z @ w.T + b, dim=1)
    feat, prob = normalize(test), torch.softmax(test @ w.T + b, dim=1)
    scores = []
    for i in range(ceil(len(feat) / 50)):
        f, p = feat[i * 50:(i + 1) * 50], prob[i * 50:(i + 1) * 50]
        size = ceil(len(feat_t) / 2)
        rel = torch.cat([torch.clamp(f @ feat_t[k * size:(k + 1) * size].T, min=0.0)
                         * (p @ prob_t[k * size:(k + 1) * size].T) for k in range(2)], dim=-1)
        masked = (rel.abs() > 0.03) * rel
        scores.append((masked.sign() * masked.abs() ** power).sum(-1))
    return -torch.cat(scores)


@pytest.mark.parametrize("power", [1, 2, 6])
def test_matches_reference(data, power):
    det = Relation(head=(data["w"], data["b"]), power=power).fit_features(data["z"], data["y"])
    test = data["z_test"][::5]
    want = ref_relation(data["z"], data["w"], data["b"], test, power)
    np.testing.assert_allclose(det.predict_features(test).double().numpy(), want, rtol=1e-4, atol=1e-4)
    det64 = Relation(head=(data["w"], data["b"]), power=power).fit_features(data["z"].double())
    np.testing.assert_allclose(det64.predict_features(test.double()).numpy(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("power", [1, 4])
def test_agrees_with_openood_logic(data, power):
    det = Relation(head=data["lin"], power=power).fit_features(data["z"], data["y"])
    got = det.predict_features(data["z_test"])
    torch.testing.assert_close(got, openood_relation(data["z"], data["w"], data["b"], data["z_test"], power),
                               rtol=1e-4, atol=1e-4)


def test_labels_are_not_read_and_power_needs_no_refit(data):
    head = (data["w"], data["b"])
    det = Relation(head=head).fit_features(data["z"])  # no labels
    shuffled = Relation(head=head).fit_features(data["z"], data["y"][torch.randperm(len(data["y"]))])
    torch.testing.assert_close(det.predict_features(data["z_test"]), shuffled.predict_features(data["z_test"]))
    det.set_params(power=4, threshold=0.1)
    fresh = Relation(head=head, power=4, threshold=0.1).fit_features(data["z"])
    torch.testing.assert_close(det.predict_features(data["z_test"]), fresh.predict_features(data["z_test"]))


def test_bounded_chunks_give_the_same_scores(data, monkeypatch):
    """The kernel against the bank is formed in blocks of at most CHUNK_ELEMENTS entries: a tiny bound (one
    query row per block) changes nothing."""
    det = Relation(head=(data["w"], data["b"]), power=2).fit_features(data["z"])
    whole = det.predict_features(data["z_test"])
    monkeypatch.setattr(relation_module, "CHUNK_ELEMENTS", len(data["z"]) // 3)
    torch.testing.assert_close(det.predict_features(data["z_test"]), whole)


def test_ood_scores_higher(data):
    s = Relation(head=(data["w"], data["b"])).fit_features(data["z"]).predict_features(data["z_test"])
    id_s, ood_s = s[:150], s[150:]
    assert float((ood_s[:, None] > id_s[None, :]).double().mean()) > 0.9


def test_constraints():
    with pytest.raises(ParameterError, match="Relation: power="):
        Relation(power=0)
    with pytest.raises(ParameterError, match="Relation: threshold="):
        Relation(threshold=1.0)
    assert Relation.search_space()["power"] == {"grid": [1, 2, 4, 6, 8]}
