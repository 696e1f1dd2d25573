"""Figures and tables a sweep logs to MLflow (built by ``ood_core.plots``, from task results)."""
from __future__ import annotations

from typing import Dict, Sequence

from orchestrator.tracking import Tracker


def log_detector_figures(tracker: Tracker, run_id: str, title: str, scores: Dict) -> None:
    """ROC curves and score histograms of a selected detector on ID test vs every OOD test set."""
    from ood_core.plots import roc_figure, score_histogram_figure

    ood = {k: v for k, v in scores.items() if k != "id-test"}
    tracker.log_figure(run_id, lambda: roc_figure(scores["id-test"], ood, title), "roc.png")
    tracker.log_figure(run_id, lambda: score_histogram_figure(scores["id-test"], ood, title), "scores.png")


def log_exit_figures(tracker: Tracker, run_id: str, label: str, layers: Sequence[str], scores_uri: str) -> None:
    """Early-exit detectors: where samples stopped, layers used on average and compute saved, per set."""
    from ood_core.plots import exit_layer_figure
    from tasks.evaluate import load_exits

    exits = load_exits(scores_uri)
    if not exits:
        return
    layers = list(layers)
    metrics = {}
    for name, e in exits.items():
        used = float((e + 1).mean())
        metrics[f"layers_used/{name}"] = used
        metrics[f"compute_saved/{name}"] = 1.0 - used / max(1, len(layers))
    tracker.log(run_id, metrics=metrics)
    tracker.log_figure(run_id, lambda: exit_layer_figure(exits, layers, f"{label}: exit layer per sample"),
                       "exit_layers.png")


def log_roc_grids(tracker: Tracker, parent: str, panels: Dict[str, Dict]) -> None:
    """One figure per backbone with a ROC panel per selected detector."""
    from ood_core.plots import roc_grid_figure

    for bb_label, by_det in panels.items():
        tracker.log_figure(parent, lambda by_det=by_det, bb_label=bb_label: roc_grid_figure(
            by_det, f"ROC curves of the selected detectors ({bb_label})"), f"roc_{bb_label}.png")


def log_layer_analysis(tracker: Tracker, parent: str, plan) -> None:
    """Per-layer energy AUROC (Guglielmo & Masana, CVWW 2025) of every backbone with ``*.energy`` columns: table + bar charts."""
    import pandas as pd

    from ood_core.plots import beats_final_layer, per_layer_auroc_figure
    from tasks.analysis import per_layer_analysis

    for bb in plan.backbones:
        energy = [c for c in bb.columns if c.endswith(".energy")]
        if not energy:
            continue
        sets = {f.dataset.label: {"uri": f.uri, "role": f.dataset.role} for f in bb.features}
        rows = per_layer_analysis(sets, energy)
        tracker.log_table(parent, pd.DataFrame(rows), f"per_layer_{bb.label}")
        final = rows[-1]
        for key in [k for k in rows[0] if k.startswith("auroc/")]:
            ood = key.split("/", 1)[1]
            tracker.log_figure(parent, lambda rows=rows, key=key, final=final, title=f"{bb.label} vs {ood}": (
                per_layer_auroc_figure([r["layer"] for r in rows[:-1]], [r[key] for r in rows[:-1]], final[key],
                                       f"{title}: energy AUROC per layer")), f"per_layer/{bb.label}_{ood}.png")
        better = [r["layer"] for r in rows[:-1]
                  if any(beats_final_layer(r[k], final[k]) for k in r if k.startswith("auroc/"))]
        print(f"[layers] {bb.label}: {len(rows) - 1} layers analysed; better than the final layer and than chance "
              f"on some OOD set: {', '.join(better) or 'none'}", flush=True)


def log_collapse_curves(tracker: Tracker, run_id: str, title: str, history: Sequence[Dict]) -> bool:
    """NC1-NC4 over the epochs of a training run (``neural_collapse.png``); False when its history has none."""
    from ood_core.plots import neural_collapse_figure

    if not any("nc1" in row for row in history):
        return False
    tracker.log_figure(run_id, lambda: neural_collapse_figure(history, f"{title}: neural collapse"),
                       "neural_collapse.png")
    return True
