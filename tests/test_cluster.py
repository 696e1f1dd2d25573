"""A sweep on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``): one node is removed in
the middle and the sweep still completes with complete results; node-local storage is refused."""
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, os, sys, threading, time
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from orchestrator.config import load_config
    from orchestrator.errors import UserError
    from orchestrator.sweep import SweepRunner

    refused_cfg, cfg_path = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    try:  # node-local storage and a sqlite store on a multi-node cluster
        SweepRunner(load_config(refused_cfg), "").run()
    except UserError as exc:
        print("REFUSED", exc, flush=True)
    runner = SweepRunner(load_config(cfg_path), "")
    result = {}
    thread = threading.Thread(target=lambda: result.update(rows=runner.run()))
    thread.start()
    features = os.path.join(runner.cfg.storage, "features")
    while thread.is_alive() and not (os.path.isdir(features) and any(os.scandir(features))):
        time.sleep(0.2)
    time.sleep(1.0)
    cluster.remove_node(doomed)          # a worker node is lost in the middle of extraction
    print("REMOVED NODE", flush=True)
    thread.join(600)
    print("ROWS", json.dumps([{k: v for k, v in r.items() if k in ("detector", "near/auroc", "far/auroc")}
                              for r in result.get("rows", [])]))
    ray.shutdown()
    cluster.shutdown()
''')


def _config(tmp_path, tracking_uri, shared=True, name="cluster.yaml"):
    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    raw.update(name="cluster", storage=str(tmp_path / "store"), shared_storage=shared, tracking_uri=tracking_uri)
    raw["backbones"][0]["train"]["epochs"] = 3
    raw["detectors"] = [{"type": "MaxSoftmax", "search": {"t": {"grid": [1, 10, 100]}}}, {"type": "KNN",
                        "search": {"k": {"grid": [1, 5]}}}, {"type": "Mahalanobis"}]
    raw["resources"]["max_retries"] = 3
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(tmp_path, refused_cfg, cfg):
    script = tmp_path / "cluster_sweep.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(refused_cfg), str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture()
def mlflow_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


def test_multi_node_sweep_refuses_local_stores_and_survives_a_lost_node(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    local = _config(tmp_path, f"sqlite:///{tmp_path / 'local.db'}", shared=False, name="local.yaml")
    cfg = _config(tmp_path, mlflow_server)
    code, out = _run(tmp_path, local, cfg)
    assert code == 0, out[-4000:]
    line = next(l for l in out.splitlines() if l.startswith("REFUSED"))
    assert "3 nodes" in line and "node-local path" in line and "local store" in line
    assert not (tmp_path / "local.db").exists()
    assert "REMOVED NODE" in out
    rows = json.loads(next(l for l in out.splitlines() if l.startswith("ROWS "))[5:])
    assert [r["detector"] for r in rows] == ["MaxSoftmax", "KNN", "Mahalanobis"]
    assert all(0 <= r["near/auroc"] <= 1 and 0 <= r["far/auroc"] <= 1 for r in rows)
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id], max_results=200)
    stages = [r.data.tags.get("stage") for r in runs]
    assert stages.count("sweep") == 1 and stages.count("detector") == 3 and stages.count("trial") == 3 + 2 + 1
    assert all(r.info.status == "FINISHED" for r in runs)
