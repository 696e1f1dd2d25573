"""LA-OOD co-training (ood_core.cotraining, objective la_ood_cotrain): the loss against a plainly written
reference with a fitted scikit-learn OneClassSVM, one co-training step by hand, and train_classifier end to end
(deterministic, resumable)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.svm import OneClassSVM
from torch import nn
from torch.utils.data import TensorDataset

from ood_core import storage
from ood_core.cotraining import LayerSVM, cotrain_loss, feature_moments, fit_layer_svms
from ood_core.detectors.la_ood import LAOOD
from ood_core.models import build_model
from ood_core.objectives import make_objective
from ood_core.training import TrainConfig, train_classifier

D = torch.float64


def _svm(rng, dim, gamma, nu=0.3):
    """A scikit-learn OCSVM on standard-normal rows; returns it and its kernel expansion."""
    svm = OneClassSVM(kernel="rbf", nu=nu, gamma=gamma).fit(rng.normal(size=(40, dim)))
    return svm, LayerSVM(torch.tensor(svm.support_vectors_), torch.tensor(svm.dual_coef_.ravel()), gamma)


def _reference(z, y, acts, moments, svms, lam):
    """CE(z, y) - lam / (2 L) * sum_l sum_i sum_j alpha_lj exp(-gamma_l ||f~_l(x_i) - s_lj||^2), written out one
    sample, one support vector and one coordinate at a time (tensor indexing and arithmetic keep the graph)."""
    n = len(y)
    ce = sum(-z[i, y[i]] + torch.log(torch.exp(z[i]).sum()) for i in range(n)) / n
    total = 0.0
    for a, (mean, std), svm in zip(acts, moments, svms):
        sv, alpha = svm.support_vectors, svm.dual_coef
        for i in range(n):
            if a.ndim == 4:  # spatial mean, written out
                cells = [a[i, :, h, w] for h in range(a.shape[2]) for w in range(a.shape[3])]
                f = sum(cells) / len(cells)
            else:
                f = a[i]
            f = (f - mean) / std
            for j in range(len(alpha)):
                d2 = sum((f[d] - sv[j, d]) ** 2 for d in range(len(f)))
                total = total + alpha[j] * torch.exp(-svm.gamma * d2)
    return ce - lam * total / (2 * len(svms))


def test_loss_and_gradient_equal_the_reference_with_a_fitted_sklearn_ocsvm():
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(5, 3, generator=g, dtype=D) * 2).requires_grad_()
    y = torch.tensor([0, 2, 1, 1, 0])
    acts = [torch.randn(5, 4, 3, 2, generator=g, dtype=D).requires_grad_(),
            torch.randn(5, 6, generator=g, dtype=D).requires_grad_()]
    moments = [(torch.randn(4, generator=g, dtype=D) * 0.1, torch.rand(4, generator=g, dtype=D) * 0.2 + 0.3),
               (torch.randn(6, generator=g, dtype=D) * 0.1, torch.rand(6, generator=g, dtype=D) + 0.5)]
    (sk0, svm0), (sk1, svm1) = _svm(rng, 4, 0.3), _svm(rng, 6, 0.1)
    assert len(svm0.dual_coef) > 3 and len(svm1.dual_coef) > 3
    lam = 0.7
    got, term = cotrain_loss(z, y, acts, moments, [svm0, svm1], lam)
    ref = _reference(z, y, acts, moments, [svm0, svm1], lam)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    # the term is scikit-learn's own kernel score (decision function + offset), summed over the batch
    f0 = ((acts[0].mean(dim=(2, 3)) - moments[0][0]) / moments[0][1]).detach().numpy()
    f1 = ((acts[1] - moments[1][0]) / moments[1][1]).detach().numpy()
    assert term.item() == pytest.approx((sk0.score_samples(f0).sum() + sk1.score_samples(f1).sum()) / 4, rel=1e-10)
    assert term.item() > 1e-3  # the detector term is not negligible here
    leaves = [z] + acts
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(ref, leaves)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_streamed_moments_equal_the_direct_ones():
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 25, 4)).double()
    x = torch.randn(23, 1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=D)
    (m0, s0), (m1, s1) = feature_moments(net, x.split(5), ["0", "3"])
    with torch.no_grad():
        f0, f1 = net[0](x).mean(dim=(2, 3)), net(x)
    assert torch.allclose(m0, f0.mean(0)) and torch.allclose(s0, f0.std(0, unbiased=False))
    assert torch.allclose(m1, f1.mean(0)) and torch.allclose(s1, f1.std(0, unbiased=False))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(x.flatten(1))))


def test_cotraining_steps_equal_hand_written_steps(tmp_path):
    """One main epoch, then two co-training epochs of one batch each (the whole set): the OCSVMs those LAOOD fits
    on the features of the weights w0 the co-training starts from; each epoch's moments from the features of that
    epoch's starting weights (no augmentation, no batch norm: eval and train mode agree); SGD with momentum and
    weight decay: d_t = g_t + wd w_t, b_1 = d_1, b_2 = mu b_1 + d_2, w_{t+1} = w_t - lr b_t."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=g, dtype=D), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    net = _Net().double()
    spec = {"name": "la_ood_cotrain", "layers": ["hidden", "head"], "cotrain_epochs": 2, "lambda": 2.0, "nu": 0.3}
    cfg = TrainConfig(epochs=1, batch_size=24, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                      schedule="constant", objective=spec)
    after = []
    uri = str(tmp_path / "run.resume")
    hist = train_classifier(net, TensorDataset(x, y), None, cfg, seed=0, device="cpu", resume_uri=uri,
                            on_epoch=lambda row: after.append({k: v.clone() for k, v in net.state_dict().items()}))
    assert [r["epoch"] for r in hist] == [1, 2, 3] and "ocsvm_term" in hist[1] and "ocsvm_term" not in hist[0]

    def features(state):
        ref = _Net().double()
        ref.load_state_dict(state)
        with torch.no_grad():
            hidden = ref.hidden(x)
            return ref, {"hidden": hidden, "head": ref.head(torch.relu(hidden))}

    ref, feats = features(after[0])  # w0: the weights the co-training started from
    # the OCSVMs: those LAOOD fits on w0's features (all 24 rows, no hold-out), as the run stored them
    stored = torch.load(uri, weights_only=True)["cotrain"]["svms"]
    det = LAOOD(["hidden", "head"], nu=0.3, holdout=0.0).fit_structured(feats)
    svms = []
    for l, s in enumerate(stored):
        assert s["gamma"] == det.gammas_[l]
        assert torch.allclose(s["support_vectors"], det.support_vectors_[l], rtol=1e-9, atol=1e-12)
        assert torch.allclose(s["dual_coef"], det.dual_coef_[l], rtol=1e-6, atol=1e-9)
        svms.append(LayerSVM(s["support_vectors"], s["dual_coef"], s["gamma"]))

    p = make_objective(spec).params
    assert (p["lr"], p["momentum"], p["weight_decay"]) == (0.001, 0.9, 1e-4)

    def grads(ref, moments):
        hidden = ref.hidden(x)
        z = ref.head(torch.relu(hidden))
        loss = _reference(z, y, [hidden, z], moments, svms, p["lambda"])
        return loss, torch.autograd.grad(loss, list(ref.parameters()))

    def moments_of(feats):
        return [(f.mean(0), f.std(0, unbiased=False)) for f in feats.values()]

    names = [k for k, _ in ref.named_parameters()]
    w0 = {k: w.detach() for k, w in ref.named_parameters()}
    loss1, g1 = grads(ref, moments_of(feats))
    ce = torch.autograd.grad(nn.functional.cross_entropy(ref(x), y), list(ref.parameters()))
    assert not any(torch.allclose(a, b) for a, b in zip(g1, ce))  # the detector term moved the step
    b1 = {k: g1[i] + p["weight_decay"] * w0[k] for i, k in enumerate(names)}
    w1 = {k: w0[k] - p["lr"] * b1[k] for k in names}
    for k in names:
        assert torch.allclose(after[1][k], w1[k], rtol=1e-8, atol=1e-12), k
    assert hist[1]["train_loss"] == pytest.approx(loss1.item(), rel=1e-10)

    ref1, feats1 = features(after[1])
    loss2, g2 = grads(ref1, moments_of(feats1))  # epoch 2: the moments recomputed on w1's features
    _, g2_stale = grads(ref1, moments_of(feats))
    w2, w2_stale = {}, {}
    for i, k in enumerate(names):
        b2 = p["momentum"] * b1[k] + g2[i] + p["weight_decay"] * w1[k]
        w2[k] = w1[k] - p["lr"] * b2
        w2_stale[k] = w1[k] - p["lr"] * (p["momentum"] * b1[k] + g2_stale[i] + p["weight_decay"] * w1[k])
        assert torch.allclose(net.state_dict()[k], w2[k], rtol=1e-8, atol=1e-12), k
    assert not all(torch.allclose(w2[k], w2_stale[k], rtol=1e-8, atol=1e-12) for k in names)  # able to tell
    assert hist[2]["train_loss"] == pytest.approx(loss2.item(), rel=1e-10)


def _images(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + y[:, None, None, None].float()
    return TensorDataset(x, y)


SPEC = {"name": "la_ood_cotrain", "layers": ["conv1", "relu2", "gap"], "cotrain_epochs": 2, "lambda": 0.5,
        "nu": 0.1}
CFG = TrainConfig(epochs=1, batch_size=16, lr=0.05, augment="flip", objective=SPEC)


def _train(cfg=CFG, on_epoch=None, **kw):
    model = build_model("small_cnn", num_classes=3, in_channels=1, image_size=8, seed=0, width=0.25)
    hist = train_classifier(model, _images(), _images(24, seed=1), cfg, seed=3, device="cpu",
                            on_epoch=on_epoch and (lambda row: on_epoch(row, model)), **kw)
    return model, hist


def _same(a, b):
    return all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), b.state_dict().values()))


def _rows(hist):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in hist]


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run, and its weights after the main loop (epoch 1)."""
    after_main = []
    model, hist = _train(on_epoch=lambda row, net: after_main.append({k: v.clone()
                                                                      for k, v in net.state_dict().items()}))
    return model, hist, after_main[0]


class Interrupt(Exception):
    pass


def test_end_to_end_is_deterministic(reference):
    m1, h1, _ = reference
    m2, h2 = _train()
    assert [r["epoch"] for r in h1] == [1, 2, 3]
    assert all(r["lr"] == 0.001 and r["ocsvm_term"] > 0 for r in h1[1:])
    assert all(math.isfinite(r["train_loss"]) for r in h1)
    assert _same(m1, m2) and _rows(h1) == _rows(h2)


def test_resumed_runs_end_with_the_uninterrupted_weights(reference, tmp_path):
    """Killed after the main loop (the OCSVMs not fitted yet), then after the first co-training epoch (fitted,
    stored in the resume file), then run to the end: the weights and history of the uninterrupted run."""
    uri = str(tmp_path / "run.resume")
    seen = []

    def stop_at(epoch):
        def on_epoch(row, _model):
            seen.append(row["epoch"])
            if row["epoch"] == epoch:
                raise Interrupt
        return on_epoch

    for epoch in (1, 2):
        with pytest.raises(Interrupt):
            _train(resume_uri=uri, on_epoch=stop_at(epoch))
        assert storage.exists(uri)
    model, hist = _train(resume_uri=uri, on_epoch=stop_at(None))
    assert seen == [1, 2, 3]  # each epoch ran once
    assert _rows(hist) == _rows(reference[1])
    assert _same(model, reference[0])


def test_cotraining_changes_the_weights_and_its_parameters_are_in_the_config(reference):
    plain, _ = _train(dataclasses.replace(CFG, objective={**SPEC, "lambda": 0.0}))
    assert not _same(plain, reference[0])  # lambda > 0: the detector term moved the weights
    ce, _ = _train(dataclasses.replace(CFG, objective=None))  # the main loop is plain cross entropy, bit for bit
    assert all(torch.equal(v, reference[2][k]) for k, v in ce.state_dict().items())
    # every objective parameter is in the config's dict (the resume fingerprint and the checkpoint key read it)
    assert CFG.to_dict()["objective"] == {
        "name": "la_ood_cotrain", "lambda": 0.5, "nu": 0.1, "cotrain_epochs": 2, "lr": 0.001, "momentum": 0.9,
        "weight_decay": 1e-4, "max_fit_samples": 50000, "layers": ["conv1", "relu2", "gap"]}


def test_unknown_layer_is_refused_before_training():
    with pytest.raises(ValueError, match="no module 'conv9'"):
        _train(dataclasses.replace(CFG, objective={**SPEC, "layers": ["conv9"]}))


def test_fit_layer_svms_are_laoods():
    f = {"a": torch.randn(30, 4, generator=torch.Generator().manual_seed(5), dtype=D)}
    svm, = fit_layer_svms(f, nu=0.2, max_fit_samples=30, seed=0)
    det = LAOOD(["a"], nu=0.2, holdout=0.0).fit_structured(f)
    assert torch.equal(svm.support_vectors, det.support_vectors_[0]) and svm.gamma == det.gammas_[0]
    assert svm.dual_coef.sum().item() == pytest.approx(0.2 * 30)  # libsvm: sum of alphas = nu * n_fit


def test_cotraining_starts_from_the_best_epoch(tmp_path):
    """Validation labels = the predictions after epoch 1, so epoch 1 is the best of two: the OCSVMs are fitted on
    epoch 1's features, not on the last epoch's."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(30, 6, generator=g, dtype=D), torch.randint(0, 3, (30,), generator=g)
    cfg = TrainConfig(epochs=2, batch_size=30, lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0,
                      schedule="constant", objective={"name": "la_ood_cotrain", "layers": ["hidden"], "nu": 0.3,
                                                      "cotrain_epochs": 1})
    torch.manual_seed(0)
    first = _Net().double()
    train_classifier(first, TensorDataset(x, y), None, dataclasses.replace(cfg, epochs=1, objective=None), seed=0,
                     device="cpu")
    with torch.no_grad():
        val = TensorDataset(x, first(x).argmax(1))
    torch.manual_seed(0)
    net, states = _Net().double(), []
    uri = str(tmp_path / "run.resume")
    hist = train_classifier(net, TensorDataset(x, y), val, cfg, seed=0, device="cpu", resume_uri=uri,
                            on_epoch=lambda row: states.append({k: v.clone() for k, v in net.state_dict().items()}))
    assert hist[0]["val_acc"] == 1.0 > hist[1]["val_acc"]  # the set-up: epoch 1 is the best
    stored = torch.load(uri, weights_only=True)["cotrain"]["svms"][0]
    for epoch, fitted_on_it in ((1, True), (2, False)):
        ref = _Net().double()
        ref.load_state_dict(states[epoch - 1])
        with torch.no_grad():
            det = LAOOD(["hidden"], nu=0.3, holdout=0.0).fit_structured({"hidden": ref.hidden(x)})
        same = det.support_vectors_[0].shape == stored["support_vectors"].shape and torch.allclose(
            det.support_vectors_[0], stored["support_vectors"], rtol=1e-9, atol=1e-12)
        assert same == fitted_on_it, epoch
