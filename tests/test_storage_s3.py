"""Storage, feature store and checkpoints against an object store: ``s3://`` URIs served by moto.

The project's code is not told about moto: the standard AWS environment variables
(``AWS_ENDPOINT_URL``, credentials, region) point :meth:`pyarrow.fs.FileSystem.from_uri`, and so every
``s3://`` path of :mod:`ood_core.storage`, at the local endpoint (see ``tests/s3_server.py``).
"""
import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

import s3_server
from ood_core import storage
from ood_core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from ood_core.feature_store import FeatureWriter, read_features, validate_feature_file


@pytest.fixture(scope="module")
def bucket():
    server, root = s3_server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield root
    server.stop()


def _objects(uri):
    """Every object under ``uri`` (its path below it)."""
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def test_atomic_write_read_exists_list_remove(bucket):
    root = f"{bucket}/storage"
    fs, path = storage.resolve(f"{root}/a/b.bin")
    assert fs.type_name == "s3" and path == f"{bucket[5:]}/storage/a/b.bin"
    target = f"{root}/a/b.bin"
    assert not storage.exists(target)
    with storage.atomic_output(target) as f:
        f.write(b"hello")
        assert not storage.exists(target)  # nothing under the final key until the block ends
    assert storage.exists(target) and storage.read_bytes(target) == b"hello"
    assert not storage.exists(f"{root}/a")  # a prefix is not a file

    with pytest.raises(RuntimeError):  # a failed write leaves the old object and no temporary one
        with storage.atomic_output(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert storage.read_bytes(target) == b"hello"
    assert _objects(root) == ["a/b.bin"]

    big = np.random.default_rng(0).bytes(12 << 20)  # above the part size: a multipart upload
    with storage.atomic_output(f"{root}/big.bin") as f:
        f.write(big)
    assert storage.read_bytes(f"{root}/big.bin") == big
    assert _objects(root) == ["a/b.bin", "big.bin"]

    storage.remove(target)
    storage.remove(target)  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.remove(target, missing_ok=False)
    assert _objects(root) == ["big.bin"]


def test_feature_file_write_validate_read(bucket):
    uri = f"{bucket}/features/bb/set.parquet"
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((40, 6)).astype(np.float32)
    penult = rng.standard_normal((40, 32)).astype(np.float32)
    energy = rng.standard_normal(40).astype(np.float32)
    labels = rng.integers(0, 6, 40)
    with FeatureWriter(uri, {"backbone_key": "bb", "dataset": "digits", "split": "test"}) as w:
        for lo in range(0, 40, 16):
            sl = slice(lo, lo + 16)
            w.write(np.arange(40)[sl], labels[sl], {"logits": logits[sl], "penultimate": penult[sl],
                                                    "conv2.energy": energy[sl]})
    assert _objects(f"{bucket}/features") == ["bb/set.parquet"]
    assert validate_feature_file(uri, ["logits", "penultimate", "conv2.energy"])
    assert not validate_feature_file(uri, ["logits", "layer4"])
    fs = read_features(uri)
    np.testing.assert_array_equal(fs.index, np.arange(40))
    np.testing.assert_array_equal(fs.labels, labels)
    np.testing.assert_array_equal(fs.columns["logits"], logits)
    np.testing.assert_array_equal(fs.columns["penultimate"], penult)
    np.testing.assert_array_equal(fs.columns["conv2.energy"], energy)
    assert fs.metadata["dataset"] == "digits" and fs.metadata["backbone_key"] == "bb"

    data = storage.read_bytes(uri)  # a truncated object (no footer) is detected, not read
    with storage.atomic_output(uri) as f:
        f.write(data[: len(data) // 2])
    assert not validate_feature_file(uri, ["logits"])
    assert not validate_feature_file(f"{bucket}/features/bb/missing.parquet")


def test_checkpoint_save_load_and_corruption(bucket):
    uri = f"{bucket}/checkpoints/model.pt"
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    sha = save_checkpoint(uri, model, {"arch": "mlp", "history": [{"epoch": 1, "val_acc": 0.5}]})
    state, meta = load_checkpoint(uri, expected_sha256=sha)
    assert meta["arch"] == "mlp" and meta["history"][0]["val_acc"] == 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    assert _objects(f"{bucket}/checkpoints") == ["model.pt"]

    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(uri, expected_sha256="0" * 64)
    with storage.atomic_output(uri) as f:
        f.write(storage.read_bytes(uri)[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(uri)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(f"{bucket}/checkpoints/none.pt")
