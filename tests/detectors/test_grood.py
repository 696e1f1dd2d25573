"""GROOD (ElAraby et al., TMLR 2025) vs the official logic (OpenOOD ``grood.py``: autograd of the cross-entropy
of the nearest-prototype logits with respect to the OOD prototype, bank of correctly classified training rows,
nearest-neighbour distance) written plainly with loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ood_core.constraints import ParameterError
from ood_core.detectors import GROOD
from ood_core.evaluation import EvalSet, run_protocol


def official_gradient(z, protos, ood_proto, pred):
    """OpenOOD's compute_ncc_loss + _compute_grad for one sample: autograd w.r.t. the OOD prototype."""
    noise = ood_proto.clone().requires_grad_(True)
    allp = torch.cat([protos, noise[None]])
    ncc = -torch.norm(z[None] - allp, dim=1)
    loss = F.cross_entropy(ncc[None], pred.view(1))
    return torch.autograd.grad(loss, noise)[0]


def ref_grood(z, y, w, b, test, ood_proto=None):
    z, test, w, b = z.double(), test.double(), w.double(), b.double()
    protos = torch.stack([z[y == c].mean(dim=0) for c in range(w.shape[0])])
    ood_proto = protos.mean(dim=0) if ood_proto is None else ood_proto.double()
    bank = [official_gradient(x, protos, ood_proto, (w @ x + b).argmax()) for x, c in zip(z, y)
            if int((w @ x + b).argmax()) == int(c)]
    out = []
    for x in test:
        g = official_gradient(x, protos, ood_proto, (w @ x + b).argmax())
        out.append(min(float((g - t).norm()) for t in bank))
    return np.array(out)


@pytest.fixture(scope="module")
def small(data):
    return dict(z=data["z"][:300], y=data["y"][:300], test=data["z_test"][::10], w=data["w"], b=data["b"],
                ood_val=data["z_test"][-40:])


def test_class_mean_prototype_matches_official_logic(small):
    det = GROOD(head=(small["w"], small["b"]), ood_prototype="class_mean").fit_features(small["z"].double(), small["y"])
    want = ref_grood(small["z"], small["y"], small["w"], small["b"], small["test"])
    np.testing.assert_allclose(det.predict_features(small["test"].double()).numpy(), want, rtol=1e-9, atol=1e-12)
    got32 = GROOD(head=(small["w"], small["b"]), ood_prototype="class_mean").fit_features(small["z"], small["y"])
    np.testing.assert_allclose(got32.predict_features(small["test"]).double().numpy(), want, rtol=1e-3, atol=1e-5)


def test_ood_val_prototype_is_the_mean_ood_validation_feature(small):
    det = GROOD(head=(small["w"], small["b"])).fit_features(small["z"].double(), small["y"])
    before = det.predict_features(small["test"].double())
    # the protocol's validation step: ID val is not read, OOD val sets the prototype
    det.select_on_validation({"features": small["test"]}, {"features": small["ood_val"].double()})
    want = ref_grood(small["z"], small["y"], small["w"], small["b"], small["test"], small["ood_val"].double().mean(0))
    after = det.predict_features(small["test"].double())
    np.testing.assert_allclose(after.numpy(), want, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(before, after)
    fixed = GROOD(head=(small["w"], small["b"]), ood_prototype="class_mean").fit_features(small["z"].double(),
                                                                                      small["y"])
    fixed.select_on_validation({"features": small["test"]}, {"features": small["ood_val"].double()})
    torch.testing.assert_close(fixed.predict_features(small["test"].double()), before)


def test_protocol_separates_ood(data):
    det = GROOD(head=data["lin"])
    sets = {"train": EvalSet("id_train", {"features": data["z"]}, data["y"]),
            "val": EvalSet("id_val", {"features": data["z_test"][:50]}, data["y"][:50]),
            "oodval": EvalSet("ood_val", {"features": data["z_test"][150:200]}, -torch.ones(50)),
            "test": EvalSet("far", {"features": data["z_test"]}, torch.zeros(300))}
    s = torch.as_tensor(run_protocol(det, sets)["test"].scores)
    id_s, ood_s = s[50:150], s[200:]  # rows not used for validation
    assert float((ood_s[:, None] > id_s[None, :]).double().mean()) > 0.8


def test_only_correctly_classified_rows_enter_the_bank(small):
    y = small["y"].clone()
    y[:30] = (y[:30] + 1) % 6  # 30 rows the head now gets wrong
    det = GROOD(head=(small["w"], small["b"])).fit_features(small["z"], y)
    pred = (small["z"] @ small["w"].T + small["b"]).argmax(dim=1)
    assert det.bank.shape[0] == int((pred == y).sum()) <= len(y) - 30


def test_constraints():
    with pytest.raises(ParameterError, match="GROOD: ood_prototype="):
        GROOD(ood_prototype="noise")
