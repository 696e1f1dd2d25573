"""Whole sweeps for the fault tests: one small config, the CLI as a subprocess, results read back.

Every fault test (kill-and-resume, lost nodes, concurrent sweeps) runs the same study, so one clean run
(the session fixture ``clean_sweep`` in ``conftest.py``) is the reference for all of them. The study's
results do not depend on its name, storage location or tracking store, only on what the cache keys
hash, so a run with another name, storage (``s3://`` included) or MLflow store must give the same
numbers.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: MLflow runs of one complete sweep of :func:`write_config`'s study, by ``stage`` tag
EXPECTED_RUNS = {"sweep": 1, "train": 1, "detector": 3, "trial": 6 + 4 + 1}


def write_config(dirpath: Path, name: str = "resume", storage: Optional[str] = None,
                 tracking_uri: Optional[str] = None, filename: Optional[str] = None, **top) -> Path:
    """The fault tests' study (quickstart data, 4 epochs, 3 detectors, 11 trials) as a YAML file."""
    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    raw["name"] = name
    raw["storage"] = storage or str(dirpath / "store")
    raw["tracking_uri"] = tracking_uri or f"sqlite:///{dirpath / 'mlflow.db'}"
    raw["backbones"][0]["train"]["epochs"] = 4
    raw["detectors"] = [
        {"type": "MaxSoftmax", "search": {"t": {"grid": [1, 2, 5, 10, 100, 1000]}}},
        {"type": "KNN", "search": {"k": {"grid": [1, 5, 10, 20]}}},
        {"type": "Mahalanobis"},
    ]
    for key, value in top.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    path = dirpath / (filename or f"{name}.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_env(**extra) -> Dict[str, str]:
    return dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)


def launch(cfg: Path, log: Path, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Start ``python -m orchestrator sweep cfg`` in its own process group, output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(cfg)], cwd=cfg.parent,
                                env=env or sweep_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def run_sweep(cfg: Path, kill_after: str = None, sig=signal.SIGKILL, delay: float = 0.0,
              timeout: float = 400) -> Tuple[int, str, bool]:
    """Run the sweep CLI; with ``kill_after``, send ``sig`` once that text appears on stdout."""
    import pytest

    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(cfg)], cwd=cfg.parent,
                            env=sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out, deadline, fired = b"", time.time() + timeout, False
    while proc.poll() is None and time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            out += os.read(proc.stdout.fileno(), 65536)
        if kill_after and not fired and kill_after.encode() in out:
            time.sleep(delay)
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)  # the sweep and every Ray process it started
            else:
                proc.send_signal(sig)
            fired = True
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"sweep did not finish in {timeout} s:\n{out.decode(errors='replace')[-3000:]}")
    out += proc.stdout.read() or b""
    if sig == signal.SIGINT and fired:
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes left behind, if any
        except ProcessLookupError:
            pass
    return proc.returncode, out.decode(errors="replace"), fired


def config_of(cfg: Path) -> Dict:
    return yaml.safe_load(cfg.read_text())


def results(tracking_uri: str, name: str) -> Dict[str, Tuple]:
    """``{detector: (selected hyperparameters, trials, {metric: value})}`` of the newest finished sweep;
    every metric of the results table (validation, per test set, near / far, ID accuracy), rounded to
    10 digits."""
    from orchestrator.results import latest_rows

    out = {}
    for r in latest_rows(tracking_uri, name):
        metrics = {k: round(float(v), 10) for k, v in r.items()
                   if k.startswith(("val_", "test/", "near/", "far/")) or k == "id_accuracy"}
        out[r["detector"]] = (r["selected"], int(r["trials"]), metrics)
    return out


def results_of(cfg: Path) -> Dict[str, Tuple]:
    raw = config_of(cfg)
    return results(raw["tracking_uri"], raw["name"])


def run_counts(tracking_uri: str, name: str):
    """``({stage tag: number of runs}, runs)`` of an experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    counts: Dict[str, int] = {}
    for r in runs:
        stage = r.data.tags.get("stage")
        counts[stage] = counts.get(stage, 0) + 1
    return counts, runs


def run_counts_of(cfg: Path):
    raw = config_of(cfg)
    return run_counts(raw["tracking_uri"], raw["name"])
