"""Training objectives (ood_core.objectives) against plainly written references; one training step by hand."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ood_core.objectives import OBJECTIVE_DEFAULTS, make_objective, objective_loss
from ood_core.training import TrainConfig, train_classifier

D = torch.float64


def _ce(z, y):  # -log softmax(z)_y, mean over rows, written out
    return sum(-z[i, y[i]] + math.log(sum(math.exp(v) for v in z[i].tolist())) for i in range(len(y))) / len(y)


def _lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(a - m) for a in v))


def _reference(name, p, z_in, y, z_out, acts=None):
    """The formulas of the module docstring, one sample at a time, on Python floats from tensors (keeps the graph
    through the tensor ops used: indexing and arithmetic only)."""
    if name == "logitnorm":
        rows = [z_in[i] / (p["tau"] * (torch.sqrt((z_in[i] ** 2).sum()) + 1e-7)) for i in range(len(y))]
        return sum(-r[y[i]] + torch.log(torch.exp(r).sum()) for i, r in enumerate(rows)) / len(y)
    ce = sum(-z_in[i, y[i]] + torch.log(torch.exp(z_in[i]).sum()) for i in range(len(y))) / len(y)
    if name == "cross_entropy":
        return ce
    if name == "outlier_exposure":
        C = z_out.shape[1]
        u = sum(-sum(z_out[j, c] - torch.log(torch.exp(z_out[j]).sum()) for c in range(C)) / C for j in range(len(z_out)))
        return ce + p["lambda"] * u / len(z_out)

    def margin(e_in, e_out):
        a = sum(torch.clamp(e - p["m_in"], min=0) ** 2 for e in e_in) / len(e_in)
        b = sum(torch.clamp(p["m_out"] - e, min=0) ** 2 for e in e_out) / len(e_out)
        return a + b

    energy = lambda rows: [-torch.log(torch.exp(r.reshape(-1)).sum()) for r in rows]
    if name == "energy_regularised":
        return ce + p["lambda"] * margin(energy(z_in), energy(z_out))
    n = len(y)
    regs = [margin(energy(a[:n]), energy(a[n:])) for a in acts]
    return ce + p["lambda"] * sum(regs) / len(regs)


CASES = [("cross_entropy", {}), ("logitnorm", {"tau": 0.04}), ("logitnorm", {"tau": 0.5}),
         ("outlier_exposure", {"lambda": 0.5}),
         ("energy_regularised", {"lambda": 0.1, "m_in": -3.0, "m_out": 1.0}),  # margins that both bind here
         ("intermediate_energy", {"lambda": 0.3, "m_in": -4.0, "m_out": -1.0, "layers": ["a", "b"]})]


@pytest.mark.parametrize("name,params", CASES)
def test_loss_and_gradient_equal_the_reference(name, params):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(7, 4, generator=g, dtype=D) * 2).requires_grad_()
    acts = [torch.randn(7, 3, 2, 2, generator=g, dtype=D).requires_grad_(), torch.randn(7, 5, generator=g, dtype=D).requires_grad_()]
    y = torch.tensor([0, 3, 1, 2])
    obj = make_objective({"name": name, **params})
    got = obj.loss(z, y, n_in=4, activations={"a": acts[0], "b": acts[1]} if obj.layers else None)
    ref = _reference(name, obj.params, z[:4], y, z[4:], acts)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    leaves = [z] + (acts if obj.layers else [])
    g_got = torch.autograd.grad(got, leaves)
    g_ref = torch.autograd.grad(ref, leaves)
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    if name == "energy_regularised":  # both hinges bind: the regulariser contributes
        assert obj.loss(z, y, n_in=4).item() > torch.nn.functional.cross_entropy(z[:4], y).item()


def test_defaults_are_the_papers():
    assert make_objective("logitnorm").params == {"tau": 0.04}
    assert make_objective("outlier_exposure").params == {"lambda": 0.5}
    assert make_objective("energy_regularised").params == {"lambda": 0.1, "m_in": -25.0, "m_out": -7.0}
    assert make_objective(None).to_dict() == {"name": "cross_entropy"}
    # LA-OOD co-training: the official code's defaults (co_train.py: 5 epochs, SGD lr 0.001, momentum 0.9, weight
    # decay 1e-4, lambda 0.001; train_ood_detectors.py: nu 0.001, fitted on all 50000 CIFAR training rows)
    assert make_objective({"name": "la_ood_cotrain", "layers": ["a"]}).params == {
        "lambda": 0.001, "nu": 0.001, "cotrain_epochs": 5, "lr": 0.001, "momentum": 0.9, "weight_decay": 1e-4,
        "max_fit_samples": 50000, "layers": ("a",)}
    assert set(OBJECTIVE_DEFAULTS) == {"cross_entropy", "logitnorm", "outlier_exposure", "energy_regularised",
                                       "intermediate_energy", "la_ood_cotrain"}


@pytest.mark.parametrize("spec,match", [
    ({"name": "focal"}, "unknown objective"),
    ({"name": "logitnorm", "lambda": 1}, "takes"),
    ({"name": "logitnorm", "tau": 0}, "tau"),
    ({"name": "outlier_exposure", "lambda": -1}, "lambda"),
    ({"name": "energy_regularised", "m_in": -5, "m_out": -9}, "m_in must be below"),
    ({"name": "intermediate_energy"}, "layers"),
    ({"name": "intermediate_energy", "layers": ["a", "a"]}, "layers"),
    ({"name": "la_ood_cotrain"}, "layers"),
    ({"name": "la_ood_cotrain", "layers": []}, "layers"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "lambda": -0.1}, "lambda must be >= 0"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "nu": 0}, r"nu must be in \(0, 1\]"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "nu": 1.5}, "nu must be in"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "nu": "0.1"}, "nu must be a finite number"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "lr": 0}, "lr must be > 0"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "lr": float("nan")}, "lr must be a finite number"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "weight_decay": -1e-4}, "weight_decay must be >= 0"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "cotrain_epochs": 0}, "cotrain_epochs must be an integer >= 1"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "cotrain_epochs": 2.5}, "cotrain_epochs must be an integer"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "cotrain_epochs": True}, "cotrain_epochs must be an integer"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "max_fit_samples": 5}, "max_fit_samples must be an integer >= 10"),
    ({"name": "la_ood_cotrain", "layers": ["a"], "tau": 0.1}, "takes"),
])
def test_bad_parameters_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        make_objective(spec)
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective=spec)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(x.flatten(1))))


@pytest.mark.parametrize("name,params", [("cross_entropy", {}), ("logitnorm", {}), ("outlier_exposure", {}),
                                         ("energy_regularised", {"m_in": -1.0, "m_out": 0.5}),
                                         ("intermediate_energy", {"layers": ["hidden"], "m_in": -2.0, "m_out": 0.0})])
def test_one_training_step_equals_a_hand_written_step(name, params):
    """A batch that is the whole set (so shuffling cannot matter), plain SGD: w <- w - lr * grad(reference loss)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g, dtype=D), torch.randint(0, 3, (8,), generator=g)
    x_out = torch.randn(8, 6, generator=g, dtype=D) * 3
    torch.manual_seed(0)
    net, ref = _Net().double(), _Net().double()
    ref.load_state_dict(net.state_dict())
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                      schedule="constant", objective={"name": name, **params})
    train_classifier(net, TensorDataset(x, y), None, cfg, seed=0, device="cpu",
                     outlier_set=TensorDataset(x_out, torch.full((8,), -1)))

    obj = make_objective({"name": name, **params})
    hidden = ref.hidden(torch.cat([x, x_out]))
    z = ref.head(torch.relu(hidden))
    loss = _reference(name, obj.params, z[:8], y, z[8:], [hidden])
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (k, p), gr in zip(ref.named_parameters(), grads):
        assert torch.allclose(net.state_dict()[k], p.detach() - 0.1 * gr, rtol=1e-8, atol=1e-10), k
    assert not torch.allclose(net.head.weight, ref.head.weight)  # it did take a step


def test_outlier_objective_needs_outliers_and_known_layers():
    ds = TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="outlier_set"):
        train_classifier(_Net(), ds, None, TrainConfig(epochs=1, objective="outlier_exposure"), seed=0, device="cpu")
    with pytest.raises(ValueError, match="no module 'conv9'"):
        train_classifier(_Net(), ds, None, TrainConfig(epochs=1, objective={"name": "intermediate_energy",
                                                                           "layers": ["conv9"]}),
                         seed=0, device="cpu", outlier_set=ds)


def test_objective_loss_returns_the_id_logits():
    net = _Net()
    x, x_out = torch.randn(4, 6), torch.randn(5, 6)
    loss, logits = objective_loss(net, make_objective("outlier_exposure"), x, torch.tensor([0, 1, 2, 0]), x_out)
    assert logits.shape == (4, 3) and torch.allclose(logits, net(x)) and loss.ndim == 0
