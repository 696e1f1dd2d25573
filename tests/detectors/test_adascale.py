"""ood_core/detectors/adascale.py: AdaSCALE-A / -L against a per-sample loop reference of the official logic
(OpenOOD's adascale_postprocessor.py / adascale_net.py), and that logic's quirks: the perturbed entries are those
of smallest gradient magnitude, a fixed 0.5 step, ``1 - ECDF`` mapped into [p_min, p_max], torch.round for k."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ood_core.constraints import ParameterError
from ood_core.detectors import AdaScaleA, AdaScaleL
from ood_core.detectors.adascale import OPENOOD_PERCENTILES, adascale_ratio, perturb


class SmoothNet(nn.Module):
    """Smooth activations, so no input gradient is exactly 0 (no ties in the choice of entries to perturb)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def features(self, x):
        return nn.functional.softplus(self.conv(x) - 0.5).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g) + shift


# -- the reference: one sample at a time, numpy -----------------------------------------------------------
def ref_pair(net, x, o):
    """Features and perturbed features of one sample (1, C, H, W), as OpenOOD's postprocess."""
    xi = x.clone().requires_grad_(True)
    out = net(xi)
    out[0, out[0].argmax()].backward()
    g = xi.grad.detach().numpy().ravel()
    n = int(g.size * o)
    mask = np.zeros_like(g)
    mask[np.argsort(np.abs(g), kind="stable")[:n]] = 1.0  # the n smallest |g|
    xp = x.numpy().ravel() + 0.5 * mask * np.sign(g)
    with torch.no_grad():
        z = net.features(x)[0].double().numpy()
        zp = net.features(torch.tensor(xp, dtype=torch.float32).reshape(x.shape))[0].double().numpy()
    return z, zp


def ref_q(z, zp, k1, k2, lmbda):
    d = z.size
    top1 = np.argsort(-z)[: max(1, int(d * k1 / 100))]
    top2 = np.argsort(-z)[: max(1, int(d * k2 / 100))]
    return np.maximum(zp[top1], 0).sum() + lmbda * np.abs(z - zp)[top2].sum()


def ref_scores(net, x_fit, x_test, percentile, k1, k2, lmbda, o, logit_scaling):
    fit_q = [ref_q(*ref_pair(net, x_fit[i:i + 1], o), k1, k2, lmbda) for i in range(len(x_fit))]
    w, b = net.head.weight.detach().double().numpy(), net.head.bias.detach().double().numpy()
    out = []
    for i in range(len(x_test)):
        z, zp = ref_pair(net, x_test[i:i + 1], o)
        ecdf = sum(1 for v in fit_q if v <= ref_q(z, zp, k1, k2, lmbda)) / len(fit_q)
        p = percentile[0] + (1 - ecdf) * (percentile[1] - percentile[0])
        a = np.maximum(z, 0)
        k = max(1, a.size - int(np.round(a.size * p / 100)))
        r = a.sum() / np.sort(a)[::-1][:k].sum()
        logits = (w @ z + b) * r**2 if logit_scaling else w @ (z * np.exp(r)) + b
        m = logits.max()
        out.append(-(m + np.log(np.exp(logits - m).sum())))
    return np.array(out)


@pytest.mark.parametrize("cls", [AdaScaleA, AdaScaleL])
@pytest.mark.parametrize("params", [{}, {"percentile": [60, 95], "k1": 25, "k2": 10, "lmbda": 2.0, "o": 0.2}])
def test_matches_the_per_sample_reference(cls, params):
    net = SmoothNet().eval()
    x_fit, x_test = _images(40, 0), torch.cat([_images(6, 1), _images(6, 2, shift=2.0)])
    det = cls(net, **params).fit([(x_fit[:25], None), (x_fit[25:], None)])
    full = {"percentile": [75, 85], "k1": 5, "k2": 1, "lmbda": 10.0, "o": 0.05, **params}
    want = ref_scores(net, x_fit, x_test, logit_scaling=cls is AdaScaleL, **full)
    np.testing.assert_allclose(det.predict(x_test).double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_perturb_steps_the_smallest_gradients_by_half():
    x = torch.zeros(1, 4)
    grad = torch.tensor([[0.1, -5.0, -0.01, 3.0]])
    torch.testing.assert_close(perturb(x, grad, o=0.5), torch.tensor([[0.5, 0.0, -0.5, 0.0]]))
    torch.testing.assert_close(perturb(x, grad, o=0.1), x)  # int(4 * 0.1) = 0 entries


def test_ratio_rounds_k_and_keeps_it_positive():
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3 + [[0.0] * 4])
    r = adascale_ratio(a, torch.tensor([50.0, 62.5, 99.0, 50.0]))
    # k = 4 - round(2) = 2; 4 - round(2.5) = 2 (half to even); 4 - round(3.96) = 0 -> 1; all zero -> r = 1
    torch.testing.assert_close(r, torch.tensor([10 / 7, 10 / 7, 10 / 4, 1.0]))


def test_percentile_adapts_between_the_bounds():
    net = SmoothNet().eval()
    det = AdaScaleA(net, percentile=[60, 90]).fit([(_images(30, 0), None)])
    z, zp = det._features_pair(torch.cat([_images(10, 1), _images(10, 2, shift=3.0)]))
    p = det.adaptive_percentiles(z, zp)
    assert bool(((p >= 60) & (p <= 90)).all()) and p.unique().numel() > 1


def test_openood_grid_has_its_36_pairs():
    assert len(OPENOOD_PERCENTILES) == 36 and [60, 65] in OPENOOD_PERCENTILES and [95, 99] in OPENOOD_PERCENTILES
    assert all(lo < hi for lo, hi in OPENOOD_PERCENTILES)


@pytest.mark.parametrize("params,field", [
    ({"percentile": [90, 80]}, "percentile"), ({"percentile": [50, 100]}, "percentile"), ({"o": 0.0}, "o"),
    ({"k1": 0}, "k1"), ({"lmbda": -1.0}, "lmbda"),
])
def test_constraint_errors_name_the_field(params, field):
    with pytest.raises(ParameterError, match=f"AdaScaleA: {field}="):
        AdaScaleA(None, **params)


def test_a_model_without_features_and_head_is_refused():
    det = AdaScaleL(nn.Sequential(nn.Flatten(), nn.Linear(75, 3)))
    with pytest.raises(Exception, match="AdaScaleL: needs a model with features"):
        det.fit([(_images(4, 0), None)])
