"""Extraction of one data set in shards (row ranges on batch boundaries, parallel tasks) joined into one feature
file: the same rows and values as one task over the whole set."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ood_core.data import load_dataset
from ood_core.datasets.sklearn_sets import DIGITS_FORMAT as FMT
from ood_core.feature_store import merge_feature_files, read_features
from ood_core.hooks import LayerSpec, extract_features
from ood_core.models import build_model

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [LayerSpec("logits"), LayerSpec("penultimate"), LayerSpec("conv2", module="conv2")]


def _model():
    return build_model("small_cnn", num_classes=6, in_channels=1, image_size=16, seed=3).eval()


def _same(a, b):
    assert np.array_equal(a.index, b.index) and np.array_equal(a.labels, b.labels)
    assert set(a.columns) == set(b.columns)
    for name in a.columns:
        assert np.array_equal(a.columns[name], b.columns[name]), name  # bit for bit
    assert a.metadata == b.metadata and a.column_meta == b.column_meta


def test_shards_on_batch_boundaries_join_to_the_whole_set_bit_for_bit(tmp_path):
    data = load_dataset("digits", split="train", fmt=FMT, seed=0, classes=[0, 1, 2, 3, 4, 5])
    model, bs = _model(), 64
    whole = tmp_path / "whole.parquet"
    extract_features(model, torch.utils.data.DataLoader(data, batch_size=bs), LAYERS, whole, metadata={"d": "x"})
    parts, bounds = [], [(0, 256), (256, 512), (512, len(data))]
    for a, b in bounds:
        part = tmp_path / f"part{a}.parquet"
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(a, b)), batch_size=bs)
        extract_features(model, loader, LAYERS, part, metadata={"d": "x"}, index_start=a,
                         writer_options={"row_group_rows": 100})  # several row groups per part
        parts.append(part)
    merged = tmp_path / "merged.parquet"
    assert merge_feature_files(parts, merged, record_hash=True) == len(data)
    assert (tmp_path / "merged.parquet.sha256").exists()
    _same(read_features(whole), read_features(merged))


def test_parts_that_do_not_continue_each_other_or_differ_are_refused(tmp_path):
    x = torch.randn(40, 1, 16, 16)
    y = torch.zeros(40, dtype=torch.long)
    model = _model()

    def part(name, rows, start, layers=LAYERS):
        path = tmp_path / name
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[rows], y[rows]), batch_size=8)
        extract_features(model, loader, layers, path, index_start=start)
        return path

    a, b = part("a", slice(0, 16), 0), part("b", slice(16, 40), 16)
    with pytest.raises(ValueError, match="starts at index 0, expected 16"):
        merge_feature_files([a, a], tmp_path / "m1")
    with pytest.raises(ValueError, match="another schema"):
        merge_feature_files([a, part("c", slice(16, 40), 16, LAYERS[:2])], tmp_path / "m2")
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()  # nothing left on failure
    assert merge_feature_files([a, b], tmp_path / "m3") == 40


def test_a_sweep_extracts_id_train_in_shards_that_equal_one_pass(tmp_path, ray_session):
    """The sweep's extract stage on a 2-CPU Ray: ID train (650 rows, batches of 32) goes out as 2 shard tasks
    and one merge; the file equals one extraction over the whole set with the same checkpoint."""
    from orchestrator.config import parse_config
    from orchestrator.sweep import SweepRunner
    from tasks.runtime import load_backbone

    checkpoint = tmp_path / "cnn.pt"
    torch.save(_model().state_dict(), checkpoint)
    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw.update(storage=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw["backbones"] = [{"name": "cnn", "arch": "small_cnn", "checkpoint": str(checkpoint), "seeds": [0]}]
    raw["extract"] = {"batch_size": 32, "layers": ["logits", "penultimate"]}
    raw["detectors"] = [{"type": "MaxSoftmax"}]
    runner = SweepRunner(parse_config(raw), "")
    assert runner._shards() == [(0, 352), (352, 650)]  # 21 batches of 32 over 2 slots, on batch boundaries
    from orchestrator.tracking import Tracker

    tracker = Tracker(runner.tracking_uri, "shards")
    runner.train(tracker, tracker.start_run("sweep"))  # the user checkpoint, loaded into the storage
    runner.extract()
    bb = runner.plan.backbones[0]
    train = next(f for f in bb.features if f.dataset.role == "id_train")
    assert not list(Path(train.uri).parent.glob("*.rows*"))  # the parts are gone
    from orchestrator.sweep import _bb_dict
    model = load_backbone(_bb_dict(bb), runner.plan.num_classes, runner.plan.input_format)
    from tasks.runtime import input_format
    data = load_dataset("digits", split="train", fmt=input_format(runner.plan.input_format), seed=0,
                        classes=[0, 1, 2, 3, 4, 5])
    specs = [LayerSpec(name=l["name"], module=l["module"], reduction=l["reduction"]) for l in bb.layers]
    one = tmp_path / "one.parquet"
    extract_features(model, torch.utils.data.DataLoader(data, batch_size=32), specs, one)
    a, b = read_features(train.uri), read_features(one)
    assert np.array_equal(a.index, np.arange(650)) and np.array_equal(a.labels, b.labels)
    for name in b.columns:
        assert np.array_equal(a.columns[name], b.columns[name]), name
