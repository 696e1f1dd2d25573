"""NAC-UE (``ood_core.detectors.nac``): states vs a per-sample loop, bins / coverage vs a plain-Python reference,
agreement with pytorch-ood 0.4.0 (built the pytorch-ood way), and its declared constraints."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from ood_core.api import InvalidInputError, RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import NACUE, build_detector, fit_detector, get_spec


class TinyNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.head.weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(4)
    train = torch.randn(40, 3, 6, 6, generator=g)
    loader = [(train[:25], torch.zeros(25, dtype=torch.long)), (train[25:], torch.zeros(15, dtype=torch.long))]
    x = torch.cat([torch.randn(12, 3, 6, 6, generator=g), 3 * torch.rand(6, 3, 6, 6, generator=g)])
    return loader, x


def test_states_match_a_per_sample_loop(net, data):
    _, x = data
    st = NACUE(net, layers=["bn1", "conv2"]).states(x[:3])
    for i in range(3):
        captured = {}
        h = net.conv2.register_forward_hook(lambda m, a, o: captured.setdefault("z", o))
        loss = -torch.log_softmax(net(x[i:i + 1].clone().requires_grad_(True)), 1).mean()
        h.remove()
        (gz,) = torch.autograd.grad(loss, captured["z"])
        torch.testing.assert_close(st["conv2"][i], (captured["z"] * gz).mean(dim=(2, 3))[0].detach(),
                                   rtol=1e-4, atol=1e-9)


def test_bins_and_coverage_match_reference():
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
    assert int(det.counts[0].sum()) == 45 * 5  # the 5 rows labelled -1 are left out


def test_vs_pytorch_ood_built_their_way(net, data):
    pod = pytest.importorskip("pytorch_ood.detector")
    loader, x = data
    theirs = pod.NACUE(net, [net.bn1, net.conv2], 20, [100.0, 50.0], 3).fit(loader)
    want = theirs.predict(x)
    for ours in (NACUE(net, [net.bn1, net.conv2], 20, [100.0, 50.0], 3),  # their positional order, modules
                 NACUE(net, layers=["bn1", "conv2"], m_bins=20, alpha=[100.0, 50.0], o_star=3)):
        ours.fit(loader)
        torch.testing.assert_close(ours.counts[0], theirs._stats[0].counts)
        torch.testing.assert_close(ours.predict(x), want, rtol=1e-5, atol=1e-6)
    # feature_reduce (theirs too): a max over space instead of the mean
    amax = lambda t: t.amax(dim=(2, 3)) if t.ndim == 4 else t  # noqa: E731
    theirs = pod.NACUE(net, [net.conv2], 20, 100.0, 3, amax).fit(loader)
    ours = NACUE(net, [net.conv2], 20, 100.0, 3, amax).fit(loader)
    torch.testing.assert_close(ours.predict(x), theirs.predict(x), rtol=1e-5, atol=1e-6)


def test_fit_on_states_equals_fit_on_inputs(net, data):
    loader, x = data
    on_inputs = NACUE(net, layers=["relu1", "head"], m_bins=8).fit(loader)
    det = NACUE(net, layers=["relu1", "head"], m_bins=8)
    states = [det.states(xb) for xb, _ in loader]
    det.fit_structured({k: torch.cat([s[k] for s in states]) for k in states[0]}, torch.zeros(40))
    torch.testing.assert_close(det.predict(x), on_inputs.predict(x))
    det.model = copy.deepcopy(net)  # to() moves the model too
    assert all(c.device.type == "meta" for c in det.to("meta").counts)
    assert det.model.conv1.weight.device.type == "meta"


def test_per_layer_values_are_checked_against_the_layers_in_fit(net, data):
    loader, _ = data
    for param, value in (("m_bins", [10, 20, 30]), ("alpha", [1.0]), ("o_star", [5, 5, 5])):
        det = NACUE(net, layers=["bn1", "conv2"], **{param: value})  # the layer count is known in fit
        with pytest.raises(ParameterError, match=rf"NACUE: {param}=.* must have 2 items \(L: the number of layers\)"):
            det.fit(loader)
        with pytest.raises(ParameterError, match=f"NACUE: {param}="):
            det.fit_structured({"bn1": torch.randn(5, 6), "conv2": torch.randn(5, 8)})


def test_constraints_and_errors(net, data):
    loader, x = data
    with pytest.raises(ParameterError, match="NACUE: layers=.* at least 1"):
        NACUE(net)
    with pytest.raises(ParameterError, match="NACUE: m_bins=1 must be in"):
        NACUE(net, layers="bn1", m_bins=1)
    with pytest.raises(ParameterError, match="NACUE: alpha=.*item 1"):
        NACUE(net, layers=["bn1", "conv2"], alpha=[1.0, 0.0])
    with pytest.raises(RequiresFitException, match="NACUE"):
        NACUE(net, layers=["bn1"]).predict(x)
    with pytest.raises(InvalidInputError, match="NACUE: model has no module 'nope'"):
        NACUE(net, layers=["nope"]).states(x)
    with pytest.raises(InvalidInputError, match="not modules of the model"):
        NACUE(net, layers=[nn.ReLU()]).states(x)
    with pytest.raises(InvalidInputError, match="NACUE: no in-distribution samples"):
        NACUE(net, layers=["bn1"]).fit([(x, -torch.ones(len(x)))])
    det = NACUE(net, layers=["bn1", "conv2"]).fit(loader)
    with pytest.raises(InvalidInputError, match="NACUE: layer 'conv2' has 3 neurons, fitted for 8"):
        det.predict_structured({"bn1": torch.randn(4, 6), "conv2": torch.randn(4, 3)})
    with pytest.raises(InvalidInputError, match="NACUE: needs the state columns \\['conv2'\\]"):
        det.predict_structured({"bn1": torch.randn(4, 6)})
    with pytest.raises(InvalidInputError, match="different row counts"):
        det.predict_structured({"bn1": torch.randn(4, 6), "conv2": torch.randn(5, 8)})


def test_constant_and_duplicated_states_are_finite():
    n = 30
    y = torch.arange(n) % 3
    for make in (torch.zeros, torch.ones):
        for reps in ({"a": make(n, 4)}, {"a": torch.randn(1, 4).repeat(n, 1)}):
            det = NACUE(layers=["a"]).fit_structured(reps, y)
            s = det.predict_structured({"a": torch.cat([reps["a"], 5 + reps["a"]])})
            assert s.shape == (2 * n,) and torch.isfinite(s).all()


def test_registry(net, data):
    _, x = data
    spec = get_spec("NACUE")
    assert spec.representation == "model" and not spec.constraints["o_star"].structural
    with pytest.raises(ValueError, match="model in the loop"):
        fit_detector(build_detector("NACUE", {"layers": ["bn1"]}), {"features": x}, torch.zeros(18))
