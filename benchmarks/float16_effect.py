"""What float16 feature storage (``extract: {dtype: float16}``) does to the scores: every detector that reads
cached features, fitted and scored on a real sweep's features as stored (float32) and rounded to float16.

    python benchmarks/float16_effect.py [sweeps/quickstart.yaml]

Runs the sweep file (its own storage, ``.ood_sweep/float16-bench``; cached stages reused), then, for each
backbone, every registered detector whose representation is ``logits``, ``features`` or ``layers`` with its
default hyperparameters (several-layer detectors: every extracted layer but the logits) through the evaluation protocol (fit on ID train, validation-time choices, scores of the
test sets) twice: on the float32 features and on the same features rounded to float16 (what a float16 file
stores; read back as float32). Prints per detector the AUROC (ID test against the near and the far sets, mean
per group) on both, the largest change in AUROC points, and the Spearman correlation of the two score vectors.
A measurement, not a test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "sweeps" / "quickstart.yaml"))
    parser.add_argument("--storage", type=Path, default=ROOT / ".ood_sweep" / "float16-bench")
    args = parser.parse_args(argv)
    import torch
    import yaml
    from scipy.stats import spearmanr

    from ood_core.detectors.registry import REGISTRY, build_detector, detector_params
    from ood_core.evaluation import EvalSet, run_protocol
    from ood_core.feature_store import read_features
    from ood_core.metrics import ood_metrics
    from orchestrator.config import parse_config
    from orchestrator.plan import make_plan
    from tasks.evaluate import GROUPS

    raw = yaml.safe_load(Path(args.config).read_text())
    raw.update(storage=str(args.storage), tracking_uri=f"sqlite:///{args.storage / 'mlflow.db'}")
    args.storage.mkdir(parents=True, exist_ok=True)
    config = args.storage / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    rc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(config)], cwd=ROOT,
                        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}).returncode
    if rc:
        print(f"the sweep exited {rc}")
        return rc
    plan = make_plan(parse_config(raw))
    for bb in plan.backbones:
        from tasks.runtime import load_backbone
        from orchestrator.sweep import _bb_dict

        model = load_backbone(_bb_dict(bb), plan.num_classes, plan.input_format)
        head = (model.head.weight.detach(), model.head.bias.detach())
        sets = {f.dataset.label: (f.dataset.role, read_features(f.uri)) for f in bb.features}
        print(f"\n{bb.label}: {', '.join(f'{k} ({v[0]}, {len(v[1])} rows)' for k, v in sets.items())}")
        print(f"{'detector':<22}{'near f32':>10}{'near f16':>10}{'far f32':>10}{'far f16':>10}{'max |d|':>9}"
              f"{'rho':>9}")
        worst = 0.0
        for name, spec in sorted(REGISTRY.items()):
            if spec.representation not in ("logits", "features", "layers") or spec.needs_outliers:
                continue
            results = {}
            try:
                for dtype in ("float32", "float16"):
                    eval_sets = {}
                    for label, (role, fs) in sets.items():
                        # what a float16 file holds: vectors rounded to float16, per-sample scalars float32
                        cols = {c: torch.from_numpy(v if dtype == "float32" or v.ndim == 1
                                                    else v.astype(np.float16).astype(np.float32))
                                for c, v in fs.columns.items()}
                        cols["features"] = cols["penultimate"]
                        eval_sets[label] = EvalSet(role, cols, torch.from_numpy(fs.labels))
                    layers = [c for c in bb.columns if c != "logits"]  # several-layer detectors: every layer
                    params = {"layers": layers} if "layers" in detector_params(name) else {}
                    det = build_detector(name, params, head=head)
                    scored = run_protocol(det, eval_sets)
                    results[dtype] = {label: s.scores for label, s in scored.items()}
            except Exception as exc:  # noqa: BLE001 - a detector that needs other inputs: said, skipped
                print(f"{name:<22}skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                continue
            aurocs: Dict[str, Dict[str, float]] = {}
            for dtype, scores in results.items():
                test = next(l for l, (r, _) in sets.items() if r == "id_test")
                aurocs[dtype] = {g: 100 * float(np.mean([ood_metrics(scores[test], scores[l])["auroc"]
                                                         for l, (r, _) in sets.items() if r == g]))
                                 for g in GROUPS}
            delta = max(abs(aurocs["float32"][g] - aurocs["float16"][g]) for g in GROUPS)
            worst = max(worst, delta)
            a = np.concatenate([results["float32"][l] for l in sorted(results["float32"])])
            b = np.concatenate([results["float16"][l] for l in sorted(results["float16"])])
            rho = spearmanr(a, b).statistic
            print(f"{name:<22}{aurocs['float32']['near']:>10.2f}{aurocs['float16']['near']:>10.2f}"
                  f"{aurocs['float32']['far']:>10.2f}{aurocs['float16']['far']:>10.2f}{delta:>9.3f}{rho:>9.5f}")
        print(f"largest change in AUROC points: {worst:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
