"""The classifier head: what parse_head accepts and refuses, HeadMixin, and the logit scorings (detector=)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ood_core.api import DetectorError, FeaturesDetector, InvalidInputError
from ood_core.detectors import ASH, SCALE, VRA, EnergyBased, MaxLogit, MaxSoftmax, RankFeat, ReAct
from ood_core.detectors.head import HeadMixin, logit_score, parse_head

G = torch.Generator().manual_seed(0)
W, B = torch.randn(3, 5, generator=G), torch.randn(3, generator=G)


def _linear(w=W, b=B):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _same(head, pooling=False, b=B):
    w, bias = parse_head("X", head, pooling=pooling)
    assert w.dtype == bias.dtype == torch.float32 and not w.requires_grad and not bias.requires_grad
    torch.testing.assert_close(w, W)
    torch.testing.assert_close(bias, b)


# -- accepted ---------------------------------------------------------------------------------------------
def test_linear():
    _same(_linear())
    _same(_linear(b=None), b=torch.zeros(3))


@pytest.mark.parametrize("pair", [(W, B), [W, B], (W.numpy(), B.numpy()), (W.double(), B.tolist()),
                                  (nn.Parameter(W), nn.Parameter(B))])
def test_pairs(pair):
    _same(pair)


def test_pair_without_bias():
    _same((W, None), b=torch.zeros(3))


@pytest.mark.parametrize("modules", [
    [nn.Identity()], [nn.Flatten()], [nn.Dropout(0.5)], [nn.Dropout(0.5).train()],
    [nn.Flatten(), nn.Dropout(0.2), nn.Identity()], [nn.Sequential(nn.Identity(), nn.Flatten())],
])
def test_sequential_of_identities_ending_in_linear(modules):
    _same(nn.Sequential(*modules, _linear()))
    _same(nn.Sequential(nn.Sequential(*modules), nn.Sequential(_linear())))


def test_global_pooling_only_where_the_detector_pools():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), _linear())
    _same(head, pooling=True)
    _same(nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), _linear()), pooling=True)
    with pytest.raises(ValueError, match=r"X: head nn.Sequential\(AdaptiveAvgPool2d, Flatten, Linear\): module 0 "
                                         r"pools feature maps, but X reads pooled \(N, D\) features"):
        parse_head("X", head)
    with pytest.raises(ValueError, match="module 0 .AdaptiveAvgPool2d. is not a parameter-free identity"):
        parse_head("X", nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), _linear()), pooling=True)


def test_none_is_no_head():
    assert parse_head("X", None) == (None, None)


# -- refused ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head,match", [
    # the old bug: any 2-element object was unpacked as (w, b)
    (nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)), r"module 0 \(Linear\) is not a parameter-free identity"),
    (nn.Sequential(nn.ReLU(), nn.Linear(5, 3)), r"module 0 \(ReLU\) is not a parameter-free identity"),
    (nn.Sequential(nn.Flatten(0), nn.Linear(5, 3)), r"module 0 \(Flatten\)"),
    (nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)), r"module 0 \(BatchNorm1d\)"),
    (nn.Sequential(nn.Linear(5, 3), nn.ReLU()), r"must end in nn.Linear, it ends in ReLU"),
    (nn.Sequential(), r"must end in nn.Linear, it ends in nothing"),
    (nn.Conv2d(5, 3, 1), r"head must be an nn.Linear, a \(w, b\) pair .*got Conv2d"),
    ((nn.Linear(5, 3), nn.Linear(5, 3)), r"got a tuple of 2 item\(s\)"),
    ((W, B, B), r"got a tuple of 3 item\(s\)"),
    ({"w": W, "b": B}, r"got a dict"),
    (W, r"got a Tensor"),
    ((None, B), r"head weights w are None"),
    ((B, B), r"head weights must have shape \(C, D\), got \(3,\)"),
    ((W, W), r"head bias must have shape \(3,\), got \(3, 5\)"),
    ((W, torch.zeros(4)), r"head bias must have shape \(3,\), got \(4,\)"),
    ((W, "b"), r"must be tensors or arrays"),
])
def test_refused_with_a_message_naming_the_detector(head, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_head("SomeDetector", head)
    assert str(err.value).startswith("SomeDetector: ")


def test_a_callable_head_is_refused_with_what_to_pass_instead():
    class Net(nn.Module):
        def forward_feature_maps(self, x):
            return x

    with pytest.raises(ValueError, match=r"got the callable .*Net.forward_feature_maps; pass the final linear layer "
                                         r"\(e.g. model.fc\) or its \(weight, bias\)"):
        parse_head("ASH", Net().forward_feature_maps)


@pytest.mark.parametrize("cls", [ReAct, ASH, SCALE, VRA, RankFeat])
def test_every_head_detector_refuses_a_two_layer_sequential(cls):
    with pytest.raises(ValueError, match=f"^{cls.__name__}: head nn.Sequential\\(Linear, Linear\\)"):
        cls(head=nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)))


# -- HeadMixin ----------------------------------------------------------------------------------------------
class _WithHead(HeadMixin, FeaturesDetector):
    """A minimal head detector: scores the energy of the head's logits (test only). arXiv: none."""

    def __init__(self, model=None, head=None, w=None, b=None):
        super().__init__(model)
        self._set_head(head, w=w, b=b)

    def _score(self, z):
        return self._score_logits(self.logits(self._head_input(z)), "energy")


def test_set_head_takes_head_or_w_and_b():
    for det in (_WithHead(head=(W, B)), _WithHead(w=W, b=B), _WithHead(head=_linear())):
        torch.testing.assert_close(det.w, W)
        torch.testing.assert_close(det.b, B)
    torch.testing.assert_close(_WithHead(w=W).b, torch.zeros(3))
    with pytest.raises(ValueError, match="_WithHead: give head= or w= / b=, not both"):
        _WithHead(head=(W, B), w=W)
    with pytest.raises(ValueError, match="_WithHead: b given without w"):
        _WithHead(b=B)


def test_logits_follow_the_input_dtype_and_width_is_checked():
    det = _WithHead(head=(W, B))
    z = torch.randn(4, 5, generator=G, dtype=torch.float64)
    out = det.logits(z)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, z @ W.double().T + B.double())
    with pytest.raises(InvalidInputError, match="_WithHead: features have width 4, but the head expects width 5"):
        det.predict_features(z[:, :4])
    with pytest.raises(DetectorError, match="_WithHead: needs the classifier head"):
        _WithHead().predict_features(z)


def test_head_features_validates_training_rows():
    det = _WithHead(head=(W, B))
    z, y = det._head_features(torch.randn(6, 5, generator=G), torch.tensor([0, 1, -1, 2, 0, 1]))
    assert z.shape == (5, 5) and det.n_features_in_ == 5
    with pytest.raises(InvalidInputError, match="_WithHead: features have dimension 4, head weights expect 5"):
        det._head_features(torch.randn(6, 4, generator=G), torch.zeros(6, dtype=torch.long))


# -- logit scorings ---------------------------------------------------------------------------------------
LOGITS = torch.tensor([[5.0, 0.0, -1.0], [1.0, 1.0, 1.0], [100.0, -50.0, 99.0], [-3.0, 2.0, 0.5]])


def test_logit_score_names_and_functions():
    pod = pytest.importorskip("pytorch_ood.detector")
    # pytorch-ood's scoring functions return outlier scores (higher = more OOD), like ours: same signs
    for name, ours, theirs in (("energy", EnergyBased.score, pod.EnergyBased.score),
                               ("msp", MaxSoftmax.score, pod.MaxSoftmax.score),
                               ("maxlogit", MaxLogit.score, pod.MaxLogit.score)):
        for spelled in (name, name.upper()):
            torch.testing.assert_close(logit_score(spelled)(LOGITS), theirs(LOGITS))
        torch.testing.assert_close(logit_score(ours)(LOGITS), theirs(LOGITS))
    torch.testing.assert_close(logit_score(None)(LOGITS), pod.EnergyBased.score(LOGITS))  # pytorch-ood's default
    torch.testing.assert_close(logit_score(EnergyBased(t=2.0))(LOGITS), pod.EnergyBased.score(LOGITS, t=2.0))


def test_a_scoring_with_the_wrong_shape_is_refused():
    det = ReAct(head=(W, B), threshold=1.0, detector=lambda logits: logits)
    with pytest.raises(InvalidInputError, match=r"ReAct: detector=.* must map logits \(2, 3\) to scores \(2,\), "
                                                r"got \(2, 3\)"):
        det.predict_features(torch.randn(2, 5, generator=G))


def test_numpy_head_gives_float32_state_and_moves_with_to():
    det = ReAct(head=(W.numpy().astype(np.float64), B.numpy()), threshold=1.0)
    assert det.w.dtype == torch.float32
    assert det.to("meta").w.device.type == "meta" and det.b.device.type == "meta"
