"""Sharded extraction on a simulated two-node Ray cluster (``ray.cluster_utils.Cluster``; issue 15, point 5).

The sweep's extract stage splits the ID training set into shards (row ranges on batch boundaries, one Ray task
each) joined by a merge task. On a cluster of two 1-CPU worker nodes (the head schedules nothing):

1. the shards run on both nodes and the merged file equals one ``extract_features`` pass over the whole set with
   the same checkpoint, bit for bit;
2. with a fresh store, the node running a shard is killed (SIGKILL) while the shard is being written and a fresh
   node joins: the extraction completes, the file is again the single pass bit for bit, and only the lost shard
   was extracted again (the surviving shard once, the lost one twice).

What ran where is observed without touching the product: the script gives the job a Ray
``worker_process_setup_hook`` that wraps ``ood_core.hooks.extract_features`` in every worker of the cluster. The
wrapper appends one line per call (output URI, first row, node id, pid) to a log file, and slows shard
extraction down (a sleep per batch, values untouched) so that "while its shard is running" is certain. A thread of
the script also watches the feature directory for the shards' temporary outputs (``<part>.tmp-<uuid>``, one per
attempt), an independent count of the attempts.

Everything Ray runs in a subprocess script, as in ``test_cluster.py``, so that it does not meet the session Ray of
``conftest.py``.
"""
import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sweep_runs import sweep_env, write_config

pytest.importorskip("ray.cluster_utils")

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32  # ID train: 650 rows, 21 batches of 32 over 2 slots -> shards (0, 352) and (352, 650)
DELAY_S = 0.3  # per shard batch, in the workers only: a shard takes ~3 s

SCRIPT = textwrap.dedent('''
    import json, os, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from orchestrator.config import load_config
    from orchestrator.sweep import SweepRunner, _bb_dict, _feature_dict
    from orchestrator.tracking import Tracker

    cfg1, cfg2, summary_path = sys.argv[1:4]

    def say(*args):
        print("", *args, flush=True)

    def setup():
        """Runs in every Ray worker of this job: records each extraction (and slows shards down)."""
        import json, os, time
        import ray
        import ood_core.hooks as hooks

        real = hooks.extract_features
        log, delay = os.environ["CLUSTER_SHARDS_LOG"], float(os.environ["CLUSTER_SHARDS_DELAY"])

        def recorded(model, loader, layers, uri, **kw):
            shard = ".rows" in str(uri)
            line = {"uri": str(uri), "start": int(kw.get("index_start", 0)), "shard": shard, "pid": os.getpid(),
                    "node": ray.get_runtime_context().get_node_id(), "time": time.time()}
            with open(log, "a") as f:
                f.write(json.dumps(line) + "\\n")
            if shard:
                inner = loader

                def slowly():
                    for batch in inner:
                        time.sleep(delay)
                        yield batch
                loader = slowly()
            return real(model, loader, layers, uri, **kw)

        hooks.extract_features = recorded  # tasks.extract imports it from the module at each call

    def open_sweep(cfg):  # the driver's side of a sweep: its plan and MLflow store
        runner = SweepRunner(load_config(cfg), "")
        return runner, Tracker(runner.tracking_uri, runner.cfg.name)

    # Both sweeps open (seconds: the MLflow store is created) while the cluster starts (in the main thread).
    # The head schedules no work (0 CPUs); two worker nodes of 1 CPU each. Faster health checks than the
    # default (~15 s): a killed node is declared dead within ~5 s.
    with ThreadPoolExecutor(max_workers=1) as pool:
        opening = pool.submit(lambda: [open_sweep(cfg) for cfg in (cfg1, cfg2)])
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 10}})
        nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"worker_process_setup_hook": setup})
        cluster.wait_for_nodes()
        sweeps = opening.result()
    summary = {"workers": [n.node_id for n in nodes]}

    @ray.remote(num_cpus=1)
    def warm():
        import ood_core.hooks, tasks.extract  # noqa: F401 - what an extraction task imports first
        return ray.get_runtime_context().get_node_id()

    # a started worker on each node (Ray keeps one idle worker per CPU), so that both shards start at once
    on = [warm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote()
          for n in nodes]
    assert ray.get(on) == summary["workers"]

    def prepare(runner, tracker):
        runner.train(tracker, tracker.start_run("sweep"))  # the user checkpoint, loaded into the storage
        bb = runner.plan.backbones[0]
        train = next(f for f in bb.features if f.dataset.role == "id_train")
        summary.setdefault("reference", {  # run 1's: what a single pass over ID train needs
            "backbone": _bb_dict(bb), "feature": _feature_dict(train), "layers": bb.layers,
            "num_classes": runner.plan.num_classes, "format": runner.plan.input_format})
        return runner, train.uri

    def listing(uri):
        folder = os.path.dirname(uri)
        return sorted(os.listdir(folder))

    # 1. an undisturbed sharded extraction
    runner, uri = prepare(*sweeps[0])
    summary["shards"] = runner._shards()
    runner.extract()
    summary["run1"] = {"uri": uri, "files": listing(uri)}
    say("RUN 1 DONE")

    # 2. the node running a shard is lost while the shard is written
    runner, uri = prepare(*sweeps[1])
    folder, base = os.path.dirname(uri), os.path.basename(uri)
    seen, outcome, stop = set(), {}, threading.Event()

    def watch():  # every shard attempt writes its own <part>.tmp-<uuid> until it is complete
        while not stop.is_set():
            try:
                seen.update(n for n in os.listdir(folder) if n.startswith(base + ".rows") and ".tmp-" in n)
            except FileNotFoundError:
                pass
            time.sleep(0.02)

    def extract():
        try:
            runner.extract()
            outcome["ok"] = True
        except BaseException as exc:
            outcome["error"] = repr(exc)
            raise

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    thread = threading.Thread(target=extract, daemon=True)
    thread.start()
    log = os.environ["CLUSTER_SHARDS_LOG"]
    deadline, victim = time.time() + 120, None
    while victim is None:
        if not thread.is_alive() or time.time() > deadline:
            say("NEVER SAW A SHARD OF RUN 2 START", outcome)
            sys.exit(1)
        with open(log) as f:
            calls = [json.loads(l) for l in f if l.strip()]
        for c in calls:  # a shard of this run whose temporary output exists: it is being written now
            if c["shard"] and c["uri"].startswith(uri + ".rows") and any(n.startswith(os.path.basename(c["uri"]))
                                                                          for n in set(seen)):
                victim = c
                break
        time.sleep(0.02)
    lost = next(n for n in nodes if n.node_id == victim["node"])
    cluster.remove_node(lost, allow_graceful=False)  # SIGKILL: the node and its workers are gone
    killed_after_s = time.time() - victim["time"]  # of its shard's ~3 s
    nodes = [n for n in nodes if n is not lost] + [cluster.add_node(num_cpus=1)]  # somewhere to retry
    say("LOST NODE", victim["node"], "running rows", victim["start"])
    thread.join(240)
    stop.set()
    watcher.join()
    summary["run2"] = {"uri": uri, "files": listing(uri), "lost": victim, "killed_after_s": killed_after_s,
                       "tmp_seen": sorted(seen), "outcome": outcome}
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    say("RUN 2", "finished" if outcome.get("ok") else f"failed: {outcome}")
    ray.shutdown()
    cluster.shutdown()
''')


def _model():
    from ood_core.models import build_model

    return build_model("small_cnn", num_classes=6, in_channels=1, image_size=16, seed=3).eval()


def _single_pass(ref, path: Path):
    """One ``extract_features`` pass over the whole ID training set, in this process (no Ray), with the checkpoint
    the sweep stored and the sweep's layers, batch size and data set."""
    from ood_core.data import load_dataset
    from ood_core.feature_store import read_features
    from ood_core.hooks import LayerSpec, extract_features
    from tasks.runtime import input_format, load_backbone

    model = load_backbone(ref["backbone"], ref["num_classes"], ref["format"])
    ds = ref["feature"]["dataset"]
    data = load_dataset(ds["dataset"], split=ds["split"], fmt=input_format(ref["format"]), seed=ds["seed"],
                        **ds["params"])
    specs = [LayerSpec(name=l["name"], module=l["module"], reduction=l["reduction"]) for l in ref["layers"]]
    extract_features(model, torch.utils.data.DataLoader(data, batch_size=BATCH), specs, path)
    return read_features(path)


def _same_rows(merged, one):
    assert np.array_equal(merged.index, np.arange(len(one.index))) and np.array_equal(merged.index, one.index)
    assert np.array_equal(merged.labels, one.labels)
    assert set(merged.columns) == set(one.columns) and len(one.columns) == 4
    for name in one.columns:
        assert np.array_equal(merged.columns[name], one.columns[name]), name  # bit for bit


def test_shards_run_on_both_nodes_and_a_lost_node_costs_only_its_shard(tmp_path):
    from ood_core.feature_store import read_features
    from ood_core.storage import read_hash

    checkpoint = tmp_path / "cnn.pt"
    torch.save(_model().state_dict(), checkpoint)
    cfgs = []
    for run in ("run1", "run2"):  # a store each, one MLflow store (created once: seconds)
        folder = tmp_path / run
        folder.mkdir()
        cfgs.append(write_config(
            folder, "shards", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", shared_storage=True,
            resources={"max_retries": 3},
            backbones=[{"name": "cnn", "arch": "small_cnn", "checkpoint": str(checkpoint), "seeds": [0]}],
            extract={"batch_size": BATCH}))
    log, summary_path = tmp_path / "extractions.jsonl", tmp_path / "summary.json"
    script = tmp_path / "cluster_shards.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(cfgs[0]), str(cfgs[1]), str(summary_path)], cwd=ROOT,
                          env=sweep_env(CLUSTER_SHARDS_LOG=str(log), CLUSTER_SHARDS_DELAY=str(DELAY_S),
                                        OOD_SWEEP_PROGRESS="lines"),
                          capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "RUN 1 DONE" in out and re.search(r"LOST NODE \S+ running rows \d+", out), out[-3000:]
    assert "RUN 2 finished" in out, out[-3000:]
    summary = json.loads(summary_path.read_text())
    calls = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    ctx = f"\nextractions: {calls}\nsummary: {summary}\noutput: {out[-1500:]}"  # for a failure's message
    shards = [tuple(s) for s in summary["shards"]]
    assert shards == [(0, 352), (352, 650)], shards  # batch-aligned, one per worker node
    one = _single_pass(summary["reference"], tmp_path / "one.parquet")

    # 1. the shards ran on both worker nodes, once each; the merged file is the single pass bit for bit
    run1 = summary["run1"]
    shard_calls = [c for c in calls if c["shard"] and c["uri"].startswith(run1["uri"] + ".rows")]
    assert sorted(c["start"] for c in shard_calls) == [a for a, _ in shards], ctx
    assert {c["node"] for c in shard_calls} == set(summary["workers"]), ctx
    _same_rows(read_features(run1["uri"]), one)
    name = Path(run1["uri"]).name
    assert not [f for f in run1["files"] if f.startswith(name + ".rows")], ctx  # the parts are gone

    # 2. a node lost mid-shard: only that shard is extracted again (on another node), the result is the same
    run2 = summary["run2"]
    lost = run2["lost"]
    assert lost["node"] in summary["workers"]
    shard_calls = [c for c in calls if c["shard"] and c["uri"].startswith(run2["uri"] + ".rows")]
    starts = Counter(c["start"] for c in shard_calls)
    survivor = next(a for a, _ in shards if a != lost["start"])
    assert starts == {lost["start"]: 2, survivor: 1}, ctx
    retry = [c for c in shard_calls if c["start"] == lost["start"] and c["time"] > lost["time"]]
    assert len(retry) == 1 and retry[0]["node"] != lost["node"], ctx
    assert retry[0]["uri"] == lost["uri"]  # the same part, written again
    # seen from outside: one temporary output per attempt of each shard
    attempts = Counter(re.search(r"\.rows(\d+)-", t).group(1) for t in run2["tmp_seen"])
    assert attempts == {str(lost["start"]): 2, str(survivor): 1}, ctx
    _same_rows(read_features(run2["uri"]), one)
    # the two runs' files are the same bytes (their recorded sha256)
    assert read_hash(run2["uri"]) == read_hash(run1["uri"]) is not None
    # the parts are gone, and so is the lost attempt's partial output (``<part>.tmp-<uuid>``, which its killed
    # writer never deleted): the merge task removes it
    name = Path(run2["uri"]).name
    leftover = [f for f in run2["files"] if f.startswith(name + ".rows")]
    assert leftover == [], (leftover, ctx)
