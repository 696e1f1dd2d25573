import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ood_core.feature_store import FeatureWriter, read_features, validate_feature_file

COLS = ("logits", "penultimate", "conv1.energy", "bn1.none")


def _batches(rng, n_batches=3, bs=7):
    out, start = [], 0
    for _ in range(n_batches):
        out.append((np.arange(start, start + bs), rng.integers(0, 5, bs),
                    {"logits": rng.standard_normal((bs, 5)).astype(np.float32),
                     "penultimate": rng.standard_normal((bs, 16)).astype(np.float32),
                     "conv1.energy": rng.standard_normal(bs).astype(np.float32),
                     "bn1.none": rng.standard_normal((bs, 2, 3, 3)).astype(np.float32)}))
        start += bs
    return out


def _write(uri, batches, **kw):
    meta = {"backbone_key": "abc123", "dataset": "digits", "split": "test", "layers": json.dumps(["x"])}
    cmeta = {c: {"layer": c.split(".")[0], "reduction": "energy" if "energy" in c else "avgpool"} for c in COLS}
    with FeatureWriter(uri, meta, cmeta, **kw) as w:
        for idx, lab, cols in batches:
            w.write(idx, lab, cols)
    return meta, cmeta


@pytest.mark.parametrize("row_group_rows", [65536, 5])  # one row group / several (multi-chunk read path)
def test_round_trip(tmp_path, row_group_rows):
    rng = np.random.default_rng(0)
    batches = _batches(rng)
    uri = tmp_path / "feats.parquet"
    meta, cmeta = _write(uri, batches, row_group_rows=row_group_rows)
    fs = read_features(uri)
    assert len(fs) == 21
    np.testing.assert_array_equal(fs.index, np.arange(21))
    np.testing.assert_array_equal(fs.labels, np.concatenate([b[1] for b in batches]))
    for c in COLS:
        expect = np.concatenate([b[2][c] for b in batches])
        assert fs.columns[c].dtype == np.float32 and fs.columns[c].shape == expect.shape
        np.testing.assert_array_equal(fs.columns[c], expect)
        assert fs.columns[c].flags.writeable
        assert fs.column_meta[c]["layer"] == cmeta[c]["layer"]
        assert fs.column_meta[c]["reduction"] == cmeta[c]["reduction"]
    assert fs.column_meta["bn1.none"]["shape"] == "[2, 3, 3]"
    for k, v in meta.items():
        assert fs.metadata[k] == v
    # raw schema: prefixed keys, Arrow types as documented
    schema = pq.read_schema(uri)
    assert schema.metadata[b"ood_sweep.dataset"] == b"digits"
    assert schema.metadata[b"ood_sweep.backbone_key"] == b"abc123"
    assert schema.field("penultimate").type == pa.list_(pa.float32(), 16)
    assert schema.field("conv1.energy").type == pa.float32()
    assert schema.field("index").type == pa.int64() and schema.field("label").type == pa.int64()
    assert schema.field("logits").metadata[b"layer"] == b"logits"
    assert validate_feature_file(uri, COLS)
    n_groups = pq.ParquetFile(uri).num_row_groups
    assert n_groups == (1 if row_group_rows > 21 else 3)


def test_pandas_and_column_subset(tmp_path):
    rng = np.random.default_rng(1)
    batches = _batches(rng, 2, 4)
    uri = tmp_path / "f.parquet"
    _write(uri, batches)
    df = pd.read_parquet(uri)
    assert list(df.columns) == ["index", "label", *COLS]
    np.testing.assert_allclose(np.stack(df["penultimate"].to_numpy()),
                               np.concatenate([b[2]["penultimate"] for b in batches]))
    np.testing.assert_allclose(df["conv1.energy"].to_numpy(), np.concatenate([b[2]["conv1.energy"] for b in batches]))
    fs = read_features(f"file://{uri}", columns=["logits"])
    assert list(fs.columns) == ["logits"] and fs.columns["logits"].shape == (8, 5)
    with pytest.raises(KeyError, match="available"):
        read_features(uri, columns=["nope"])


def test_exception_inside_with_leaves_nothing(tmp_path):
    uri = tmp_path / "out" / "f.parquet"
    rng = np.random.default_rng(2)
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureWriter(uri, {"dataset": "d"}, {}) as w:
            for idx, lab, cols in _batches(rng):
                w.write(idx, lab, cols)
            raise RuntimeError("boom")
    assert not uri.exists()
    assert os.listdir(uri.parent) == []  # no temp file left behind


def test_existing_file_untouched_on_failure(tmp_path):
    uri = tmp_path / "f.parquet"
    rng = np.random.default_rng(3)
    _write(uri, _batches(rng, 1, 3))
    before = uri.read_bytes()
    with pytest.raises(ValueError):
        with FeatureWriter(uri, {}, {}) as w:
            w.write(np.arange(2), np.zeros(2), {"a": np.zeros((2, 3), np.float32)})
            w.write(np.arange(2), np.zeros(2), {"a": np.zeros((2, 4), np.float32)})  # shape changes
    assert uri.read_bytes() == before
    assert os.listdir(tmp_path) == ["f.parquet"]


def test_writer_thread_error_propagates(tmp_path):
    uri = tmp_path / "f.parquet"

    def bad_ready():
        raise OSError("device copy failed")

    with pytest.raises(OSError, match="device copy failed"):
        with FeatureWriter(uri, {}, {}) as w:
            w.write(np.arange(3), np.zeros(3), {"a": np.zeros((3, 2), np.float32)}, ready=bad_ready)
            for i in range(1, 20):  # keeps writing; the error surfaces on a later write or on close
                w.write(np.arange(3) + 3 * i, np.zeros(3), {"a": np.zeros((3, 2), np.float32)})
    assert os.listdir(tmp_path) == []


def test_input_validation(tmp_path):
    uri = tmp_path / "f.parquet"
    with pytest.raises(ValueError, match="no rows"):
        with FeatureWriter(uri, {}, {}):
            pass
    w = FeatureWriter(uri, {}, {})
    with pytest.raises(ValueError, match="reserved"):
        w.write(np.arange(2), np.zeros(2), {"label": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="rows"):
        w.write(np.arange(2), np.zeros(3), {"a": np.zeros(2, np.float32)})
    w.write(np.arange(2), np.zeros(2), {"a": np.zeros(2, np.float64)})  # converted to float32
    with pytest.raises(ValueError, match="differ"):
        w.write(np.arange(2), np.zeros(2), {"b": np.zeros(2, np.float32)})
    w.close()
    assert read_features(uri).columns["a"].dtype == np.float32
    assert os.listdir(tmp_path) == ["f.parquet"]


def test_validate_feature_file(tmp_path):
    uri = tmp_path / "f.parquet"
    assert not validate_feature_file(uri, ["logits"])  # missing
    _write(uri, _batches(np.random.default_rng(4)))
    assert validate_feature_file(uri, ["logits", "conv1.energy"])
    assert not validate_feature_file(uri, ["logits", "other"])
    data = uri.read_bytes()
    (tmp_path / "trunc.parquet").write_bytes(data[: len(data) // 2])
    assert not validate_feature_file(tmp_path / "trunc.parquet", ["logits"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    assert not validate_feature_file(tmp_path / "junk.parquet")
    # a Parquet file not written by FeatureWriter (no recorded row count) is not a feature file
    pq.write_table(pa.table({"index": pa.array([0], pa.int64()), "label": pa.array([0], pa.int64())}),
                   tmp_path / "other.parquet")
    assert not validate_feature_file(tmp_path / "other.parquet")


def test_two_writers_of_one_file_never_leave_a_torn_file(tmp_path):
    """Two sweeps extracting the same features at once: each writes a temp file and renames it."""
    import threading

    import numpy as np
    import pandas as pd

    from ood_core.feature_store import FeatureWriter, validate_feature_file

    uri = str(tmp_path / "shared.parquet")
    errors = []

    def write(seed):
        try:
            rng = np.random.default_rng(seed)
            with FeatureWriter(uri, {"dataset": "x"}) as w:
                for b in range(20):
                    w.write(np.arange(b * 50, b * 50 + 50), np.zeros(50), {"f": rng.normal(size=(50, 32)).astype("float32")})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert validate_feature_file(uri, ["f"])
    assert len(pd.read_parquet(uri)) == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["shared.parquet"]  # no temp files left
