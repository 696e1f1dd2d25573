"""MaxSoftmax, MaxLogit, EnergyBased: plain float64 references, pytorch-ood 0.4.0 agreement and constructors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ood_core.constraints import ParameterError
from ood_core.detectors import EnergyBased, MaxLogit, MaxSoftmax
from ood_core.detectors.logits import LOGIT_SCORES

pod = pytest.importorskip("pytorch_ood.detector")


# -- reference implementations (loops, numpy float64) ----------------------------------------------
def ref_msp(logits, t=1.0):
    out = []
    for row in np.asarray(logits, dtype=np.float64):
        scaled = [v / t for v in row]
        m = max(scaled)
        denom = sum(math.exp(v - m) for v in scaled)
        out.append(-1.0 / denom)  # max softmax = exp(m - m) / denom
    return np.array(out)


def ref_maxlogit(logits):
    return np.array([-max(row) for row in np.asarray(logits, dtype=np.float64)])


def ref_energy(logits, t=1.0):
    out = []
    for row in np.asarray(logits, dtype=np.float64):
        m = max(v / t for v in row)
        out.append(-t * (m + math.log(sum(math.exp(v / t - m) for v in row))))
    return np.array(out)


LOGITS = torch.tensor([[5.0, 0.0, -1.0], [1.0, 1.0, 1.0], [100.0, -50.0, 99.0], [-3.0, 2.0, 0.5], [0.0, 0.0, 20.0]])


@pytest.fixture(scope="module")
def logits():
    """Logits of a random linear head on random inputs: 300 rows, 7 classes, a wide range."""
    g = torch.Generator().manual_seed(11)
    return torch.randn(300, 7, generator=g) * torch.linspace(0.1, 20.0, 300)[:, None]


def _auroc(id_scores, ood_scores):
    """P(score(OOD) > score(ID)) (ties count half)."""
    diff = ood_scores[:, None] - id_scores[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


# -- references ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1.0, 2.0, 1000.0])
def test_max_softmax_matches_reference(t):
    got = MaxSoftmax(t=t).predict_logits(LOGITS)
    np.testing.assert_allclose(got.numpy(), ref_msp(LOGITS, t), rtol=1e-5, atol=1e-7)


def test_max_logit_matches_reference():
    np.testing.assert_allclose(MaxLogit().predict_logits(LOGITS).numpy(), ref_maxlogit(LOGITS), rtol=1e-6)


@pytest.mark.parametrize("t", [0.5, 1.0, 5.0])
def test_energy_matches_reference(t):
    got = EnergyBased(t=t).predict_logits(LOGITS)
    np.testing.assert_allclose(got.numpy(), ref_energy(LOGITS, t), rtol=1e-5, atol=1e-5)


def test_energy_is_exact_for_large_and_float64_logits():
    big = torch.tensor([[500.0, 0.0, -3.0], [-500.0, -501.0, -502.0]])  # exp overflows / underflows in float32
    np.testing.assert_allclose(EnergyBased().predict_logits(big).numpy(), ref_energy(big), rtol=1e-6)
    x = LOGITS.double()
    got = EnergyBased(t=2.0).predict_logits(x)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_energy(x, 2.0), rtol=1e-13)


@pytest.mark.parametrize("cls", [MaxSoftmax, MaxLogit, EnergyBased])
def test_logit_detectors_rank_confident_below_uniform(cls):
    g = torch.Generator().manual_seed(1)
    confident = torch.randn(50, 10, generator=g) * 0.1
    confident[torch.arange(50), torch.arange(50) % 10] += 10.0
    uniform = torch.randn(50, 10, generator=g) * 0.1
    det = cls()
    assert _auroc(det.predict_logits(confident), det.predict_logits(uniform)) == 1.0


def test_logit_detectors_with_model_and_random_input():
    g = torch.Generator().manual_seed(2)
    model = torch.nn.Linear(6, 3)
    x = torch.randn(7, 6, generator=g)
    for det in (MaxSoftmax(model, t=3.0), MaxLogit(model), EnergyBased(model, t=0.5)):
        with torch.no_grad():
            expected = det.predict_logits(model(x))
        assert torch.equal(det.predict(x), expected)
        assert det.fit([(x, torch.zeros(7, dtype=torch.long))]) is det


# -- the contract --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [MaxSoftmax, EnergyBased])
@pytest.mark.parametrize("bad_t", [0, -1.0, float("nan"), float("inf"), "2"])
def test_temperature_must_be_positive_and_finite(cls, bad_t):
    with pytest.raises(ParameterError, match=f"{cls.__name__}: t="):
        cls(t=bad_t)
    with pytest.raises(ParameterError, match=f"{cls.__name__}: t="):
        cls(temperature=bad_t)


def test_contract_declarations():
    for cls in (MaxSoftmax, EnergyBased):
        assert cls.representation == "logits" and not cls.requires_fit and not cls.needs_head
        assert list(cls.parameter_constraints) == ["t"] and not cls.parameter_constraints["t"].structural
        assert cls(temperature=3.0).get_params() == {"t": 3.0}
    assert MaxLogit.parameter_constraints == {} and MaxLogit().get_params() == {}
    with pytest.raises(TypeError, match="not both"):
        MaxSoftmax(t=2.0, temperature=3.0)


def test_logit_scores_for_head_detectors(logits):
    """ReAct / ASH / SCALE / VRA / DICE call ``LOGIT_SCORES[name](logits)``."""
    assert set(LOGIT_SCORES) == {"energy", "msp", "maxlogit"}
    for name, det in (("energy", EnergyBased()), ("msp", MaxSoftmax()), ("maxlogit", MaxLogit())):
        torch.testing.assert_close(LOGIT_SCORES[name](logits), det.predict_logits(logits))


# -- pytorch-ood 0.4.0 --------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1.0, 10.0, 1000.0])
def test_vs_pytorch_ood_max_softmax(logits, t):
    np.testing.assert_allclose(MaxSoftmax(t=t).predict_logits(logits).numpy(),
                               pod.MaxSoftmax(None, t=t).predict_logits(logits).numpy(), rtol=1e-5, atol=1e-7)


def test_vs_pytorch_ood_max_logit(logits):
    torch.testing.assert_close(MaxLogit().predict_logits(logits), pod.MaxLogit(None).predict_logits(logits))


@pytest.mark.parametrize("t", [0.5, 1.0, 5.0])
def test_vs_pytorch_ood_energy(logits, t):
    np.testing.assert_allclose(EnergyBased(t=t).predict_logits(logits).numpy(),
                               pod.EnergyBased(None, t=t).predict_logits(logits).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,args,kwargs", [
    ("MaxSoftmax", (2.0,), {}), ("MaxSoftmax", (), {"t": 0.5}), ("MaxLogit", (), {}),
    ("EnergyBased", (3.0,), {}), ("EnergyBased", (), {"t": 0.5}),
])
def test_built_the_pytorch_ood_way(logits, name, args, kwargs):
    """``Cls(model, *args, **kwargs)`` as a pytorch-ood user writes it: same scores through ``predict``."""
    model = torch.nn.Identity()
    ours = {"MaxSoftmax": MaxSoftmax, "MaxLogit": MaxLogit, "EnergyBased": EnergyBased}[name](model, *args, **kwargs)
    theirs = getattr(pod, name)(model, *args, **kwargs)
    np.testing.assert_allclose(ours.predict(logits).numpy(), theirs.predict(logits).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", [("MaxSoftmax", {"t": 2.0}), ("MaxLogit", {}), ("EnergyBased", {"t": 2.0})])
def test_static_score_functions_match_pytorch_ood(logits, name, kwargs):
    """Same names and signatures as pytorch-ood's static ``score``, also on segmentation logits (B, C, H, W)."""
    ours, theirs = globals()[name].score, getattr(pod, name).score
    seg = logits[:48].reshape(2, 4, 6, 7).permute(0, 3, 1, 2)  # (B, C, H, W)
    for x in (logits, seg):
        np.testing.assert_allclose(ours(x, **kwargs).numpy(), theirs(x, **kwargs).numpy(), rtol=1e-5, atol=1e-6)
