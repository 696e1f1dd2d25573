"""Model-in-the-loop detectors (ODIN, GradNorm, GradNormKL, MCD, NAC-UE, Mahalanobis with input
preprocessing) on a tiny CNN, vs per-sample loop references and pytorch-ood 0.4.0.

Agreement with pytorch-ood: ODIN, GradNorm (``param_filter`` = head.weight and all parameters), MCD
(same seed: same dropout masks), NACUE: equal (Spearman 1.0); MahalanobisPreprocessed = 2N x
pytorch-ood's MahalanobisODIN. GradNormKL: pytorch-ood 0.4.0 has no such class (reference only).
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from ood_core.api import InvalidInputError, ModelNotSetException, RequiresFitException
from ood_core.detectors import (
    MCD, NACUE, ODIN, GradNorm, GradNormKL, Mahalanobis, MahalanobisPreprocessed, build_detector, fit_detector,
    get_spec,
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


def _spearman_equal(ours, theirs, rtol=1e-5, atol=1e-6):
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
    det = ODIN(net, t=t, eps=eps, norm_std=std)
    got = det.predict(x)
    np.testing.assert_allclose(got.double().numpy(), ref_odin(net, x, t, eps, std), rtol=1e-5, atol=1e-7)
    pod = pytest.importorskip("pytorch_ood.detector")
    _spearman_equal(got, pod.ODIN(net, eps=eps, temperature=t, norm_std=std).predict(x), atol=1e-7)


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
    return torch.nn.functional.binary_cross_entropy(p, torch.full_like(p, 1 / p.shape[1]), reduction="sum")


@pytest.mark.parametrize("parameters,names", [("head.weight", ["head.weight"]),
                                              ("head.*", ["head.weight", "head.bias"]),
                                              ("conv2.weight,head.bias", ["conv2.weight", "head.bias"])])
@pytest.mark.parametrize("cls,loss", [(GradNorm, ce_uniform), (GradNormKL, bce_uniform)])
def test_gradnorm_matches_per_sample_loop(net, x, parameters, names, cls, loss):
    got = cls(net, parameters=parameters, micro_batch_size=7).predict(x)
    np.testing.assert_allclose(got.double().numpy(), ref_grad_l1(net, x, loss, names), rtol=1e-4, atol=1e-6)


def test_gradnorm_closed_form_equals_torch_func(net, x):
    det = GradNorm(net, t=2.0)
    names = det.selected(net)
    torch.testing.assert_close(det._closed_form(net, x, names), det._per_sample(net, x, names), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pattern", ["head.weight", "*"])
def test_gradnorm_vs_pytorch_ood(net, x, pattern):
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.GradNorm(net, param_filter=lambda n: n == "head.weight" if pattern != "*" else True, temperature=3.0)
    _spearman_equal(GradNorm(net, t=3.0, parameters=pattern).predict(x), theirs.predict(x), rtol=1e-4, atol=1e-6)


# -- MCD ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["var", "mean"])
def test_mcd_matches_reference_and_pytorch_ood(net, x, mode):
    det = MCD(net, samples=8, mode=mode, seed=3)
    got = det.predict(x)
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
    _spearman_equal(got, pod.MCD(net, samples=8, mode=mode).predict(x), rtol=1e-4, atol=1e-7)


def test_mcd_without_dropout_is_deterministic(x):
    torch.manual_seed(1)
    model = TinyNet(p_drop=0.0).eval()
    with torch.no_grad():
        msp = -torch.softmax(model(x), 1).max(1).values
    torch.testing.assert_close(MCD(model, samples=3, mode="mean").predict(x), msp)
    assert torch.all(MCD(model, samples=3).predict(x).abs() < 1e-12)


# -- NAC-UE ---------------------------------------------------------------------------------------------
def test_nacue_vs_pytorch_ood(net, x):
    pod = pytest.importorskip("pytorch_ood.detector")
    g = torch.Generator().manual_seed(4)
    train = torch.randn(40, 3, 6, 6, generator=g)
    loader = [(train[:25], torch.zeros(25, dtype=torch.long)), (train[25:], torch.zeros(15, dtype=torch.long))]
    ours = NACUE(net, layers=["bn1", "conv2"], m_bins=20, alpha=[100.0, 50.0], o_star=3).fit(loader)
    theirs = pod.NACUE(net, layers=[net.bn1, net.conv2], m_bins=20, alpha=[100.0, 50.0], o_star=3).fit(loader)
    torch.testing.assert_close(ours.counts[0], theirs._stats[0].counts)
    _spearman_equal(ours.predict(x), theirs.predict(x))
    # states: z * dKL/dz, spatially averaged, vs a per-sample loop
    st = ours.states(x[:3])
    for i in range(3):
        captured = {}
        h = net.conv2.register_forward_hook(lambda m, a, o: captured.setdefault("z", o))
        xi = x[i:i + 1].clone().requires_grad_(True)
        loss = -torch.log_softmax(net(xi), 1).mean()
        h.remove()
        (gz,) = torch.autograd.grad(loss, captured["z"])
        torch.testing.assert_close(st["conv2"][i], (captured["z"] * gz).mean(dim=(2, 3))[0].detach(),
                                   rtol=1e-4, atol=1e-9)


# -- Mahalanobis with input preprocessing -----------------------------------------------------------------
def test_mahalanobis_preprocessing_vs_loop_and_pytorch_ood(net, x):
    g = torch.Generator().manual_seed(5)
    train = torch.randn(60, 3, 6, 6, generator=g)
    y = torch.arange(60) % 3
    det = MahalanobisPreprocessed(net, eps=0.01, norm_std=STD).fit([(train[:30], y[:30]), (train[30:], y[30:])])
    got = det.predict(x)
    # reference: per sample, autograd of min_c distance, step, distance of the stepped input
    plain = Mahalanobis(net.features).fit_features(net.features(train).detach(), y)
    stepped = []
    for xi in x:
        xi = xi[None].clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(plain._min_distance(net.features(xi).double()).sum(), xi)
        stepped.append((xi - 0.01 * gx.sign() / torch.tensor(STD).view(1, 3, 1, 1)).detach())
    with torch.no_grad():
        ref = plain.predict_features(net.features(torch.cat(stepped)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the base class with eps and a features model does the same without norm_std
    base = Mahalanobis(net.features, eps=0.01).fit_features(net.features(train).detach(), y)
    assert torch.equal(base.predict(x), MahalanobisPreprocessed(net, eps=0.01).fit_features(
        net.features(train).detach(), y).predict(x))
    assert not torch.allclose(base.predict(x), base.predict_features(net.features(x).detach()))  # it perturbs
    pod = pytest.importorskip("pytorch_ood.detector")
    theirs = pod.MahalanobisODIN(net.features, eps=0.01, norm_std=STD)
    theirs.fit([(train, y)])
    _spearman_equal(got, 2 * len(train) * theirs.predict(x).detach(), rtol=2e-3, atol=1e-2)


# -- shared properties ----------------------------------------------------------------------------------------
def _detectors(net):
    g = torch.Generator().manual_seed(6)
    train = torch.randn(30, 3, 6, 6, generator=g)
    y = torch.arange(30) % 3
    return [ODIN(net, norm_std=STD), GradNorm(net), GradNorm(net, parameters="conv1.*"), GradNormKL(net),
            NACUE(net, layers=["relu1", "head"]).fit([(train, y)]),
            MahalanobisPreprocessed(net, eps=0.002).fit([(train, y)])]


def test_batch_independence(net, x):
    for det in _detectors(net):
        full = det.predict(x)
        parts = torch.cat([det.predict(x[i:i + 5]) for i in range(0, len(x), 5)])
        torch.testing.assert_close(parts, full, rtol=1e-4, atol=1e-6, msg=type(det).__name__)


def test_robustness(net, x):
    nan = x.clone()
    nan[1, 0, 0, 0] = float("nan")
    for det in _detectors(net) + [MCD(net, samples=2)]:
        name = type(det).__name__
        with pytest.raises(InvalidInputError, match=name):
            det.predict(nan)
        for const in (torch.zeros(4, 3, 6, 6), torch.full((4, 3, 6, 6), 7.0), x[:1].repeat(4, 1, 1, 1)):
            s = det.predict(const)
            assert s.shape == (4,) and torch.isfinite(s).all(), name
    for cls in (ODIN, GradNorm, GradNormKL, MCD):
        with pytest.raises(ModelNotSetException, match=cls.__name__):
            cls().predict(x)
    with pytest.raises(RequiresFitException, match="NACUE"):
        NACUE(net, layers=["bn1"]).predict(x)
    with pytest.raises(RequiresFitException, match="MahalanobisPreprocessed"):
        MahalanobisPreprocessed(net).predict(x)
    with pytest.raises(InvalidInputError, match="NACUE: model has no module 'nope'"):
        NACUE(net, layers=["nope"]).states(x)
    with pytest.raises(Exception, match="GradNorm: parameters 'fc.weight' match none"):
        GradNorm(net, parameters="fc.weight").predict(x)
    with pytest.raises(InvalidInputError, match="ODIN"):
        ODIN(net).predict(x[0, 0, 0])
    with pytest.raises(ValueError, match="MCD: samples"):
        MCD(net, samples=1)
    with pytest.raises(ValueError, match="ODIN: norm_std"):
        ODIN(net, norm_std=[0.0])


def test_inference_mode_inputs_work(net, x):
    with torch.inference_mode():
        xi = x.clone()
        for det in (ODIN(net), GradNorm(net), GradNorm(net, parameters="conv2.weight")):
            assert torch.isfinite(det.predict(xi)).all()


def test_registry_builds_model_detectors(net, x):
    for name in ("ODIN", "GradNorm", "GradNormKL", "MCD", "MahalanobisPreprocessed", "NACUE"):
        assert get_spec(name).representation == "model"
    assert get_spec("ODIN").search_space == {"t": {"grid": [1, 10, 100, 1000]}, "eps": {"grid": [0.0014, 0.0028]}}
    det = build_detector("ODIN", {"t": 10, "eps": 0.0028, "norm_std": STD})
    det.model = net
    assert det.predict(x).shape == (18,)
    maha = build_detector("MahalanobisPreprocessed", {"eps": 0.002})
    maha.model = net  # the classifier: its .features are used
    maha.fit([(x, torch.arange(18) % 3)])
    assert maha.predict(x).shape == (18,) and maha.mu.shape == (3, 8)
    with pytest.raises(ValueError, match="model in the loop"):
        fit_detector(build_detector("NACUE", {"layers": ["bn1"]}), {"features": x}, torch.zeros(18))
