"""Kill-and-resume: a sweep killed (SIGKILL, SIGINT) at several points and started again with the
same command finishes with the results of an uninterrupted run and without duplicated MLflow runs."""
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def _config(dirpath: Path) -> Path:
    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    raw["name"] = "resume"
    raw["storage"] = str(dirpath / "store")
    raw["tracking_uri"] = f"sqlite:///{dirpath / 'mlflow.db'}"
    raw["backbones"][0]["train"]["epochs"] = 4
    raw["detectors"] = [
        {"type": "MaxSoftmax", "search": {"t": {"grid": [1, 2, 5, 10, 100, 1000]}}},
        {"type": "KNN", "search": {"k": {"grid": [1, 5, 10, 20]}}},
        {"type": "Mahalanobis"},
    ]
    path = dirpath / "resume.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep(cfg: Path, kill_after: str = None, sig=signal.SIGKILL, delay: float = 0.0, timeout: float = 400):
    """Run the sweep CLI; with ``kill_after``, send ``sig`` once that text appears on stdout."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(cfg)], cwd=cfg.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
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


def _results(cfg: Path):
    from orchestrator.results import latest_rows

    raw = yaml.safe_load(cfg.read_text())
    rows = latest_rows(raw["tracking_uri"], raw["name"])
    return {(r["detector"]): (r["selected"], round(r["near/auroc"], 10), round(r["far/fpr95"], 10)) for r in rows}


def _run_counts(cfg: Path):
    raw = yaml.safe_load(cfg.read_text())
    client = MlflowClient(raw["tracking_uri"])
    exp = client.get_experiment_by_name(raw["name"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    counts = {}
    for r in runs:
        counts[r.data.tags.get("stage")] = counts.get(r.data.tags.get("stage"), 0) + 1
    return counts, runs


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("clean"))
    code, out, _ = _sweep(cfg)
    assert code == 0, out[-3000:]
    return _results(cfg)


EXPECTED = {"sweep": 1, "train": 1, "detector": 3, "trial": 6 + 4 + 1}


def test_sigkill_during_search_then_resume(clean, tmp_path):
    cfg = _config(tmp_path)
    code, out, fired = _sweep(cfg, kill_after="[search]", delay=3.0)
    assert fired and code != 0, out[-2000:]
    code, out, _ = _sweep(cfg)
    assert code == 0, out[-3000:]
    assert "resuming the interrupted sweep run" in out
    assert _results(cfg) == clean
    counts, runs = _run_counts(cfg)
    assert counts == EXPECTED, counts
    assert all(r.info.status == "FINISHED" for r in runs)


def test_ctrl_c_during_training_stops_cleanly_and_says_how_to_resume(clean, tmp_path):
    cfg = _config(tmp_path)
    code, out, fired = _sweep(cfg, kill_after="[train]", sig=signal.SIGINT, delay=1.0)
    assert fired
    assert code == 130, out[:1500] + "\n...\n" + out[-2500:]
    assert "run the same command again to resume" in out
    assert "Traceback" not in out
    code, out, _ = _sweep(cfg)
    assert code == 0, out[-3000:]
    assert _results(cfg) == clean
    counts, _ = _run_counts(cfg)
    assert counts == EXPECTED, counts


def test_a_swallowed_ctrl_c_still_stops_the_sweep_at_the_next_boundary():
    """SIGINT raised inside code that swallows KeyboardInterrupt (a destructor, a catch-all handler)
    is remembered, and the next stage boundary raises it again."""
    import signal as _signal

    from orchestrator.interrupts import latched_sigint, raise_if_interrupted

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with latched_sigint():
            try:
                _signal.raise_signal(_signal.SIGINT)
            except BaseException:  # noqa: BLE001 - a library swallowing it
                pass
            reached.append("after")
            raise_if_interrupted()
            reached.append("never")
    assert reached == ["after"]
    raise_if_interrupted()  # nothing stays latched once the block is left
