"""The shipped OpenOOD sweeps end to end on a fake OpenOOD data root (issue 13's "done when").

For each benchmark: a fake data root in OpenOOD's layout (every list of the benchmark, a few small PNG/JPEG files
per list, the ID train list as long as the sweep's largest KNN ``k``), OpenOOD-named checkpoints s0/s1/s2 with
random weights (ImageNet-1K: torchvision's ResNet-50 file in a private torch hub cache) and a leaderboard CSV in
OpenOOD's format; then ``python -m orchestrator sweep sweeps/openood_<bench>.yaml``, the shipped file unchanged,
run from a working directory holding ``results/`` and ``openood_leaderboard/`` with ``$OOD_SWEEP_DATA`` naming the
data root. Checks that the delta table was printed and that the sweep's MLflow run holds it (table, figure, our
CSV); prints the wall time and the table.

The shipped files ask for ``gpus_per_task: 1``; on a machine without a GPU, Ray is told it has one
(``RAY_OVERRIDE_RESOURCES``) so that the tasks are scheduled; they then run on the CPU (no CUDA device visible).
The random weights make the numbers meaningless: this proves the path, not the values.

    python benchmarks/openood_fake_root.py [cifar10 cifar100 imagenet200 imagenet1k] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openood_fake import fake_checkpoints, largest_knn_k, write_root  # noqa: E402

BENCHMARKS = ("cifar10", "cifar100", "imagenet200", "imagenet1k")
#: image size of the fake files: CIFAR's 32 px lists get small files, ImageNet's are resized 256 + crop 224
SIZES = {"cifar10": (40, 36), "cifar100": (36, 40), "imagenet200": (300, 260), "imagenet1k": (260, 300)}


def prepare(bench: str, work: Path) -> Path:
    """Data root, checkpoints and leaderboard for ``bench`` under ``work``; returns the shipped sweep file."""
    sweep = ROOT / "sweeps" / f"openood_{bench}.yaml"
    write_root(work / "data", bench, train_rows=largest_knn_k(sweep), per_list=4, size=SIZES[bench])
    fake_checkpoints(sweep, work, real=True, torch_home=work / "torch")
    return sweep


def environment(work: Path, sweep: Path) -> dict:
    import yaml

    env = dict(os.environ, OOD_SWEEP_DATA=str(work / "data"), TORCH_HOME=str(work / "torch"),
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # the shipped file's default: sqlite:///mlflow.db in the working directory
    env.pop("RAY_ADDRESS", None)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:  # the shipped files ask for a GPU per task; Ray schedules them on a pretended one, and on as
        # many pretended CPUs as a task asks for (else the tasks are infeasible and the sweep waits for ever)
        asked = yaml.safe_load(sweep.read_text()).get("resources", {}).get("cpus_per_task", 1)
        env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": max(4, os.cpu_count() or 1, int(asked)), "GPU": 1})
    return env


def run(bench: str, work: Path, timeout: float = 3600) -> dict:
    """Run the shipped sweep of ``bench`` in ``work``; raise AssertionError unless the delta table was printed and
    logged. Returns wall time, return code and the printed delta table."""
    work.mkdir(parents=True, exist_ok=True)
    sweep = prepare(bench, work)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(sweep)], cwd=work, env=environment(work, sweep),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    out = proc.stdout
    assert proc.returncode == 0, f"{bench}: sweep exited {proc.returncode}:\n{out[-4000:]}"
    lines = out.splitlines()
    head = next((i for i, l in enumerate(lines) if l.startswith("OpenOOD leaderboard (")), None)
    assert head is not None, f"{bench}: no delta table printed:\n{out[-4000:]}"
    table = []
    for line in lines[head:]:
        if not line.strip():
            break
        table.append(line)
    assert any(" MSP " in l for l in table), "\n".join(table)
    logged = logged_artifacts(work, f"openood_{bench}")
    missing = {"leaderboard_deltas.csv", "leaderboard_deltas.png", "leaderboard/ours.csv"} - logged
    assert not missing, f"{bench}: not logged on the sweep run: {sorted(missing)}"
    return {"benchmark": bench, "wall_s": wall, "table": "\n".join(table), "output": out}


def logged_artifacts(work: Path, experiment: str) -> set:
    """Artifact paths on the sweep's parent run (``stage`` tag ``sweep``) in ``work``'s MLflow store."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "sweep"][0]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    return names | {a.path for a in client.list_artifacts(parent.info.run_id, "leaderboard")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchmarks", nargs="*", default=list(BENCHMARKS), choices=BENCHMARKS)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="openood_fake_") as tmp:
        base = args.keep or Path(tmp)
        for bench in args.benchmarks:
            res = run(bench, base / bench)
            print(f"== {bench}: shipped sweep end to end in {res['wall_s']:.0f} s", flush=True)
            print(res["table"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
