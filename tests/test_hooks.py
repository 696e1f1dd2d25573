import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ood_core.feature_store import read_features, validate_feature_file
from ood_core.hooks import (LayerSpec, capture_batch, energy_layer_specs, extract_features, hookable_layers,
                            reduce_output)


class TinyNet(nn.Module):
    """conv1 -> bn1 -> ReLU(inplace) -> conv2 -> ReLU -> global pool -> head; like ood_core.models."""

    def __init__(self, classes=4):
        super().__init__()
        self.head = nn.Linear(6, classes)  # registered first on purpose: registration != execution order
        self.conv1 = nn.Conv2d(1, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        with torch.no_grad():  # non-trivial BN statistics
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn1.running_var.uniform_(0.5, 2.0)
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.bias.uniform_(-0.5, 0.5)
        self.num_classes, self.feature_dim = classes, 6

    def features(self, x):
        return self.pool(self.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))))).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(37, 1, 6, 6, generator=g), torch.randint(0, 4, (37,), generator=g)


def _manual(net, x):
    with torch.no_grad():
        c1 = net.conv1(x)
        b1 = net.bn1(c1)  # pre-ReLU
        c2 = net.conv2(torch.relu(b1))
        feats = net.features(x)
        return {"conv1": c1, "bn1": b1, "conv2": c2, "features": feats, "logits": net(x)}


ALL_LAYERS = [
    LayerSpec("logits"), LayerSpec("penultimate"), LayerSpec("logits", None, "energy"),
    LayerSpec("conv1", "conv1"), LayerSpec("conv1", "conv1", "max"), LayerSpec("bn1", "bn1", "none"),
    LayerSpec("bn1", "bn1", "energy"), LayerSpec("bn1", "bn1", "flatten"), LayerSpec("conv2", "conv2", "energy"),
]


def _expected(ref):
    return {
        "logits": ref["logits"], "penultimate": ref["features"],
        "logits.energy": -torch.logsumexp(ref["logits"], 1),
        "conv1": ref["conv1"].mean((2, 3)), "conv1.max": ref["conv1"].amax((2, 3)),
        "bn1.none": ref["bn1"], "bn1.energy": -torch.logsumexp(ref["bn1"].flatten(1), 1),
        "bn1.flatten": ref["bn1"].flatten(1), "conv2.energy": -torch.logsumexp(ref["conv2"].flatten(1), 1),
    }


def test_layer_spec_columns_and_validation():
    assert LayerSpec("logits").column == "logits"
    assert LayerSpec("penultimate").column == "penultimate"
    assert LayerSpec("layer1.0.bn1", "layer1.0.bn1", "energy").column == "layer1.0.bn1.energy"
    assert LayerSpec("c", "conv1", "avgpool").column == "c"
    with pytest.raises(ValueError, match="reduction"):
        LayerSpec("c", "conv1", "mean")
    with pytest.raises(ValueError, match="module"):
        LayerSpec("conv1")
    with pytest.raises(ValueError, match="module must be None"):
        LayerSpec("logits", "head")


def test_reduce_output_shapes():
    t = torch.randn(3, 4, 5, 5)
    assert reduce_output(t, "none").shape == (3, 4, 5, 5)
    assert reduce_output(t, "avgpool").shape == (3, 4)
    assert reduce_output(t, "max").shape == (3, 4)
    assert reduce_output(t, "flatten").shape == (3, 100)
    torch.testing.assert_close(reduce_output(t, "energy"), -torch.logsumexp(t.reshape(3, -1), 1))
    v = torch.randn(3, 7)
    assert reduce_output(v, "avgpool") is v and reduce_output(v, "energy").shape == (3,)


def test_hooks_match_manual_forward(net, data):
    x, _ = data
    got = capture_batch(net, x, ALL_LAYERS)
    for col, want in _expected(_manual(net, x)).items():
        torch.testing.assert_close(got[col], want.float(), rtol=1e-5, atol=1e-5, msg=col)
    # bn1 is followed by ReLU(inplace=True): the captured map must still be the pre-ReLU output
    assert (got["bn1.none"] < 0).any()
    torch.testing.assert_close(got["penultimate"], net.features(x).detach())


def test_extract_features_round_trip(net, data, tmp_path):
    x, y = data
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 37 samples: last batch of 5
    seen = []
    uri = tmp_path / "run" / "feats.parquet"
    stats = extract_features(net, loader, ALL_LAYERS, uri, metadata={"dataset": "tiny", "split": "test",
                             "backbone_key": "k1"}, device="cpu", progress=seen.append)
    assert stats["n"] == 37 and stats["batches"] == 5 and seen == [8, 8, 8, 8, 5]
    assert stats["samples_per_s"] > 0 and stats["bytes"] > 0
    assert validate_feature_file(uri, [s.column for s in ALL_LAYERS])
    fs = read_features(uri)
    np.testing.assert_array_equal(fs.index, np.arange(37))
    np.testing.assert_array_equal(fs.labels, y.numpy())
    for col, want in _expected(_manual(net, x)).items():
        np.testing.assert_allclose(fs.columns[col], want.numpy(), rtol=1e-5, atol=1e-5, err_msg=col)
    assert fs.metadata["dataset"] == "tiny" and fs.metadata["backbone_key"] == "k1"
    assert [d["column"] for d in json.loads(fs.metadata["layers"])] == [s.column for s in ALL_LAYERS]
    assert fs.column_meta["bn1.energy"] == {"layer": "bn1", "reduction": "energy", "name": "bn1"}
    assert fs.columns["bn1.none"].shape == (37, 5, 6, 6)


def test_tqdm_like_progress_and_unlabelled_loader(net, data, tmp_path):
    x, _ = data

    class Bar:
        total = 0

        def update(self, n):
            self.total += n

    bar = Bar()
    loader = [x[:20], x[20:]]  # bare tensors, no labels
    extract_features(net, loader, [LayerSpec("logits")], tmp_path / "f.parquet", metadata={}, device="cpu",
                     progress=bar)
    assert bar.total == 37
    fs = read_features(tmp_path / "f.parquet")
    assert (fs.labels == -1).all() and fs.columns["logits"].shape == (37, 4)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_mode_restored(net, data, tmp_path):
    x, y = data
    net.train()
    extract_features(net, DataLoader(TensorDataset(x, y), batch_size=16), ALL_LAYERS, tmp_path / "a.parquet",
                     metadata={}, device="cpu")
    assert _hook_count(net) == 0 and net.training

    def failing_loader():
        yield x[:8], y[:8]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        extract_features(net, failing_loader(), ALL_LAYERS, tmp_path / "b.parquet", metadata={}, device="cpu")
    assert _hook_count(net) == 0 and net.training
    assert sorted(os.listdir(tmp_path)) == ["a.parquet"]  # no partial file, no temp file


def test_extract_errors(net, data, tmp_path):
    x, y = data
    loader = [(x, y)]
    with pytest.raises(ValueError, match="no module"):
        extract_features(net, loader, [LayerSpec("nope", "layer9")], tmp_path / "f.parquet", metadata={})
    with pytest.raises(ValueError, match="duplicate"):
        extract_features(net, loader, [LayerSpec("logits"), LayerSpec("logits")], tmp_path / "f.parquet")
    net.unused = nn.Conv2d(1, 1, 1)
    with pytest.raises(RuntimeError, match="did not run"):
        extract_features(net, loader, [LayerSpec("u", "unused")], tmp_path / "f.parquet", metadata={})
    assert _hook_count(net) == 0 and os.listdir(tmp_path) == []


def test_hookable_layers_order(net, data):
    x, _ = data
    assert hookable_layers(net) == ["head", "conv1", "bn1", "conv2"]  # registration order
    assert hookable_layers(net, example_input=x[:2]) == ["conv1", "bn1", "conv2", "head"]  # execution order
    assert hookable_layers(net, types=(nn.Conv2d,)) == ["conv1", "conv2"]
    specs = energy_layer_specs(net, example_input=x[:2])
    assert [s.column for s in specs] == ["conv1.energy", "bn1.energy", "conv2.energy", "head.energy"]
    assert _hook_count(net) == 0
    # the last hookable layer's energy is the energy score of the logits
    got = capture_batch(net, x, specs + [LayerSpec("logits", None, "energy")])
    torch.testing.assert_close(got["head.energy"], got["logits.energy"])
