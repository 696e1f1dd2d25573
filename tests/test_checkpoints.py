"""Checkpoint save / load: round trip, hashing, corruption and mismatch errors."""
import hashlib

import pytest
import torch

from ood_core.checkpoints import CheckpointError, load_checkpoint, load_into, save_checkpoint
from ood_core.models import build_model


def _model(seed=0, **kw):
    args = dict(num_classes=4, in_channels=1, image_size=8)
    args.update(kw)
    return build_model("small_cnn", seed=seed, **args)


def test_round_trip(tmp_path):
    m = _model()
    m.bn1.running_mean.fill_(0.25)  # buffers travel too
    uri = str(tmp_path / "sub" / "ckpt.pt")
    meta = {"arch": "small_cnn", "num_classes": 4, "history": [{"epoch": 1, "val_acc": 0.5}]}
    sha = save_checkpoint(uri, m, meta)
    assert sha == hashlib.sha256((tmp_path / "sub" / "ckpt.pt").read_bytes()).hexdigest()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ckpt.pt"]  # no temp file left
    state, meta2 = load_checkpoint(uri, expected_sha256=sha)
    assert meta2 == meta
    fresh = load_into(_model(seed=1), state).eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(fresh(x), m.eval()(x))
    # same content -> same bytes -> same hash (content addressing)
    assert save_checkpoint(str(tmp_path / "again.pt"), m, meta) == sha
    assert save_checkpoint("file://" + str(tmp_path / "uri.pt"), m, meta) == sha
    assert load_checkpoint("file://" + str(tmp_path / "uri.pt"))[1] == meta


def test_missing_corrupt_and_sha_mismatch(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        load_checkpoint(missing)
    uri = str(tmp_path / "c.pt")
    sha = save_checkpoint(uri, _model(), {"a": 1})
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(uri, expected_sha256="0" * 64)
    raw = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="c.pt"):
        load_checkpoint(uri)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(uri, expected_sha256=sha)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an ood-sweep checkpoint"):
        load_checkpoint(str(tmp_path / "foreign.pt"))


def test_meta_must_be_json_like(tmp_path):
    with pytest.raises(ValueError, match="meta"):
        save_checkpoint(str(tmp_path / "m.pt"), _model(), {"obj": object()})
    assert not list(tmp_path.iterdir())


def test_mismatched_model(tmp_path):
    uri = str(tmp_path / "c.pt")
    save_checkpoint(uri, _model(), {})
    state, _ = load_checkpoint(uri)
    with pytest.raises(CheckpointError, match="shape mismatches.*head.weight"):
        load_into(_model(num_classes=5), state)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_into(_model(width=0.5), state)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_into(torch.nn.Sequential(torch.nn.Linear(2, 2)), {})
    extra = dict(state, extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match="unexpected keys: extra"):
        load_into(_model(), extra)
