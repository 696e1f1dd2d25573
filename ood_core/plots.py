"""Figures for OOD results (matplotlib, rendered with the Agg canvas).

Figures are built with :class:`matplotlib.figure.Figure` and an Agg canvas directly, not through
``pyplot``: nothing global is touched (no backend switch in a notebook, no figure registry to leak), and
the returned figure works with ``fig.savefig(...)`` and ``mlflow.log_figure``.
Scores are "higher = more OOD"; ROC curves treat OOD as the positive class.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from .metrics import as_numpy, auroc

__all__ = ["roc_figure", "score_histogram_figure", "per_layer_auroc_figure", "roc_grid_figure",
           "detector_comparison_figure", "exit_layer_figure"]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def roc_figure(id_scores, ood_scores: Mapping[str, object], title: str = "ROC") -> Figure:
    """One ROC curve (OOD positive) per OOD set against the ID scores; the legend gives each AUROC."""
    s_id = as_numpy(id_scores).reshape(-1)
    fig = _figure(5.0, 4.5)
    ax = fig.add_subplot()
    for name, s in ood_scores.items():
        s_ood = as_numpy(s).reshape(-1)
        y = np.r_[np.zeros(s_id.size), np.ones(s_ood.size)]
        fpr, tpr, _ = roc_curve(y, np.r_[s_id, s_ood])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {auroc(s_id, s_ood):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (ID flagged as OOD)",
           ylabel="true positive rate (OOD detected)", title=title)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def score_histogram_figure(id_scores, ood_scores: Mapping[str, object], title: str = "Scores",
                           bins: int = 60) -> Figure:
    """Density histograms of the ID scores and of each OOD set on shared bins; AUROC in the legend."""
    s_id = as_numpy(id_scores).reshape(-1)
    all_s = [s_id] + [as_numpy(s).reshape(-1) for s in ood_scores.values()]
    lo = min(float(a.min()) for a in all_s if a.size)
    hi = max(float(a.max()) for a in all_s if a.size)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    ax.hist(s_id, bins=edges, density=True, alpha=0.55, color="tab:blue", label=f"ID (n={s_id.size})")
    for name, s in ood_scores.items():
        s_ood = as_numpy(s).reshape(-1)
        ax.hist(s_ood, bins=edges, density=True, alpha=0.45, histtype="stepfilled",
                label=f"{name} (AUROC {auroc(s_id, s_ood):.3f})")
    ax.set(xlabel="score (higher = more OOD)", ylabel="density", title=title)
    ax.legend(fontsize="small")
    return fig


def per_layer_auroc_figure(layer_names: Sequence[str], aurocs: Sequence[float], final_auroc: Optional[float],
                           title: str = "AUROC per layer") -> Figure:
    """Bar chart of one AUROC per layer in network order (LIR, Guglielmo & Masana 2025, Fig. 2 style).

    The final layer's AUROC is drawn as a dotted line; bars that beat it are green, the others grey.
    """
    names = list(layer_names)
    vals = np.asarray(list(aurocs), dtype=float)
    if len(names) != vals.size:
        raise ValueError(f"{len(names)} layer names but {vals.size} AUROC values")
    better = vals > final_auroc if final_auroc is not None else np.zeros(vals.size, bool)
    fig = _figure(max(6.0, 0.28 * len(names) + 1.5), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, vals, color=np.where(better, "tab:green", "tab:grey"), width=0.8)
    if final_auroc is not None:
        ax.axhline(final_auroc, ls=":", color="black", lw=1.5, label=f"final layer ({final_auroc:.3f})")
        ax.legend(loc="lower right", fontsize="small")
    ax.set_xticks(x, names, rotation=90, fontsize=7 if len(names) > 30 else 9)
    lo = float(np.nanmin(np.r_[vals, final_auroc if final_auroc is not None else np.nan])) if vals.size else 0.0
    ax.set(ylim=(max(0.0, min(0.5, lo - 0.05)), 1.0), ylabel="AUROC", title=title, xlim=(-0.6, len(names) - 0.4))
    return fig


def roc_grid_figure(panels: Mapping[str, tuple], title: str = "ROC curves") -> Figure:
    """One ROC panel per detector: ``panels[name] = (id_scores, {ood set: scores})``; AUROC in each legend."""
    names = list(panels)
    cols = min(4, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig = _figure(3.6 * cols, 3.3 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        id_scores, ood_scores = panels[name]
        s_id = as_numpy(id_scores).reshape(-1)
        for set_name, s in ood_scores.items():
            s_ood = as_numpy(s).reshape(-1)
            fpr, tpr, _ = roc_curve(np.r_[np.zeros(s_id.size), np.ones(s_ood.size)], np.r_[s_id, s_ood])
            ax.plot(fpr, tpr, lw=1.2, label=f"{set_name} ({auroc(s_id, s_ood):.3f})")
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), title=name, xlabel="FPR (ID)", ylabel="TPR (OOD)")
        ax.legend(loc="lower right", fontsize="x-small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def detector_comparison_figure(rows: Sequence[Mapping], groups: Sequence[str] = ("near", "far"),
                               metric: str = "auroc") -> Figure:
    """Grouped bars: per detector (rows ``{"detector", "<group>/<metric>"}``; several seeds are
    averaged, their spread drawn as error bars) the test metric of each OOD group."""
    by_det: dict = {}
    for row in rows:
        for g in groups:
            v = row.get(f"{g}/{metric}")
            if v is not None:
                by_det.setdefault(row["detector"], {}).setdefault(g, []).append(float(v))
    names = list(by_det)
    fig = _figure(max(6.0, 0.55 * len(names) + 2.0), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    width = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        vals = [by_det[n].get(g, [np.nan]) for n in names]
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, [np.mean(v) for v in vals], width,
               yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals], label=f"{g} OOD", capsize=2)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel=f"test {metric.upper()}", title=f"Selected detectors: test {metric.upper()} per OOD group",
           ylim=(0.0, 1.0) if metric != "fpr95" else None)
    ax.legend(fontsize="small")
    return fig


def exit_layer_figure(exits: Mapping[str, object], layer_names: Sequence[str], title: str = "Exit layer") -> Figure:
    """Early exit: for each data set, the fraction of samples that stopped at each layer; the legend gives
    the mean number of layers used (``1 - mean/L`` of the per-layer work is saved)."""
    names = list(layer_names)
    n_layers = max(len(names), 1 + max(int(np.max(as_numpy(e))) for e in exits.values() if as_numpy(e).size))
    names = names + [f"layer {i}" for i in range(len(names), n_layers)]
    fig = _figure(max(6.0, 0.9 * n_layers + 2.0), 4.0)
    ax = fig.add_subplot()
    x = np.arange(n_layers)
    width = 0.8 / max(1, len(exits))
    for i, (set_name, e) in enumerate(exits.items()):
        e = as_numpy(e).astype(int).reshape(-1)
        frac = np.bincount(e, minlength=n_layers)[:n_layers] / max(1, e.size)
        ax.bar(x + (i - (len(exits) - 1) / 2) * width, frac, width,
               label=f"{set_name} ({float((e + 1).mean()):.2f} layers)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="fraction of samples exiting", ylim=(0, 1), title=title)
    ax.legend(fontsize="x-small")
    return fig
