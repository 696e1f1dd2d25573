"""ODIN, GradNorm, GradNormKL, MCD and MahalanobisPreprocessed (``ood_core.detectors.model_in_loop``) on a tiny
CNN: against per-sample loop references, against pytorch-ood 0.4.0 (built the pytorch-ood way: positional
arguments and its keyword names), and their declared constraints.

Agreement with pytorch-ood: ODIN, GradNorm, MCD (same seed: same dropout masks): equal;
MahalanobisPreprocessed = 2N x pytorch-ood's MahalanobisODIN. GradNormKL: pytorch-ood 0.4.0 has no such class.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ood_core.api import InvalidInputError, ModelNotSetException
from ood_core.constraints import ParameterError
from ood_core.detectors import (
    MCD, ODIN, GradNorm, GradNormKL, Mahalanobis, MahalanobisPreprocessed, build_detector, get_spec,
)

STD = [0.5, 0.25, 0.2]


class TinyNet(nn.Module):
    """conv/bn/relu -> conv/relu -> dropout -> global average pool -> head (the ood_core model interface)."""

    def __init__(self, p_drop=0.3, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(p_drop)
        self.head = nn.Linear(8, classes)

    def features(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.drop(self.relu2(self.conv2(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


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
def x():
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.randn(12, 3, 6, 6, generator=g), 3 * torch.rand(6, 3, 6, 6, generator=g)])


def _equal(ours, theirs, rtol=1e-5, atol=1e-6):
    from scipy.stats import spearmanr

    ours, theirs = ours.double().numpy(), np.asarray(theirs.detach(), np.float64)
    assert spearmanr(ours, theirs).statistic >= 0.999
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol)


# -- ODIN -----------------------------------------------------------------------------------------------
def ref_odin(model, x, t, eps, std):
    scores = []
    for xi in x:
        xi = xi[None].clone().requires_grad_(True)
        logits = model(xi)[0] / t
        loss = -torch.log_softmax(logits, 0)[int(logits.argmax())]
        (g,) = torch.autograd.grad(loss, xi)
        step = g.sign() / torch.tensor(std).view(1, 3, 1, 1) if std else g.sign()
        with torch.no_grad():
            p = torch.softmax(model(xi - eps * step)[0].double() / t, 0)
        scores.append(-float(p.max()))
    return np.array(scores)


@pytest.mark.parametrize("t,eps,std", [(1000.0, 0.0014, STD), (10.0, 0.05, None), (1.0, 0.0, None)])
def test_odin_matches_reference_and_pytorch_ood(net, x, t, eps, std):
    got = ODIN(net, t=t, eps=eps, norm_std=std).predict(x)
    np.testing.assert_allclose(got.double().numpy(), ref_odin(net, x, t, eps, std), rtol=1e-5, atol=1e-7)
    pod = pytest.importorskip("pytorch_ood.detector")
    _equal(got, pod.ODIN(net, eps=eps, temperature=t, norm_std=std).predict(x), atol=1e-7)


def test_odin_built_the_pytorch_ood_way(net, x):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.ODIN(net, F.cross_entropy, 0.01, 10.0, STD).predict(x)
    for ours in (ODIN(net, F.cross_entropy, 0.01, 10.0, STD),  # their positional order
                 ODIN(model=net, criterion=None, eps=0.01, temperature=10.0, norm_std=STD),
                 ODIN(backbone=net, eps=0.01, t=10.0, norm_std=STD)):
        assert ours.t == 10.0
        _equal(ours.predict(x), theirs, atol=1e-7)
    with pytest.raises(TypeError, match="ODIN: give t= or temperature="):
        ODIN(net, t=1.0, temperature=2.0)


def test_odin_step_follows_the_criterion(net, x):
    # a criterion that is the negated cross-entropy steps the other way: lower max softmax than no step
    flip = lambda logits, y: -F.cross_entropy(logits, y)  # noqa: E731
    plain = ODIN(net, eps=0.0, t=1.0).predict(x)
    assert (ODIN(net, criterion=flip, eps=0.05, t=1.0).predict(x) >= plain - 1e-6).all()
    assert (ODIN(net, eps=0.05, t=1.0).predict(x) <= plain + 1e-6).all()


# -- GradNorm / GradNormKL ------------------------------------------------------------------------------------
def ref_grad_l1(model, x, loss_fn, names):
    scores = []
    params = dict(model.named_parameters())
    for xi in x:
        model.zero_grad()
        loss_fn(model(xi[None])).backward()
        scores.append(-sum(float(params[n].grad.abs().sum()) for n in names))
    model.zero_grad()
    return np.array(scores)


def ce_uniform(logits):
    return -torch.log_softmax(logits, dim=1).mean()


def bce_uniform(logits):
    p = torch.softmax(logits, dim=1)
    return F.binary_cross_entropy(p, torch.full_like(p, 1 / p.shape[1]), reduction="sum")


@pytest.mark.parametrize("parameters,names", [("head.weight", ["head.weight"]),
                                              ("head.*", ["head.weight", "head.bias"]),
                                              ("conv2.weight,head.bias", ["conv2.weight", "head.bias"])])
@pytest.mark.parametrize("cls,loss", [(GradNorm, ce_uniform), (GradNormKL, bce_uniform)])
def test_gradnorm_matches_per_sample_loop(net, x, parameters, names, cls, loss):
    got = cls(net, parameters=parameters, micro_batch_size=7).predict(x)
    np.testing.assert_allclose(got.double().numpy(), ref_grad_l1(net, x, loss, names), rtol=1e-4, atol=1e-6)


def test_gradnorm_closed_form_equals_torch_func(net, x):
    det = GradNorm(net, t=2.0, parameters="head.*")
    names = det.selected(net)
    torch.testing.assert_close(det._closed_form(net, x, names), det._per_sample(net, x, names), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pattern", ["head.weight", "*"])
def test_gradnorm_vs_pytorch_ood(net, x, pattern):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.GradNorm(net, param_filter=lambda n: n == "head.weight" if pattern != "*" else True, temperature=3.0)
    _equal(GradNorm(net, t=3.0, parameters=pattern).predict(x), theirs.predict(x), rtol=1e-4, atol=1e-6)


def test_gradnorm_built_the_pytorch_ood_way(net, x):
    pod = pytest.importorskip("pytorch_ood.detector")
    only_head = lambda name: name.startswith("head")  # noqa: E731
    theirs = pod.GradNorm(net, only_head, 5, 2.0).predict(x)
    _equal(GradNorm(net, only_head, 5, 2.0).predict(x), theirs, rtol=1e-4, atol=1e-6)  # positional
    _equal(GradNorm(net, param_filter=only_head, micro_batch_size=5, temperature=2.0).predict(x), theirs,
           rtol=1e-4, atol=1e-6)
    # their default (param_filter=None) selects every parameter; ours with parameters=None
    _equal(GradNorm(net, param_filter=None).predict(x), pod.GradNorm(net).predict(x), rtol=1e-4, atol=1e-6)


def test_gradnorm_selection_errors(net, x):
    with pytest.raises(Exception, match="GradNorm: parameters 'fc.weight' match none"):
        GradNorm(net, parameters="fc.weight").predict(x)
    with pytest.raises(ParameterError, match="GradNorm: parameters=3"):
        GradNorm(net, parameters=3)
    with pytest.raises(ParameterError, match="GradNorm: t=0"):
        GradNorm(net, t=0)


# -- MCD ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["var", "mean"])
def test_mcd_matches_reference_and_pytorch_ood(net, x, mode):
    got = MCD(net, samples=8, mode=mode, seed=3).predict(x)
    assert not net.training and not net.drop.training and not net.bn1.training  # modes restored
    torch.manual_seed(3)  # reference: the same passes with the same global-RNG masks
    net.train()
    net.bn1.eval()
    with torch.no_grad():
        probs = torch.stack([torch.softmax(net(x), 1).double() for _ in range(8)])
    net.eval()
    ref = probs.var(0).mean(1) if mode == "var" else -probs.mean(0).max(1).values
    np.testing.assert_allclose(got.double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-9)
    assert torch.equal(MCD(net, samples=8, mode=mode, seed=3).predict(x), got)  # seeded: reproducible
    pod = pytest.importorskip("pytorch_ood.detector")
    torch.manual_seed(3)
    theirs = pod.MCD(net, 8, mode, True).predict(x)  # their positional order
    _equal(got, theirs, rtol=1e-4, atol=1e-7)
    torch.manual_seed(3)
    _equal(MCD(net, 8, mode, True).predict(x), theirs, rtol=1e-4, atol=1e-7)


def test_mcd_without_dropout_is_deterministic(x):
    torch.manual_seed(1)
    model = TinyNet(p_drop=0.0).eval()
    with torch.no_grad():
        msp = -torch.softmax(model(x), 1).max(1).values
    torch.testing.assert_close(MCD(model, samples=3, mode="mean").predict(x), msp)
    assert torch.all(MCD(model, samples=3).predict(x).abs() < 1e-12)


def test_mcd_constraints(net):
    with pytest.raises(ParameterError, match="MCD: samples=1 must be >= 2 with mode='var'"):
        MCD(net, samples=1)
    assert MCD(net, samples=1, mode="mean").samples == 1
    MCD.check_params({"samples": 1})  # one value alone (as `validate` checks it) is not refused
    with pytest.raises(ParameterError, match="MCD: mode='median' must be one of 'var', 'mean'"):
        MCD(net, mode="median")


# -- Mahalanobis with input preprocessing -----------------------------------------------------------------
def _gaussians(z, y):
    """Class means and the inverse shared covariance (float64, no ridge: well-conditioned test features)."""
    z, y = z.double(), y
    mu = torch.stack([z[y == c].mean(0) for c in range(int(y.max()) + 1)])
    centred = z - mu[y]
    return mu, torch.linalg.inv(centred.T @ centred / len(z))


def ref_maha_pre(features, x, mu, prec, eps, std):
    def dist(z):
        diff = z.double()[:, None, :] - mu[None]  # (N, C, D)
        return torch.einsum("ncd,de,nce->nc", diff, prec, diff).min(dim=1).values

    out = []
    for xi in x:
        xi = xi[None].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(dist(features(xi)).sum(), xi)
        step = g.sign() / torch.tensor(std).view(1, 3, 1, 1) if std else g.sign()
        with torch.no_grad():
            out.append(dist(features(xi - eps * step)))
    return torch.cat(out)


@pytest.fixture(scope="module")
def train():
    g = torch.Generator().manual_seed(5)
    return torch.randn(60, 3, 6, 6, generator=g), torch.arange(60) % 3


@pytest.mark.parametrize("eps,std", [(0.01, STD), (0.05, None), (0.0, None)])
def test_mahalanobis_preprocessed_matches_reference(net, x, train, eps, std):
    xt, y = train
    det = MahalanobisPreprocessed(net, eps=eps, norm_std=std).fit([(xt[:30], y[:30]), (xt[30:], y[30:])])
    with torch.no_grad():
        mu, prec = _gaussians(net.features(xt), y)
    ref = ref_maha_pre(net.features, x, mu, prec, eps, std)
    torch.testing.assert_close(det.predict(x).double(), ref, rtol=1e-3, atol=1e-3)
    if eps == 0:  # no step: the plain detector on the features
        plain = Mahalanobis().fit_features(net.features(xt).detach(), y)
        torch.testing.assert_close(det.predict(x), plain.predict_features(net.features(x).detach()))


def test_mahalanobis_preprocessed_vs_pytorch_ood(net, x, train):
    pod = pytest.importorskip("pytorch_ood.detector")
    xt, y = train
    theirs = pod.MahalanobisODIN(net.features, 0.01, STD)  # their positional order
    theirs.fit([(xt, y)])
    want = 2 * len(xt) * theirs.predict(x).detach()
    for ours in (MahalanobisPreprocessed(net.features, 0.01, STD), MahalanobisPreprocessed(encoder=net.features,
                                                                                         eps=0.01, norm_std=STD)):
        _equal(ours.fit([(xt, y)]).predict(x), want, rtol=2e-3, atol=1e-2)


def test_mahalanobis_preprocessed_fits_cached_features_and_moves(net, x, train):
    xt, y = train
    det = build_detector("MahalanobisPreprocessed", {"eps": 0.002})
    det.model = net  # the classifier: its .features are used
    via_loader = det.fit([(xt, y)]).predict(x)
    cached = MahalanobisPreprocessed(net, eps=0.002).fit_features(net.features(xt).detach(), y)
    torch.testing.assert_close(cached.predict(x), via_loader)
    cached.model = copy.deepcopy(net)  # to() moves the model too
    assert cached.to("meta").mu.device.type == "meta" and cached.model.head.weight.device.type == "meta"


# -- shared: registry, inputs, errors --------------------------------------------------------------------------
def test_registry_contract(net, x):
    for name in ("ODIN", "GradNorm", "GradNormKL", "MCD", "MahalanobisPreprocessed"):
        assert get_spec(name).representation == "model"
    assert get_spec("ODIN").search_space == {"t": {"grid": [1, 10, 100, 1000]}, "eps": {"grid": [0.0014, 0.0028]}}
    det = build_detector("ODIN", {"t": 10, "eps": 0.0028, "norm_std": STD})
    det.model = net
    assert det.predict(x).shape == (18,)
    for name, param, value, msg in (("ODIN", "t", 0, r"\(0, inf\)"), ("ODIN", "eps", -0.1, r"\[0, inf\)"),
                                    ("ODIN", "norm_std", [0.5, 0.0], "item 1"),
                                    ("MahalanobisPreprocessed", "norm_std", [-1.0], "item 0"),
                                    ("GradNorm", "micro_batch_size", 0, r"\[1, inf\)")):
        with pytest.raises(ParameterError, match=f"{name}: {param}=.*{msg}"):
            build_detector(name, {param: value})


def test_constant_and_duplicated_inputs_give_finite_scores(net, x, train):
    xt, y = train
    dets = [ODIN(net, norm_std=STD), GradNorm(net), GradNorm(net, parameters="conv1.*"), GradNormKL(net),
            MCD(net, samples=2), MahalanobisPreprocessed(net, eps=0.002).fit([(xt, y)])]
    for det in dets:
        for const in (torch.zeros(4, 3, 6, 6), torch.full((4, 3, 6, 6), 7.0), x[:1].repeat(4, 1, 1, 1)):
            s = det.predict(const)
            assert s.shape == (4,) and torch.isfinite(s).all(), type(det).__name__


def test_inputs_errors_and_inference_mode(net, x):
    for cls in (ODIN, GradNorm, GradNormKL, MCD):
        with pytest.raises(ModelNotSetException, match=cls.__name__):
            cls().predict(x)
    with pytest.raises(InvalidInputError, match="ODIN: inputs must be a batch"):
        ODIN(net).predict(x[0, 0, 0])
    with torch.inference_mode():
        xi = x.clone()
        for det in (ODIN(net), GradNorm(net), GradNorm(net, parameters="conv2.weight")):
            assert torch.isfinite(det.predict(xi)).all()
