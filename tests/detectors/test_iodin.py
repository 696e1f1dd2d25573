"""i-ODIN vs a plainly written reference of OpenOOD's ``iodin_postprocessor.py`` (one sample at a time: the
cross-entropy to the prediction at temperature T, the entry of largest |gradient|, ``ge(grad, 0)`` signs divided by
the per-channel std), and its quirks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ood_core.constraints import ParameterError
from ood_core.detectors import IODIN, ODIN, build_detector

STD = (0.25, 0.5, 0.75)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).eval()


def _images(n=12):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, 5, 5, generator=g)


def ref_iodin(net, x, eps, t, std):
    scores, stepped = [], []
    for xi in x:
        data = xi[None].clone().requires_grad_(True)
        out = net(data)
        loss = nn.CrossEntropyLoss()(out / t, out.detach().argmax(dim=1))
        loss.backward()
        grad = data.grad.detach()
        flat = grad.abs().reshape(-1)
        mask = torch.zeros_like(flat)
        mask[int(flat.argmax())] = 1.0
        mask = mask.reshape(grad.shape)
        sign = (torch.ge(grad, 0).float() - 0.5) * 2
        for c in range(3):
            sign[:, c] = sign[:, c] / std[c]
        new = data.detach() - eps * sign * mask
        stepped.append(new[0])
        with torch.no_grad():
            scores.append(-torch.softmax(net(new) / t, dim=1).max())
    return torch.stack(scores), torch.stack(stepped)


@pytest.mark.parametrize("eps,t", [(0.0014, 1000.0), (0.0028, 1.0), (0.5, 10.0)])
def test_iodin_matches_openood(eps, t):
    net, x = _net(), _images()
    det = IODIN(net, eps=eps, t=t, norm_std=STD)
    want_scores, want_x = ref_iodin(net, x, eps, t, STD)
    torch.testing.assert_close(det.preprocess(x), want_x)
    torch.testing.assert_close(det.predict(x), want_scores)


def test_one_entry_per_sample_changes_where_odin_changes_all():
    net, x = _net(), _images()
    changed = (IODIN(net, eps=0.01).preprocess(x) != x).reshape(len(x), -1).sum(dim=1)
    assert changed.tolist() == [1] * len(x)
    assert bool(((ODIN(net, eps=0.01).preprocess(x) != x).reshape(len(x), -1).sum(dim=1) > 1).all())


def test_a_zero_gradient_steps_the_first_entry_up_as_openood():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 2) + 0 * x.flatten(1)[:, :1]

    x = _images(2)
    out = IODIN(Constant(), eps=0.1).preprocess(x)
    assert torch.equal(out.reshape(2, -1)[:, 0], x.reshape(2, -1)[:, 0] - 0.1)
    assert torch.equal(out.reshape(2, -1)[:, 1:], x.reshape(2, -1)[:, 1:])


def test_eps_zero_is_temperature_scaled_msp():
    net, x = _net(), _images()
    with torch.no_grad():
        want = -torch.softmax(net(x) / 10.0, dim=1).amax(dim=1)
    torch.testing.assert_close(IODIN(net, eps=0.0, t=10.0).predict(x), want)


def test_iodin_constraints_and_registry():
    with pytest.raises(ParameterError, match="IODIN: eps="):
        IODIN(_net(), eps=-1.0)
    det = build_detector("IODIN", {"t": 100.0})
    assert isinstance(det, IODIN) and det.t == 100.0
    assert IODIN(_net(), temperature=10.0).t == 10.0  # pytorch-ood's ODIN keyword
