"""Cached content is verified on reuse: a damaged cache file is said in one line, set aside and recomputed.

Every cached file (checkpoint, feature file, search record, search scores) carries its sha256 in a sidecar
``<file>.sha256`` written after the file; the reuse points compare the two. The sweep tests copy the store of
the session's clean run (``clean_sweep``), damage files of it the way a bad disk or a torn copy does (4 KiB
of random bytes in the middle, a truncation, a changed number in a JSON record) and run the same study
again: it exits 0, says one line per damaged file, recomputes only what was damaged and reports the clean
run's numbers.
"""
import hashlib
import io
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ood_core import storage
from ood_core.checkpoints import CheckpointError, load_checkpoint, load_user_checkpoint, save_checkpoint
from ood_core.feature_store import FeatureWriter, check_feature_file
from sweep_runs import results_of, run_sweep, write_config

ASIDE = re.compile(r"set aside as (\S+\.damaged-\d{8}T\d{6}Z(?:-\d+)?), ")


def damage_middle(path, n=4096, seed=0):
    """Overwrite ``n`` bytes in the middle of ``path`` with random bytes (in place, same size)."""
    size = os.path.getsize(path)
    n = min(n, size // 2)
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        f.write(np.random.default_rng(seed).bytes(n))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --------------------------------------------------------------------------------- the mechanism
def test_hash_recorded_after_write_and_checked_on_reuse(tmp_path):
    uri = tmp_path / "sub" / "blob.bin"
    data = np.random.default_rng(1).bytes(3 << 20)
    with storage.atomic_output(uri, record_hash=True) as f:
        f.write(data[:1000])
        f.write(memoryview(data)[1000:])
        assert not (tmp_path / "sub" / "blob.bin.sha256").exists()  # no record before the file is there
    digest = hashlib.sha256(data).hexdigest()
    assert (tmp_path / "sub" / "blob.bin.sha256").read_text() == f"{digest}  blob.bin\n"  # sha256sum -c format
    assert sorted(os.listdir(tmp_path / "sub")) == ["blob.bin", "blob.bin.sha256"]
    assert storage.verify_cached(uri, "blob") == storage.Cached(True, sha256=digest, status="ok")

    damage_middle(uri)
    check = storage.verify_cached(uri, "blob file")
    assert not check.ok
    (aside,) = ASIDE.findall(check.note)
    assert check.note == f"cached blob file damaged (sha256 mismatch); set aside as {aside}, recomputing"
    assert not uri.exists() and os.path.exists(aside) and os.path.exists(aside + ".sha256")
    assert storage.verify_cached(uri, "blob") == storage.Cached(False, status="missing")  # nothing to say

    # truncated, damaged record, no record at all (an older version), removed together with its record
    for spoil, detail in ((truncate, "sha256 mismatch"),
                          (lambda p: open(str(p) + ".sha256", "w").write("not a hash\n"), "hash record damaged")):
        with storage.atomic_output(uri, record_hash=True) as f:
            f.write(data)
        spoil(uri)
        check = storage.verify_cached(uri, "blob", redo="retraining")
        assert not check.ok and f"damaged ({detail}); set aside as" in check.note and check.note.endswith("retraining")
        assert not uri.exists()
    uri.write_bytes(data)
    check = storage.verify_cached(uri, "blob")
    assert not check.ok and check.note == "cached blob has no content hash (written by an older ood-sweep); recomputing"
    assert uri.exists()  # not damaged: recomputed and overwritten, not set aside
    storage.write_hash(uri)
    assert storage.verify(uri).ok
    storage.remove(uri)
    assert not (tmp_path / "sub" / "blob.bin.sha256").exists()


def test_two_writers_of_one_key_leave_a_record_of_the_file_in_place(tmp_path, monkeypatch):
    """A moves its file, B moves its file and records it, then A records: the record still matches."""
    uri = tmp_path / "key.bin"
    a, b = storage.AtomicOutput(uri, record_hash=True), storage.AtomicOutput(uri, record_hash=True)
    a.open().write(b"A" * 1000)
    b.open().write(b"B" * 1000)  # same size, other bytes (e.g. a checkpoint with another timing in its history)
    a_digest, real = hashlib.sha256(b"A" * 1000).hexdigest(), storage.write_hash

    def racing(u, digest=None):
        if digest == a_digest and not b._done:
            b.commit()  # between A's move and A's record
        return real(u, digest)

    monkeypatch.setattr(storage, "write_hash", racing)
    a.commit()
    assert uri.read_bytes() == b"B" * 1000 and b.sha256 == storage.read_hash(uri)
    assert storage.verify(uri).ok
    assert sorted(os.listdir(tmp_path)) == ["key.bin", "key.bin.sha256"]


def test_feature_file_hashed_while_written(tmp_path):
    uri = tmp_path / "f.parquet"
    rng = np.random.default_rng(0)
    with FeatureWriter(uri, {"dataset": "x"}, {}, record_hash=True, row_group_rows=100) as w:
        for i in range(5):
            w.write(np.arange(64) + 64 * i, np.zeros(64), {"penultimate": rng.random((64, 32), np.float32)})
    assert storage.read_hash(uri) == sha(uri)
    assert check_feature_file(uri, ["penultimate"]).ok
    assert not check_feature_file(uri, ["penultimate", "logits"]).ok  # intact, but not what is needed
    assert uri.exists()
    damage_middle(uri, 512)
    check = check_feature_file(uri, ["penultimate"])
    assert not check.ok and "cached feature file damaged (sha256 mismatch); set aside as" in check.note


def test_damaged_resume_checkpoint_is_set_aside_and_training_starts_over(tmp_path):
    from ood_core.data import DATASETS, load_dataset
    from ood_core.models import build_model
    from ood_core.training import TrainConfig, train_classifier

    fmt = DATASETS["digits"].default_format
    full = load_dataset("digits", split="train", fmt=fmt, seed=0)
    train = torch.utils.data.TensorDataset(full.tensors[0][:96], full.tensors[1][:96])
    cfg, uri = TrainConfig(epochs=2, batch_size=32), str(tmp_path / "ckpt.pt.resume")

    def run(on_epoch):
        model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=16, seed=3, width=0.5)
        return train_classifier(model, train, None, cfg, seed=3, device="cpu", resume_uri=uri, on_epoch=on_epoch)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(stop)  # interrupted after epoch 1: its resume file stays, with its hash
    assert storage.verify(uri).ok
    damage_middle(uri)
    seen = []
    with pytest.warns(UserWarning, match=r"cached resume checkpoint damaged \(sha256 mismatch\); set aside as "
                                         r".*, training from the first epoch"):
        run(lambda row: seen.append(row["epoch"]))
    assert seen == [1, 2]  # not resumed from damaged state


def test_damaged_checkpoint_on_s3_is_set_aside():
    import s3_server

    server, bucket = s3_server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in server.env().items():
                mp.setenv(key, value)
            uri = f"{bucket}/integrity-test/m.pt"  # a prefix of its own: the bucket is shared by the S3 tests
            digest = save_checkpoint(uri, torch.nn.Linear(4, 2), {"arch": "linear"}, record_hash=True)
            assert storage.read_hash(uri) == digest and storage.verify(uri).ok
            data = bytearray(storage.read_bytes(uri))
            data[len(data) // 2] ^= 0xFF
            with storage.atomic_output(uri) as f:  # a replaced object whose record was not updated
                f.write(bytes(data))
            check = storage.verify_cached(uri, "checkpoint", redo="retraining")
            (aside,) = ASIDE.findall(check.note)
            assert not check.ok and aside.startswith(f"{bucket}/integrity-test/m.pt.damaged-")
            assert not storage.exists(uri) and storage.exists(aside) and storage.exists(aside + ".sha256")
            storage.remove(aside)  # leave the shared bucket as it was
            storage.remove(aside + ".sha256")
    finally:
        server.stop()


# --------------------------------------------------------------------------- the weights-only refusal
class Pickled:  # a custom object: torch's weights-only loader refuses it
    def __init__(self):
        self.lr = 0.1


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("obj, name", [({"state_dict": torch.nn.Linear(2, 2).state_dict(), "args": Pickled()},
                                        f"{__name__}.Pickled"),
                                       (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
                                       ({"x": Evil()}, "system")])
def test_pickled_object_refused_in_one_line(tmp_path, obj, name):
    path = tmp_path / "user.pt"
    torch.save(obj, path)
    for load in (lambda: load_user_checkpoint(str(path), torch.nn.Linear(2, 2)), lambda: load_checkpoint(str(path))):
        with pytest.raises(CheckpointError) as info:
            load()
        msg = str(info.value)
        assert "\n" not in msg and "\x1b" not in msg and len(msg) < 300, msg
        assert f"checkpoint {path} holds a pickled Python object (" in msg and name in msg, msg
        assert "save model.state_dict()" in msg


def test_corrupt_checkpoint_message_is_one_line(tmp_path):
    path = tmp_path / "junk.pt"
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(3)}, buf)
    path.write_bytes(buf.getvalue()[:200])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and "corrupt" in msg and str(path) in msg


# -------------------------------------------------------------------------- whole sweeps, rerun
def _copy_of_clean(clean_sweep, tmp_path, name):
    store = tmp_path / "store"
    shutil.copytree(clean_sweep["storage"], store, ignore=shutil.ignore_patterns("tune"))
    return write_config(tmp_path, name=name, storage=str(store)), store


def _features(store):
    """``{data set label: path}`` of the study's feature files."""
    out = {}
    for path in sorted((store / "features").rglob("*.parquet")):
        out[pq.read_schema(path).metadata[b"ood_sweep.dataset"].decode()] = path
    return out


def _searches(store):
    """``{number of trials: key}`` of the study's cached searches (6: MaxSoftmax, 4: KNN, 1: Mahalanobis)."""
    out = {}
    for path in (store / "search").glob("*.json"):
        out[len(json.loads(path.read_text())["trials"])] = path.name[:-len(".json")]
    return out


def _aside_lines(out):
    return [line for line in out.splitlines() if "set aside as" in line]


def test_damaged_features_and_search_files_are_set_aside_and_recomputed(clean_sweep, tmp_path):
    cfg, store = _copy_of_clean(clean_sweep, tmp_path, "damaged")
    clean = clean_sweep["storage"]
    feats, searches = _features(store), _searches(store)
    damage_middle(feats["id-test"])  # structure intact: passed the old structural check
    truncate(feats["photos"])
    knn, maha = store / "search" / f"{searches[4]}.scores.parquet", store / "search" / f"{searches[1]}.json"
    damage_middle(knn)
    text = maha.read_text()  # still valid JSON, one number changed: a silently wrong result before
    changed = re.sub(r'"val_auroc": 0\.9', '"val_auroc": 0.1', text, count=1)
    assert changed != text
    maha.write_text(changed)

    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    assert "Traceback" not in out
    lines = _aside_lines(out)
    assert len(lines) == 4, "\n".join(lines) or out[-3000:]
    expected = {
        feats["id-test"]: "[extract] cnn-s0/id-test: cached feature file damaged (sha256 mismatch); ",
        feats["photos"]: "[extract] cnn-s0/photos: cached feature file damaged (sha256 mismatch); ",
        knn: "[search] cnn-s0/KNN: cached search scores file damaged (sha256 mismatch); ",
        maha: "[search] cnn-s0/Mahalanobis: cached search record damaged (sha256 mismatch); ",
    }
    for path, start in expected.items():
        (line,) = [l for l in lines if f"set aside as {path}.damaged-" in l]
        assert line.startswith(start) and line.endswith(("recomputing", "searching again")), line
        (aside,) = ASIDE.findall(line)
        assert os.path.exists(aside)  # kept for inspection
    assert "[extract] reusing 7 of 9 cached feature files" in out
    assert "[search] reusing 1 of 3 cached searches" in out and "[search] 2 searches" in out

    assert results_of(cfg) == clean_sweep["results"]
    for label in ("id-test", "photos"):  # recomputed byte for byte, with a fresh record
        rel = feats[label].relative_to(store)
        assert sha(feats[label]) == sha(clean / rel) == storage.read_hash(feats[label])
    for path in (knn, maha):
        assert storage.verify(path).ok
    assert json.loads(maha.read_text()) == json.loads((clean / "search" / maha.name).read_text())
    pd.testing.assert_frame_equal(pd.read_parquet(knn), pd.read_parquet(clean / "search" / knn.name))


def test_damaged_checkpoint_is_set_aside_and_retrained(clean_sweep, tmp_path):
    cfg, store = _copy_of_clean(clean_sweep, tmp_path, "damaged-ckpt")
    (ckpt,) = (store / "checkpoints").glob("*.pt")
    damage_middle(ckpt)

    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    assert "Traceback" not in out
    (line,) = _aside_lines(out)
    assert line.startswith("[train] cnn-s0: cached checkpoint damaged (sha256 mismatch); "
                           f"set aside as {ckpt}.damaged-") and line.endswith(", retraining"), line
    assert "training small_cnn for 4 epochs" in out
    assert "reusing 9 of 9 cached feature files" in out and "reusing 3 of 3 cached searches" in out
    assert results_of(cfg) == clean_sweep["results"]
    state, _ = load_checkpoint(str(ckpt))
    ref, _ = load_checkpoint(str(clean_sweep["storage"] / "checkpoints" / ckpt.name))
    assert state.keys() == ref.keys() and all(torch.equal(state[k], v) for k, v in ref.items())
    assert storage.verify(ckpt).ok
