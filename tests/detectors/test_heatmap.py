"""HeatmapOOD (``ood_core.detectors.heatmap``; Hornauer & Belagiannis, WACV 2023): loss, score, prototypes and one
training step against plain references; it separates outliers after training; reproducibility, declared
constraints and errors. pytorch-ood has no such detector (no agreement test)."""
from __future__ import annotations

import itertools

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from ood_core.api import InvalidInputError, ModelNotSetException, RequiresFitException
from ood_core.constraints import ParameterError
from ood_core.detectors import HeatmapOOD, get_spec
from ood_core.detectors.heatmap import HeatmapDecoder, heatmap_score, nearest_same_class, weighted_reconstruction_loss


class Net(nn.Module):
    """conv -> relu -> mean pool -> head: ``features`` and ``head`` as ood_core backbones have them."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.head = nn.Linear(6, classes)

    def features(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _images(n, kind, seed):
    """ID: one of three smooth patterns plus noise; OOD: white noise. ``(n, 1, 12, 12)`` in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ood":
        return torch.rand(n, 1, 12, 12, generator=g) * 2 - 1, torch.full((n,), -1)
    u = torch.linspace(-1, 1, 12)
    patterns = torch.stack([u[None, :].expand(12, 12), u[:, None].expand(12, 12), torch.outer(u, u)])
    y = torch.arange(n) % 3
    return (patterns[y] + 0.1 * torch.randn(n, 12, 12, generator=g))[:, None].clamp(-1, 1), y


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


def test_loss_and_score_match_loops():
    g = torch.Generator().manual_seed(0)
    x_hat, t, h = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    loss = [sum((1 + 5 * abs(t[n, c, i, j])) * (x_hat[n, c, i, j] - t[n, c, i, j]) ** 2
                for c, i, j in itertools.product(range(3), range(4), range(5))) for n in range(2)]
    torch.testing.assert_close(weighted_reconstruction_loss(x_hat, t), torch.tensor(loss, dtype=torch.float64))
    score = [sum(max(abs(h[n, c, i, j]) for c in range(3)) for i, j in itertools.product(range(4), range(5))) / 20
             for n in range(2)]
    torch.testing.assert_close(heatmap_score(h), torch.tensor(score, dtype=torch.float64))


def test_nearest_same_class_matches_loop(monkeypatch):
    import ood_core.detectors.heatmap as hm

    monkeypatch.setattr(hm, "CHUNK_ELEMENTS", 64)  # several chunks
    g = torch.Generator().manual_seed(1)
    bank, q = torch.randn(40, 5, generator=g), torch.randn(25, 5, generator=g)
    c_bank = torch.arange(40) % 3  # classes 0-2; class 3 is missing from the bank
    c_q = torch.randint(0, 4, (25,), generator=g)
    got = nearest_same_class(q, c_q, bank, c_bank)
    for i in range(25):
        pool = [j for j in range(40) if c_bank[j] == c_q[i]] or list(range(40))
        want = min(pool, key=lambda j: float(((q[i].double() - bank[j].double()) ** 2).sum()))
        assert int(got[i]) == want


@pytest.mark.parametrize("size", [(1, 12, 12), (3, 16, 16), (1, 28, 28), (3, 32, 32)])
def test_decoder_output_shape_and_range(size):
    dec = HeatmapDecoder(6, 3, size, width=16, latent_dim=8).eval()
    with torch.no_grad():
        out = dec(torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1]))
    assert out.shape == (5, *size) and float(out.abs().max()) < 1


def test_one_training_step_matches_reference(net):
    x_id, y_id = _images(12, "id", 0)
    x_ood, y_ood = _images(5, "ood", 1)
    x, y = torch.cat([x_id, x_ood]), torch.cat([y_id, y_ood])
    det = HeatmapOOD(net, epochs=1, batch_size=64, width=16, latent_dim=8, seed=3, lr=1e-2)
    det.fit_arrays(x, net.features(x).detach(), net(x).argmax(1), y)

    # reference: targets by a loop, the same initial decoder, the paper's loss, one Adam step
    with torch.no_grad():
        z = net.features(x)
        pred = net(x).argmax(1)
    m, big = float(z[:12].min()), float(z[:12].max())
    targets = []
    for i in range(17):
        if y[i] >= 0:
            targets.append(x[i])
            continue
        same = [j for j in range(12) if pred[j] == pred[i]] or list(range(12))
        targets.append(x[min(same, key=lambda j: float(((z[i] - z[j]) ** 2).sum()))])
    torch.manual_seed(3)
    ref = HeatmapDecoder(6, 3, (1, 12, 12), width=16, latent_dim=8)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.5, 0.999))
    loss = weighted_reconstruction_loss(x + ref((z - m) / (big - m), pred), torch.stack(targets)).mean()
    loss.backward()
    opt.step()
    for (name, a), b in zip(det.decoder.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert det.losses == [pytest.approx(float(loss.detach()), rel=1e-5)]


def test_training_separates_outliers(net):
    x_id, y_id = _images(300, "id", 0)
    x_ood, y_ood = _images(300, "ood", 1)
    loader = [(x_id[i : i + 100], y_id[i : i + 100]) for i in range(0, 300, 100)]
    loader += [(x_ood[i : i + 100], y_ood[i : i + 100]) for i in range(0, 300, 100)]
    det = HeatmapOOD(net, epochs=15, batch_size=50, width=32, latent_dim=16, lr=2e-3).fit(loader)
    assert det.losses[-1] < 0.8 * det.losses[0]  # the noise itself cannot be predicted from features: a floor
    test_id, _ = _images(200, "id", 5)
    test_ood, _ = _images(200, "ood", 6)
    s_id, s_ood = det.predict(test_id), det.predict(test_ood)
    assert roc_auc_score([0] * 200 + [1] * 200, torch.cat([s_id, s_ood]).numpy()) > 0.95


def test_num_outliers_subset_is_seeded(net):
    x_id, y_id = _images(60, "id", 0)
    x_ood, y_ood = _images(40, "ood", 1)
    det = HeatmapOOD(net, epochs=2, width=16, latent_dim=8, num_outliers=10)
    det.fit([(torch.cat([x_id, x_ood]), torch.cat([y_id, y_ood]))])
    test = torch.cat([x_id[:5], x_ood[:5]])
    again = HeatmapOOD(net, epochs=2, width=16, latent_dim=8, num_outliers=10)
    again.fit([(torch.cat([x_id, x_ood]), torch.cat([y_id, y_ood]))])
    torch.testing.assert_close(again.predict(test), det.predict(test))  # seeded: reproducible
    other = HeatmapOOD(net, epochs=2, width=16, latent_dim=8, num_outliers=10, seed=1)
    other.fit([(torch.cat([x_id, x_ood]), torch.cat([y_id, y_ood]))])
    assert not torch.allclose(other.predict(test), det.predict(test))


def test_errors(net):
    x_id, y_id = _images(20, "id", 0)
    x_ood, y_ood = _images(10, "ood", 1)
    with pytest.raises(RequiresFitException, match="HeatmapOOD"):
        HeatmapOOD(net).predict(x_id)
    with pytest.raises(ModelNotSetException, match="HeatmapOOD"):
        HeatmapOOD().fit([(x_id, y_id)])
    with pytest.raises(InvalidInputError, match="HeatmapOOD.*auxiliary outliers"):
        HeatmapOOD(net, epochs=1).fit([(x_id, y_id)])
    with pytest.raises(InvalidInputError, match="HeatmapOOD.*no ID samples"):
        HeatmapOOD(net, epochs=1).fit([(x_ood, y_ood)])
    with pytest.raises(InvalidInputError, match="HeatmapOOD: batches must be"):
        HeatmapOOD(net, epochs=1).fit([x_id])
    det = HeatmapOOD(net, epochs=1, width=8, latent_dim=4).fit([(torch.cat([x_id, x_ood]), torch.cat([y_id, y_ood]))])
    bad = x_id[:2].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="HeatmapOOD.*NaN"):
        det.predict(bad)
    with pytest.raises(InvalidInputError, match="HeatmapOOD.*shape"):
        det.predict(torch.zeros(2, 1, 10, 10))


def test_contract():
    spec = get_spec("heatmapood")
    assert (spec.name, spec.representation, spec.needs_outliers) == ("HeatmapOOD", "model", True)
    for param, value, msg in (("epochs", 0, r"\[1, inf\)"), ("epochs", 1.5, "integer"), ("lr", 0.0, r"\(0, inf\)"),
                              ("batch_size", 0, r"\[1, inf\)"), ("num_outliers", 0, r"\[1, inf\)"),
                              ("width", 0, r"\[1, inf\)"), ("latent_dim", -1, r"\[1, inf\)"),
                              ("seed", -1, r"\[0, inf\)")):
        with pytest.raises(ParameterError, match=f"HeatmapOOD: {param}={value}.*{msg}"):
            HeatmapOOD(**{param: value})
    assert HeatmapOOD(num_outliers=None).get_params()["num_outliers"] is None


def test_task_loader_labels_outliers_minus_one():
    import torch as t

    from tasks.evaluate import _loader

    fmt = {"image_size": 16, "channels": 1, "mean": [0.5], "std": [0.5]}
    entry = lambda name, split, **params: {"dataset": {"dataset": name, "split": split, "seed": 0, "params": params}}
    loader = _loader(entry("digits", "train", classes=[0, 1]), fmt, 64, t.device("cpu"),
                     [entry("gaussian_noise", "train", n=30)])
    ys = t.cat([y for _, y in loader])
    assert int((ys == -1).sum()) == 30 and bool((ys[:-30] >= 0).all()) and bool((ys[-30:] == -1).all())


def test_constant_features_and_duplicated_rows_give_finite_scores():
    flat = Net()
    with torch.no_grad():
        flat.conv.weight.zero_()
        flat.conv.bias.fill_(0.5)  # every input has the same features: max = min
    flat.eval()
    x_id, y_id = _images(20, "id", 0)
    x_ood, y_ood = _images(10, "ood", 1)
    x = torch.cat([x_id, x_id, x_ood])  # duplicated ID rows
    y = torch.cat([y_id, y_id, y_ood])
    det = HeatmapOOD(flat, epochs=2, width=8, latent_dim=4).fit([(x, y)])
    assert det.z_min == det.z_max and bool(torch.isfinite(det.predict(x)).all())
