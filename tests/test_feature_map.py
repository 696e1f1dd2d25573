"""The node's one decoded copy of a feature file (ood_core.feature_map) and float16 storage."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ood_core import feature_map
from ood_core.feature_map import map_features
from ood_core.feature_store import FeatureWriter, read_features, validate_feature_file


def _write(path, n=300, dtype="float32", seed=0, record_hash=True, rows_per_group=64):
    rng = np.random.default_rng(seed)
    cols = {"penultimate": rng.normal(size=(n, 16)).astype(np.float32),
            "logits": rng.normal(size=(n, 4)).astype(np.float32),
            "maps": rng.normal(size=(n, 2, 3, 3)).astype(np.float32),
            "energy": rng.normal(size=n).astype(np.float32)}
    labels = rng.integers(0, 4, n)
    with FeatureWriter(path, {"dataset": "d", "split": "train"}, row_group_rows=rows_per_group,
                       record_hash=record_hash, dtype=dtype) as w:
        for s in range(0, n, 50):
            w.write(np.arange(s, min(s + 50, n)), labels[s:s + 50], {k: v[s:s + 50] for k, v in cols.items()})
    return cols, labels


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_SWEEP_FEATURE_CACHE", str(tmp_path / "cache"))
    feature_map._MAPPED.clear()
    yield tmp_path / "cache"
    feature_map._MAPPED.clear()


def test_mapped_columns_equal_the_parquet_read_and_are_shared_copy_on_write(tmp_path, cache):
    path = tmp_path / "f.parquet"
    _write(path)
    fs, ref = map_features(path), read_features(path)
    assert np.array_equal(fs.index, ref.index) and np.array_equal(fs.labels, ref.labels)
    for name, values in ref.columns.items():
        assert fs.columns[name].dtype == np.float32 and np.array_equal(fs.columns[name], values), name
        assert isinstance(fs.columns[name], np.memmap)  # a mapping of the file, not a decoded copy
    assert fs.columns["maps"].shape == (300, 2, 3, 3) and fs.metadata["dataset"] == "d"
    fs.columns["penultimate"][0, 0] = 1e6  # copy-on-write: the shared copy is unchanged
    feature_map._MAPPED.clear()
    assert map_features(path).columns["penultimate"][0, 0] == ref.columns["penultimate"][0, 0]
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 1  # decoded once


def test_another_process_maps_the_same_copy_without_decoding_again(tmp_path, cache):
    path = tmp_path / "f.parquet"
    _write(path)
    map_features(path)
    copy = next(d for d in cache.iterdir() if d.is_dir())
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir() if p.suffix == ".npy"}
    code = textwrap.dedent(f"""
        from ood_core.feature_map import map_features
        fs = map_features({str(path)!r}, ["logits"])
        print(fs.columns["logits"].shape, fs.columns["logits"].filename)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OOD_SWEEP_FEATURE_CACHE": str(cache)}).stdout
    assert "(300, 4)" in out and str(copy) in out
    assert before == {p.name: p.stat().st_mtime_ns for p in copy.iterdir() if p.suffix == ".npy"}


def test_a_damaged_copy_is_decoded_again_not_used(tmp_path, cache):
    path = tmp_path / "f.parquet"
    cols, _ = _write(path)
    map_features(path)
    copy = next(d for d in cache.iterdir() if d.is_dir())
    feature_map._MAPPED.clear()  # a new process
    target = copy / "c2.npy"  # index, label, then penultimate
    data = bytearray(target.read_bytes())
    data[-7] ^= 0xFF  # one flipped byte in the last row
    target.write_bytes(bytes(data))
    fs = map_features(path)
    assert np.array_equal(fs.columns["penultimate"], cols["penultimate"])


def test_a_new_file_content_gets_a_new_copy(tmp_path, cache):
    path = tmp_path / "f.parquet"
    _write(path, seed=0)
    first = map_features(path).columns["logits"].copy()
    _write(path, seed=1)  # rewritten: another content hash
    second = map_features(path).columns["logits"]
    assert not np.array_equal(first, second)
    assert np.array_equal(second, read_features(path).columns["logits"])


def test_float16_storage_halves_the_file_and_rounds_to_nearest(tmp_path, cache):
    cols, _ = _write(tmp_path / "f32.parquet", n=2000, rows_per_group=4096)
    _write(tmp_path / "f16.parquet", n=2000, dtype="float16", rows_per_group=4096)
    assert validate_feature_file(tmp_path / "f16.parquet", ["penultimate", "energy"])
    size32, size16 = (os.path.getsize(tmp_path / f) for f in ("f32.parquet", "f16.parquet"))
    assert size16 < 0.6 * size32
    ref = read_features(tmp_path / "f16.parquet")
    mapped = map_features(tmp_path / "f16.parquet")
    for name, values in cols.items():
        stored = np.float32 if values.ndim == 1 else np.float16  # per-sample scalars stay float32
        expect = values.astype(stored)
        assert ref.columns[name].dtype == np.float32 and np.array_equal(ref.columns[name], expect.astype(np.float32))
        assert mapped.columns[name].dtype == stored and np.array_equal(mapped.columns[name], expect)
    assert not np.array_equal(ref.columns["penultimate"], cols["penultimate"])  # rounded


def test_float16_refuses_values_it_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="'big'.*float16's range"):
        with FeatureWriter(tmp_path / "x.parquet", dtype="float16") as w:
            w.write([0, 1], [0, 0], {"big": np.array([[1.0], [7e4]], np.float32)})
    assert not (tmp_path / "x.parquet").exists()


def test_a_shared_value_is_computed_once_per_machine(tmp_path, cache):
    """Two processes (and this one) ask for the same statistic of a file: the first computes it, the others read it;
    a new content of the file is a new value."""
    path = tmp_path / "f.parquet"
    _write(path)
    marks = tmp_path / "computed"
    code = textwrap.dedent(f"""
        import numpy as np
        from ood_core.feature_map import map_features, shared_value
        def compute():
            with open({str(marks)!r}, "a") as f:
                f.write("x")
            return float(map_features({str(path)!r}, ["logits"]).columns["logits"].sum(dtype=np.float64))
        print(repr(shared_value({str(path)!r}, "logits/sum", compute)))
    """)
    env = {**os.environ, "OOD_SWEEP_FEATURE_CACHE": str(cache)}
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
            for _ in range(2)]
    assert outs[0] == outs[1] and marks.read_text() == "x"
    assert feature_map.shared_value(path, "logits/sum", lambda: 1 / 0) == float(outs[0])
    _write(path, seed=1)  # another content: computed again
    assert feature_map.shared_value(path, "logits/sum", lambda: -1.0) == -1.0
