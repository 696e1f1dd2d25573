"""SHE vs a plainly written reference (numpy float64, loops) and vs pytorch-ood 0.4.0; its constructor
(pytorch-ood's positional order and names) and its fallback for classes without correct samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ood_core.api import DetectorError, InvalidInputError, RequiresFitException
from ood_core.detectors import SHE

from .agreement import agree as _agree


def ref_she(z, y, w, b, test):
    z, y, w, b = (np.asarray(v, np.float64) for v in (z, y, w, b))
    patterns = {}
    for c in sorted(set(y.astype(int).tolist())):
        rows = [x for x, label in zip(z, y) if label == c and np.argmax(w @ x + b) == c]
        patterns[c] = np.mean(rows, axis=0)
    return np.array([-(x @ patterns[int(np.argmax(w @ x + b))]) for x in np.asarray(test, np.float64)])


# -- data ---------------------------------------------------------------------------------------------


def test_matches_reference(data):
    det = SHE(head=(data["w"], data["b"])).fit_features(data["z"], data["y"])
    assert det.patterns.dtype == torch.float64
    np.testing.assert_allclose(det.predict_features(data["z_test"]).double().numpy(),
                               ref_she(data["z"], data["y"], data["w"], data["b"], data["z_test"]), rtol=1e-5, atol=1e-5)


def test_class_without_correct_samples_falls_back_to_its_mean():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    w = torch.eye(3, 2)  # class 2 is never predicted: its pattern is the mean of its samples
    det = SHE(head=(w, torch.zeros(3))).fit_features(z, torch.tensor([0, 2, 1, 1]))
    torch.testing.assert_close(det.patterns, torch.tensor([[1.0, 0], [0, 2.0], [2.0, 0]], dtype=torch.float64))
    det = SHE(head=(torch.eye(4, 2), torch.zeros(4))).fit_features(z, torch.tensor([0, 0, 1, 1]))
    assert (det.patterns[2:] == 0).all()  # classes without samples


def test_errors(data):
    with pytest.raises(InvalidInputError, match=r"SHE: labels must be < the number of classes of the head \(6\)"):
        SHE(head=data["lin"]).fit_features(data["z"], data["y"] + 1)
    with pytest.raises(DetectorError, match="SHE: needs the classifier head"):
        SHE().fit_features(data["z"], data["y"])
    with pytest.raises(RequiresFitException, match="SHE"):
        SHE(head=data["lin"]).predict_features(data["z_test"])


def test_pytorch_ood_signature(data):
    pod = pytest.importorskip("pytorch_ood.detector")
    with torch.no_grad():
        theirs = pod.SHE(None, data["lin"]).fit_features(data["z"], data["y"]).predict_features(data["z_test"])
    for ours in (SHE(None, data["lin"]), SHE(encoder=None, head=data["lin"]), SHE(None, (data["w"], data["b"]))):
        _agree(ours.fit_features(data["z"], data["y"]).predict_features(data["z_test"]), theirs, atol=1e-4)
    loader = [(data["z"][:450], data["y"][:450]), (data["z"][450:], data["y"][450:]),
              (10 * data["z"][:50], -torch.ones(50, dtype=torch.long))]  # OOD rows (label -1): ignored
    det = SHE(nn.Identity(), data["lin"]).fit(loader)
    _agree(det.predict(data["z_test"]), theirs, atol=1e-4)


def test_robust_inputs_give_finite_scores():
    g = torch.Generator().manual_seed(4)
    head = (torch.randn(3, 16, generator=g), torch.randn(3, generator=g))
    test = 100 * torch.randn(5, 16, generator=g)
    for z in (torch.full((60, 16), 1.5), torch.zeros(60, 16), torch.randn(10, 16, generator=g).repeat(6, 1)):
        s = SHE(head=head).fit_features(z, torch.arange(60) % 3).predict_features(torch.cat([z[:5], test]))
        assert s.shape == (10,) and torch.isfinite(s).all()


def test_declared_contract():
    assert SHE.representation == "features" and SHE.needs_head and SHE.parameter_constraints == {}
