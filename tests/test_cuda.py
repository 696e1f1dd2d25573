"""The GPU paths: every detector fitted and scored on CUDA tensors, training with AMP and channels-last,
hooked extraction from a CUDA model. Skipped without a CUDA device (CI has none; run on a GPU machine).

For the representation detectors the CUDA scores must stay on the device and agree with the CPU scores of
the same inputs (Spearman >= 0.999: float32 sums run in a different order on the GPU).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from ood_core.detectors import REGISTRY, build_detector, fit_detector, score_detector  # noqa: E402

LAYER_PARAMS = {
    "MultiMahalanobis": {"layers": ["l1", "l2"], "alpha": [1.0, 0.5]},
    "LayerEnergy": {"layers": ["e"]},
    "LayerEnergyAggregate": {"layers": ["e", "l1"]},
    "Gram": {"layers": ["m1", "m2"]},
    "LAOOD": {"layers": ["l1", "l2"]},
    "LAOODEarlyExit": {"layers": ["l1", "l2"]},
}
PARAMS = {"KNN": {"k": 5}, "NNGuide": {"k": 5}, "ViM": {"d": 8}, "NECO": {"d": 4}, "GEN": {"M": 5},
          "OpenMax": {"tailsize": 20}, **LAYER_PARAMS}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@pytest.fixture(scope="module")
def reps():
    g = torch.Generator().manual_seed(0)
    c, d = 5, 32

    def make(n, ood=False):
        y = torch.arange(n) % c
        means = torch.randn(c, d, generator=torch.Generator().manual_seed(1)) * 3
        z = torch.relu((0 if ood else means[y]) + torch.randn(n, d, generator=g) * (3 if ood else 1))
        maps = z[:, :, None, None] * (1 + 0.1 * torch.randn(n, d, 3, 3, generator=g))
        return y, {"features": z, "feature_maps": maps.relu(), "l1": z, "l2": torch.tanh(z[:, :16]),
                   "m1": maps.relu(), "m2": maps[:, :8].relu(), "e": -torch.logsumexp(z, dim=1)}

    w, b = torch.randn(c, d, generator=g) * 0.5, torch.randn(c, generator=g)
    y, train = make(400)
    _, test_id = make(100)
    _, test_ood = make(100, ood=True)
    test = {k: torch.cat([test_id[k], test_ood[k]]) for k in test_id}
    for part in (train, test):
        part["logits"] = part["features"] @ w.T + b
    return dict(train=train, test=test, y=y, head=(w, b))


REPRESENTATION = sorted(n for n, s in REGISTRY.items() if s.representation != "model")


@pytest.mark.parametrize("name", REPRESENTATION)
def test_representation_detector_runs_on_cuda_and_agrees_with_cpu(reps, name):
    spec = REGISTRY[name]
    params = PARAMS.get(name, {})

    def run(device):
        move = {k: v.to(device) for k, v in reps["train"].items()}
        test = {k: v.to(device) for k, v in reps["test"].items()}
        head = tuple(t.to(device) for t in reps["head"])
        det = build_detector(name, params, head=head if spec.needs_head else None)
        fit_detector(det, move, reps["y"].to(device))
        return score_detector(det, test)

    cpu, gpu = run("cpu"), run("cuda")
    assert gpu.device.type == "cuda", f"{name} returned scores on {gpu.device}"
    assert gpu.shape == cpu.shape == (200,)
    assert torch.isfinite(gpu).all()
    rho = _spearman(cpu.double().numpy(), gpu.double().cpu().numpy())
    assert rho >= 0.999, f"{name}: Spearman(cpu, cuda) = {rho:.5f}"


class _Net(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, classes)

    def features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.drop(torch.relu(self.conv2(x))).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


MODEL_PARAMS = {"NACUE": {"layers": ["bn1", "conv2"], "m_bins": 20}, "MCD": {"samples": 4, "seed": 0},
                "ODIN": {"t": 10.0, "eps": 0.002}, "HeatmapOOD": {"epochs": 3, "width": 16, "latent_dim": 8}}


@pytest.mark.parametrize("name", sorted(n for n, s in REGISTRY.items() if s.representation == "model"))
def test_model_in_the_loop_detector_runs_on_cuda_and_agrees_with_cpu(name):
    torch.manual_seed(0)
    net = _Net().eval()
    g = torch.Generator().manual_seed(2)
    x_train, y_train = torch.randn(64, 3, 8, 8, generator=g), torch.arange(64) % 4
    x = torch.cat([torch.randn(24, 3, 8, 8, generator=g), 3 * torch.rand(24, 3, 8, 8, generator=g)])

    def run(device):
        model = _Net().eval()
        model.load_state_dict(net.state_dict())
        model.to(device)
        det = REGISTRY[name].cls(model, **MODEL_PARAMS.get(name, {}))
        if det.requires_fit:
            batches = [(x_train[:32], y_train[:32]), (x_train[32:], y_train[32:])]
            if REGISTRY[name].needs_outliers:  # auxiliary outliers, label -1
                batches.append((3 * torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
                                torch.full((16,), -1)))
            det.fit([(xb.to(device), yb.to(device)) for xb, yb in batches])
        return det.predict(x.to(device))

    cpu, gpu = run("cpu"), run("cuda")
    assert gpu.device.type == "cuda" and torch.isfinite(gpu).all()
    if name == "MCD":  # the dropout masks come from the device's own generator: reproducible, not the CPU's
        assert torch.equal(gpu, run("cuda"))
        return
    rho = _spearman(cpu.double().numpy(), gpu.double().cpu().numpy())
    assert rho >= 0.99, f"{name}: Spearman(cpu, cuda) = {rho:.5f}"


def test_training_with_amp_and_channels_last_on_cuda():
    from torch.utils.data import TensorDataset

    from ood_core.training import make_train_config, train_classifier

    g = torch.Generator().manual_seed(0)
    y = torch.arange(512) % 4
    x = torch.randn(512, 3, 8, 8, generator=g)
    x[torch.arange(512), y % 3] += torch.where(y == 3, -2.0, 2.0)[:, None, None]  # a class signal per channel
    model = _Net()
    cfg = make_train_config(None, epochs=3, batch_size=64, lr=0.05, amp=True)
    layout = []
    history = train_classifier(model, TensorDataset(x, y), TensorDataset(x[:128], y[:128]), cfg, seed=0,
                               device="cuda", on_epoch=lambda row: layout.append(
                                   model.conv1.weight.is_contiguous(memory_format=torch.channels_last)))
    assert layout == [True] * 3  # channels-last while training
    assert len(history) == 3 and all(np.isfinite(h["train_loss"]) for h in history)
    assert history[-1]["val_acc"] > 0.5
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.float32  # AMP keeps float32 master weights
    assert model.conv1.weight.is_contiguous()  # and handed back in the default layout


def test_hooked_extraction_from_a_cuda_model(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from ood_core.feature_store import read_features
    from ood_core.hooks import LayerSpec, extract_features

    torch.manual_seed(0)
    model = _Net().eval().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(100, 3, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(100, dtype=torch.long)), batch_size=32, pin_memory=True)
    layers = [LayerSpec("logits"), LayerSpec("penultimate"), LayerSpec("c2", "conv2", "avgpool"),
              LayerSpec("bn1", "bn1", "energy")]
    for amp, tol in ((False, 1e-4), (True, 2e-2)):
        uri = tmp_path / f"f{int(amp)}.parquet"
        stats = extract_features(model, loader, layers, uri, device="cuda", amp=amp)
        fs = read_features(uri)
        assert stats["n"] == 100 and fs.columns["logits"].dtype == np.float32
        with torch.no_grad():
            want = model(x.cuda()).cpu().numpy()
        np.testing.assert_allclose(fs.columns["logits"], want, rtol=tol, atol=tol)
        assert fs.columns["c2"].shape == (100, 16)
