"""ImageNet-1K scale: the search stage on a synthetic feature store of N = 100k, 300k and 1.28M training rows.

    python benchmarks/scale.py            # N = 100,000, 300,000, 1,281,167 (ImageNet-1K's training set)
    python benchmarks/scale.py --quick    # N = 20,000 and 60,000
    python benchmarks/scale.py --sizes 100000 --concurrency 1

The store: 1,000 classes, ResNet-50-sized penultimate features (2,048, non-negative: ReLU of class means plus
noise) and logits of 1,000 through a head built from the class means, written by the feature store in float16
(``--dtype``) like a sweep's ``extract: {dtype: float16}``: ID train N rows; ID val, OOD val, ID test, near and far
OOD 2,000 rows each (near: new classes drawn like the ID ones; far: unstructured activations). A ResNet-50
checkpoint carries the head, as a sweep's backbone would. Made once per (N, dtype) under
``.ood_sweep/scale-bench``.

The search: the sweep's own ``orchestrator.search.run_search`` with ``tasks.evaluate.tune_trial`` (Ray Tune,
``reuse_actors``, the trials read the node's one mapped copy of each file) over Mahalanobis, RMD, ViM
(d in {256, 512, 1000}), KNN (k in {50, 100, 200}, exact search of a bank of alpha = 1% of the rows, OpenOOD's
fraction for NNGuide: a whole bank would be a float32 copy of the training set in each trial process), ReAct (percentile in {85, 90, 95, 99}) and EnergyBased: 13 trials, validation scored, at
``max_concurrent_trials`` 1 and 2. Tune's floor: a trivial trainable over as many trials at the same concurrency.

Printed per (N, concurrency): the search's wall time, the time to decode the store's Parquet files into the
node's mapped copy (once per machine, before the search), peak memory of the Ray workers (the sum of their PSS,
proportional set size, so pages shared by several workers count once; sampled every 0.2 s), one copy of the
features the trials read (the decoded files), the ratio of the two, and the search's time per trial above the
floor. The floor's workers import what a trial imports (torch, the detectors), so its peak memory is the workers'
own (Python, torch, Ray: ~0.7 GiB each here, whatever N is); the search's peak above it is what the copy and
the fits add. Targets: time linear in N (time per training row at the largest N within 1.5x of the smallest),
peak memory above the floor <= 2x one copy at every N and within 1.25x between concurrency 1 and 2 (the raw
peak / copy is printed too), <= 0.2 s per trial above the floor. Exit 1 when one is missed. A benchmark: not
part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

C, D, SMALL = 1000, 2048, 2000
FULL = 1_281_167
FORMAT = {"channels": 3, "image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SETS = {  # label -> (role, rows or None for N, kind, seed)
    "id-train": ("id_train", None, "id", 1),
    "id-val": ("id_val", SMALL, "id", 2),
    "ood-val": ("ood_val", SMALL, "near", 3),
    "id-test": ("id_test", SMALL, "id", 4),
    "near": ("near", SMALL, "near", 5),
    "far": ("far", SMALL, "far", 6),
}


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _table(headers: List[str], rows: List[List]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# -- the synthetic store ----------------------------------------------------------------------------------------
def _class_means(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.2, 0.5, size=(C, D))).astype(np.float32)


def _head(means: np.ndarray):
    centred = means - means.mean(axis=0)
    w = centred / np.linalg.norm(centred, axis=1, keepdims=True) * 2.0
    return w.astype(np.float32), np.zeros(C, np.float32)


def _rows(kind: str, n: int, seed: int, means: np.ndarray, near_means: np.ndarray, chunk: int = 32768):
    """``(labels, features)`` chunks: ReLU(class mean + noise), or unstructured activations for ``far``."""
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        labels = rng.integers(0, C, k)
        noise = rng.standard_normal((k, D), dtype=np.float32)
        if kind == "far":
            z = noise * 1.5 + 0.3
            labels = np.full(k, -1)
        else:
            z = (means if kind == "id" else near_means)[labels] + noise * 0.9
            if kind != "id":
                labels = np.full(k, -1)
        np.maximum(z, 0, out=z)
        yield labels, z


def make_store(folder: Path, n: int, dtype: str) -> Dict[str, str]:
    """Write the store (once); returns ``{set label: uri}`` and the checkpoint under ``"checkpoint"``."""
    import torch

    from ood_core.checkpoints import save_checkpoint
    from ood_core.feature_store import FeatureWriter
    from ood_core.models import build_model

    done = folder / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    means, near_means = _class_means(0), _class_means(99)
    w, b = _head(means)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    out = {}
    t0 = time.perf_counter()
    for label, (role, rows, kind, seed) in SETS.items():
        rows = n if rows is None else rows
        uri = str(folder / f"{label}.parquet")
        meta = {"backbone_key": "scale", "dataset": label, "split": role, "role": role}
        with FeatureWriter(uri, meta, {"penultimate": {"layer": "penultimate"}, "logits": {"layer": "logits"}},
                           record_hash=True, dtype=dtype) as writer:
            start = 0
            for labels, z in _rows(kind, rows, seed * 1000 + n % 997, means, near_means):
                logits = torch.addmm(bt, torch.from_numpy(z), wt.T).numpy()
                writer.write(np.arange(start, start + len(labels)), labels, {"penultimate": z, "logits": logits})
                start += len(labels)
        out[label] = uri
        _say(f"  wrote {label}: {rows:,} rows ({time.perf_counter() - t0:.0f} s)")
    model = build_model("resnet50_imagenet", num_classes=C, in_channels=3, image_size=224, load_weights=False)
    with torch.no_grad():
        model.head.weight.copy_(wt)
        model.head.bias.copy_(bt)
    out["checkpoint"] = str(folder / "resnet50.pt")
    save_checkpoint(out["checkpoint"], model, {"arch": "resnet50_imagenet", "note": "scale benchmark head"})
    done.write_text(json.dumps(out))
    return out


# -- the search -------------------------------------------------------------------------------------------------
def detectors(n: int) -> List[Dict]:
    alpha = 0.01  # OpenOOD's bank fraction for NNGuide; a whole bank is one float32 copy in each trial process
    return [
        {"type": "Mahalanobis", "search": {}},
        {"type": "RMD", "search": {}},
        {"type": "ViM", "search": {"d": {"grid": [256, 512, 1000]}}},
        {"type": "KNN", "params": {"alpha": alpha}, "search": {"k": {"grid": [50, 100, 200]}}},
        {"type": "ReAct", "search": {"percentile": {"grid": [85, 90, 95, 99]}}},
        {"type": "EnergyBased", "search": {}},
    ]


def contexts_and_entries(store: Dict[str, str], n: int):
    backbone = {"key": f"scale-{n}", "label": "resnet50-synthetic", "arch": "resnet50_imagenet", "params": {},
                "train": {}, "seed": 0, "checkpoint_uri": store["checkpoint"], "checkpoint": None}
    sets = {label: {"uri": store[label], "role": role, "dataset": {"label": label}}
            for label, (role, _rows, _kind, _seed) in SETS.items()}
    contexts, entries = {}, []
    for det in detectors(n):
        key = f"{backbone['label']}/{det['type']}"
        contexts[key] = {"detector": det["type"], "fixed": det.get("params", {}), "columns": ["logits", "penultimate"],
                         "backbone": backbone, "num_classes": C, "format": FORMAT, "sets": sets, "outliers": [],
                         "batch_size": 256, "score_test_every_trial": False, "fit_on": "train"}
        entries.append({"key": key, "search": det["search"], "num_samples": 1,
                        "tags": {"backbone": backbone["label"], "detector": det["type"]}})
    # the sweep's order: no search right after one whose fit shares a training statistic with it
    from ood_core.detectors.registry import get_spec
    from orchestrator.search import spread_shared_statistics

    return contexts, spread_shared_statistics(entries, lambda e: get_spec(e["tags"]["detector"]).cls.shared_statistics)


def _floor_trainable(config):
    """Tune's floor: a trial that reports at once, in a worker that imports what a real trial imports (torch, the
    detectors, the trial's task), so that its memory is the workers' own, without data or fits."""
    import importlib

    from ray import tune

    for module in ("ood_core.detectors.registry", "tasks.evaluate"):
        importlib.import_module(module)
    tune.report({"val_auroc": 0.5})


class WorkerMemory:
    """Peak of the summed PSS of this Ray instance's worker processes."""

    @staticmethod
    def _pss(pid: str) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def __init__(self, period: float = 0.2):
        from ray._private import worker

        self.raylet = str(worker._global_node.all_processes["raylet"][0].process.pid)
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _workers(self) -> List[str]:
        """The worker processes of this Ray instance: the descendants of its raylet."""
        parent = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        parent[pid] = f.read().rsplit(")", 1)[1].split()[1]
                except OSError:
                    continue
        out = []
        for pid in parent:
            p, seen = parent.get(pid), 0
            while p and p != "0" and seen < 20:
                if p == self.raylet:
                    out.append(pid)
                    break
                p, seen = parent.get(p), seen + 1
        return out

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._pss(p) for p in self._workers()))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one(store: Dict[str, str], n: int, concurrency: int, work: Path) -> Dict:
    from ray import tune

    from ood_core import feature_map
    from orchestrator.search import entry_variants, run_search
    from tasks.evaluate import tune_trial

    contexts, entries = contexts_and_entries(store, n)
    # the node's mapped copies: made once, before the search (timed on their own)
    cache = Path(os.environ["OOD_SWEEP_FEATURE_CACHE"])
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    fs = [feature_map.map_features(store[label], ["logits", "penultimate"]) for label in SETS]
    decode_s = time.perf_counter() - t0
    copy_bytes = sum(a.nbytes for f in fs for a in [*f.columns.values(), f.labels, f.index])
    del fs
    feature_map._MAPPED.clear()
    trials = sum(len(entry_variants(e["search"], 1, 0, e["key"])) for e in entries)
    # the floor first, on fresh workers (a Ray instance of its own per run): its memory is that of workers that
    # hold the trial's code and no data
    space = {"entry": tune.grid_search(list(range(trials)))}
    with WorkerMemory() as floor_mem:
        t0 = time.perf_counter()
        tune.Tuner(tune.with_resources(_floor_trainable, {"cpu": 1}), param_space=space,
                   tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=concurrency),
                   run_config=tune.RunConfig(name=f"floor-{time.time_ns()}", storage_path=str(work / "tune"),
                                             verbose=0)).fit()
        floor_s = time.perf_counter() - t0
    with WorkerMemory() as mem:
        t0 = time.perf_counter()
        results = run_search(tune_trial, contexts, entries, metric="auroc", mode="max", max_concurrent=concurrency,
                             storage_path=str(work / "tune"), name=f"scale-{n}-c{concurrency}-{time.time_ns()}",
                             resources={"cpu": 1, "gpu": 0}, seed=0)
        search_s = time.perf_counter() - t0
    errors = [r.metrics.get("trial_error") or str(r.error) for rs in results.values() for r in rs
              if r.error or r.metrics.get("trial_error")]
    best = {k.split("/")[1]: max(r.metrics.get("val_auroc", float("nan")) for r in rs) for k, rs in results.items()}
    per_trial = {k.split("/")[1]: float(np.mean([r.metrics.get("time_this_iter_s", float("nan")) for r in rs]))
                 for k, rs in results.items()}
    return {"n": n, "concurrency": concurrency, "trials": trials, "search_s": search_s, "decode_s": decode_s,
            "floor_s": floor_s, "peak_bytes": mem.peak, "floor_bytes": floor_mem.peak, "copy_bytes": copy_bytes,
            "errors": errors, "best": best, "per_trial": per_trial}


def _above(r: Dict) -> int:
    """Peak memory above the workers' floor: what the search adds to workers that hold only their code."""
    return max(r["peak_bytes"] - r["floor_bytes"], 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 20,000 and 60,000")
    parser.add_argument("--sizes", type=int, nargs="*")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--store", type=Path, default=ROOT / ".ood_sweep" / "scale-bench")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([20_000, 60_000] if args.quick else [100_000, 300_000, FULL])
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    os.environ["OOD_SWEEP_FEATURE_CACHE"] = str(work / "features")
    import ray

    _say(f"scale benchmark: N = {', '.join(f'{n:,}' for n in sizes)}, {args.dtype}, concurrency "
         f"{args.concurrency}; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    stores = {}
    for n in sizes:
        _say(f"store N = {n:,}")
        stores[n] = make_store(args.store / f"{n}-{args.dtype}", n, args.dtype)
    rows = []
    try:
        for n in sizes:
            for c in args.concurrency:
                _say(f"search N = {n:,}, {c} at a time")
                ray.init(address="local", num_cpus=max(args.concurrency), include_dashboard=False,
                         logging_level="ERROR")
                try:
                    r = run_one(stores[n], n, c, work)
                finally:
                    ray.shutdown()
                _say(f"  {json.dumps({k: v for k, v in r.items() if k not in ('best', 'per_trial')})}")
                _say(f"  mean trial seconds: {json.dumps({k: round(v, 2) for k, v in r['per_trial'].items()})}")
                _say(f"  best val AUROC: {json.dumps({k: round(v, 4) for k, v in r['best'].items()})}")
                rows.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [[f"{r['n']:,}", r["concurrency"], r["trials"], f"{r['decode_s']:.1f}", f"{r['search_s']:.1f}",
              f"{r['floor_s']:.1f}", f"{(r['search_s'] - r['floor_s']) / r['trials']:.2f}",
              f"{r['peak_bytes'] / 2**30:.2f}", f"{r['floor_bytes'] / 2**30:.2f}", f"{r['copy_bytes'] / 2**30:.2f}",
              f"{r['peak_bytes'] / r['copy_bytes']:.2f}", f"{_above(r) / r['copy_bytes']:.2f}"] for r in rows]
    _say()
    _say(_table(["N", "at a time", "trials", "decode s", "search s", "floor s", "s/trial above floor",
                 "peak GiB", "floor GiB", "copy GiB", "peak/copy", "(peak-floor)/copy"], table))
    failures = []
    for r in rows:
        if r["errors"]:
            failures.append(f"N={r['n']}: failed trials {r['errors'][:3]}")
        if _above(r) > 2 * r["copy_bytes"]:
            failures.append(f"N={r['n']} c={r['concurrency']}: peak memory above the workers' floor "
                            f"{_above(r) / r['copy_bytes']:.2f}x one copy")
        if (r["search_s"] - r["floor_s"]) / r["trials"] > 0.2:
            failures.append(f"N={r['n']} c={r['concurrency']}: {(r['search_s'] - r['floor_s']) / r['trials']:.2f} s "
                            "per trial above the floor")
    for c in args.concurrency:
        mine = [r for r in rows if r["concurrency"] == c]
        if len(mine) > 1:
            per_row = [r["search_s"] / r["n"] for r in mine]
            if per_row[-1] > 1.5 * per_row[0]:
                failures.append(f"c={c}: time per row at N={mine[-1]['n']} is {per_row[-1] / per_row[0]:.2f}x "
                                f"that at N={mine[0]['n']}")
    for n in sizes:
        peaks = [_above(r) for r in rows if r["n"] == n]
        if len(peaks) > 1 and max(peaks) > 1.25 * min(peaks):
            failures.append(f"N={n}: peak memory moves {max(peaks) / min(peaks):.2f}x with concurrency")
    _say("\n".join(["", "targets: " + ("all met" if not failures else "MISSED"), *failures]))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
