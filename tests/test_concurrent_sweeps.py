"""Two sweeps sharing one feature store at the same time do not corrupt each other's cache.

Two ``python -m orchestrator sweep`` processes start together on the same study with the same
``storage`` (their own names and MLflow stores): they compute and write the same checkpoint, feature
files and search records under the same cache keys at the same time. Both finish with the results of
a clean run, and every cached file afterwards is complete and equal to the clean run's.
"""
import json
import os
import signal
import time

import numpy as np
import pandas as pd
import torch

from sweep_runs import EXPECTED_RUNS, launch, results_of, run_counts_of, write_config


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_two_sweeps_sharing_one_store_at_the_same_time(tmp_path, clean_sweep):
    from ood_core import storage
    from ood_core.checkpoints import load_checkpoint
    from ood_core.feature_store import read_features, validate_feature_file

    store = tmp_path / "store"
    cfgs = [write_config(tmp_path, name, storage=str(store), tracking_uri=f"sqlite:///{tmp_path / name}.db")
            for name in ("sweep-a", "sweep-b")]
    procs = [launch(cfg, tmp_path / f"{cfg.stem}.log") for cfg in cfgs]
    deadline = time.time() + 480
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    logs = [(tmp_path / f"{cfg.stem}.log").read_text(errors="replace") for cfg in cfgs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    # they raced: neither found the other's checkpoint, both trained it
    assert all("training small_cnn for 4 epochs" in log for log in logs)

    for cfg in cfgs:
        assert results_of(cfg) == clean_sweep["results"]
        counts, runs = run_counts_of(cfg)
        assert counts == EXPECTED_RUNS, counts
        assert all(r.info.status == "FINISHED" for r in runs)

    # the shared cache: the clean run's files, complete, no temporaries left behind, same content
    clean = clean_sweep["storage"]
    listed = [f for f in _files(store) if not f.startswith("tune")]
    assert listed == [f for f in _files(clean) if not f.startswith("tune")]
    assert not any(".tmp-" in f or ".damaged-" in f for f in _files(store))
    # every cached file carries its content hash, and the record describes the file that is there
    cached = [f for f in listed if not f.endswith(storage.HASH_SUFFIX)]
    assert sorted(f + storage.HASH_SUFFIX for f in cached) == [f for f in listed if f.endswith(storage.HASH_SUFFIX)]
    assert all(storage.verify(store / f).ok for f in cached)
    features = [f for f in cached if f.startswith("features")]
    assert len(features) == 9
    for rel in features:
        assert validate_feature_file(store / rel)
        ours, ref = read_features(store / rel), read_features(clean / rel)
        assert ours.metadata == ref.metadata and ours.columns.keys() == ref.columns.keys()
        np.testing.assert_array_equal(ours.labels, ref.labels)
        for name, values in ref.columns.items():
            np.testing.assert_array_equal(ours.columns[name], values)
    (ckpt,) = [f for f in cached if f.startswith("checkpoints")]
    (state, meta), (ref_state, ref_meta) = load_checkpoint(store / ckpt), load_checkpoint(clean / ckpt)
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], v) for k, v in ref_state.items())
    untimed = lambda m: {**m, "history": [{k: v for k, v in h.items() if k != "time_s"} for h in m["history"]]}
    assert untimed(meta) == untimed(ref_meta)
    for rel in (f for f in cached if f.endswith(".json")):
        assert json.loads((store / rel).read_text()) == json.loads((clean / rel).read_text())
    for rel in (f for f in cached if f.startswith("search") and f.endswith(".parquet")):
        pd.testing.assert_frame_equal(pd.read_parquet(store / rel), pd.read_parquet(clean / rel))
