"""A sweep on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``) with its storage in an
object store (``s3://``, moto's server) and MLflow behind a tracking server, as on a real cluster.

The worker node doing the work is lost three times: during training, during extraction and during a
Tune trial. Each time the work is retried on a fresh node, and the sweep ends with exactly the
results of an uninterrupted run and without duplicated MLflow runs. Node-local storage and a local
MLflow store are refused on a multi-node cluster; a shared mount is accepted.
"""
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import s3_server
from ood_core import storage
from sweep_runs import EXPECTED_RUNS, results, run_counts, sweep_env, write_config

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import os, socket, sys, threading, time
    from urllib.parse import urlparse
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster
    from ood_core import storage
    from orchestrator.config import load_config
    from orchestrator.errors import UserError
    from orchestrator.sweep import SweepRunner

    refused_cfg, shared_cfg, cfg_path, tracking = sys.argv[1:5]

    def say(*args):
        print("", *args, flush=True)

    # The head schedules no work (0 CPUs), so at any time the one worker node is the one doing it.
    # Faster health checks than the default (~15 s): a killed node is declared dead within ~5 s.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
        "health_check_period_ms": 500, "health_check_failure_threshold": 10}})
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    try:  # node-local storage and a sqlite store on a multi-node cluster
        SweepRunner(load_config(refused_cfg), "").run()
    except UserError as exc:
        say("REFUSED", exc)
    SweepRunner(load_config(shared_cfg), "").check_cluster()
    say("SHARED MOUNT ACCEPTED")

    url = urlparse(tracking)  # the tracking server was started beside the cluster
    deadline = time.time() + 180
    while True:
        try:
            socket.create_connection((url.hostname, url.port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)

    runner = SweepRunner(load_config(cfg_path), "")
    bb = runner.plan.backbones[0]
    client = MlflowClient(tracking)
    outcome = {}

    def sweep():
        try:
            runner.run()
            outcome["ok"] = True
        except BaseException as exc:
            outcome["error"] = repr(exc)
            raise

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()

    def wait_for(condition, what):
        deadline = time.time() + 300
        while not condition():
            if not thread.is_alive() or time.time() > deadline:
                say("NEVER SAW", what, outcome)
                sys.exit(1)
            time.sleep(0.1)

    def lose_node(phase):
        global node
        lost, node = node, cluster.add_node(num_cpus=1)
        cluster.remove_node(lost, allow_graceful=False)  # SIGKILL: the node and its workers are gone
        say("LOST NODE", phase)

    def trial_runs():
        exp = client.get_experiment_by_name(runner.cfg.name)
        return client.search_runs([exp.experiment_id], "tags.stage = 'trial'") if exp else []

    # 1. training: an epoch's resume checkpoint is written, the final checkpoint is not
    wait_for(lambda: storage.exists(bb.checkpoint_uri + ".resume"), "training")
    lose_node(f"training: final checkpoint written={storage.exists(bb.checkpoint_uri)}")
    # 2. extraction: some feature files are written, not all
    wait_for(lambda: any(storage.exists(f.uri) for f in bb.features), "extraction")
    lose_node(f"extraction: {sum(storage.exists(f.uri) for f in bb.features)}/{len(bb.features)} files")
    # 3. search: a trial is running
    wait_for(lambda: len(trial_runs()) > 0, "a trial")
    runs = trial_runs()
    lose_node(f"trial: {len(runs)} started, {sum(r.info.status == 'FINISHED' for r in runs)} finished")
    thread.join(600)
    say("SWEEP", "finished" if outcome.get("ok") else f"failed: {outcome}")
    ray.shutdown()
    cluster.shutdown()
''')


@pytest.fixture()
def mlflow_server(tmp_path):
    """An MLflow tracking server, waited for: the sweep's preflight refuses a server that does not answer yet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the MLflow server did not start (exit {proc.poll()})")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(30)


@pytest.fixture()
def s3():
    server, root = s3_server.start()
    yield server, root
    server.stop()


def test_multi_node_sweep_survives_lost_nodes_in_every_stage(tmp_path, mlflow_server, s3, clean_sweep, monkeypatch):
    server, bucket = s3
    refused = write_config(tmp_path, "cluster", tracking_uri=f"sqlite:///{tmp_path / 'local.db'}",
                           filename="local.yaml")
    shared = write_config(tmp_path, "cluster", tracking_uri=mlflow_server, shared_storage=True,
                          filename="shared.yaml")
    cfg = write_config(tmp_path, "cluster", storage=f"{bucket}/store", tracking_uri=mlflow_server,
                       resources={"max_retries": 3})
    script = tmp_path / "cluster_sweep.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(refused), str(shared), str(cfg), mlflow_server],
                          cwd=ROOT, env=sweep_env(**server.env()), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # Ray's progress bars share the output lines: find the script's messages anywhere in them
    refusal = re.search(r"REFUSED ([^\n]*)", out).group(1)
    assert "2 nodes" in refusal and "node-local path" in refusal and "local store" in refusal
    assert not (tmp_path / "local.db").exists()
    assert "SHARED MOUNT ACCEPTED" in out
    assert len(re.findall("LOST NODE", out)) == 3, out[-3000:]
    assert re.search(r"LOST NODE training: final checkpoint written=False", out)
    extracted, total = map(int, re.search(r"LOST NODE extraction: (\d+)/(\d+) files", out).groups())
    assert 0 < extracted < total
    started, finished = map(int, re.search(r"LOST NODE trial: (\d+) started, (\d+) finished", out).groups())
    assert started >= 1 and finished < EXPECTED_RUNS["trial"]
    assert "SWEEP finished" in out, out[-3000:]

    # the same numbers as an uninterrupted run, and every run logged once
    assert results(mlflow_server, "cluster") == clean_sweep["results"]
    counts, runs = run_counts(mlflow_server, "cluster")
    assert counts == EXPECTED_RUNS, counts
    assert all(r.info.status == "FINISHED" for r in runs)
    retried = [r for r in runs if r.data.tags.get("stage") == "trial" and int(r.data.tags.get("retries", 0)) > 0]
    assert retried, "no trial was restarted after its node was lost"

    # everything the sweep stored is in the bucket: checkpoint, features, searches, Tune's experiment
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    fs, root = storage.resolve(f"{bucket}/store")
    keys = [i.path[len(root) + 1:] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File]
    assert sum(k.startswith("checkpoints/") for k in keys) == 2, keys  # the checkpoint and its .sha256 record
    assert sum(k.startswith("features/") for k in keys) == 2 * 9, keys  # each feature file and its .sha256
    assert sum(k.startswith("search/") for k in keys) == 2 * 2 * 3, keys
    assert any(k.startswith("tune/") and "experiment_state" in k for k in keys)
    assert not any(".tmp-" in k or k.endswith(".resume") for k in keys)
    assert not (tmp_path / "store").exists()  # the refused and the shared-mount configs wrote nothing
