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

__all__ = ["roc_figure", "score_histogram_figure", "per_layer_auroc_figure", "beats_final_layer", "roc_grid_figure",
           "detector_comparison_figure", "backbone_comparison_figure", "exit_layer_figure", "delta_bars_figure", "neural_collapse_figure",
           "ID_COLOUR", "OOD_COLOURS"]


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


#: ID is always drawn in this colour; OOD sets in the others, in order (never ID's)
ID_COLOUR = "tab:blue"
OOD_COLOURS = ("tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
               "tab:green", "tab:gray")


def _central_range(*arrays: np.ndarray, tail: float = 0.5) -> tuple:
    """The range holding the central ``100 - 2 * tail`` percent of each array (the union over arrays)."""
    lo = min(float(np.percentile(a, tail)) for a in arrays if a.size)
    hi = max(float(np.percentile(a, 100 - tail)) for a in arrays if a.size)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _density(ax, values: np.ndarray, edges: np.ndarray, colour: str, label: str, alpha: float) -> int:
    """Histogram of ``values`` inside ``edges`` as a density of the whole set (the mass shown is the fraction
    of the set inside the range); returns how many fall outside."""
    inside = values[(values >= edges[0]) & (values <= edges[-1])]
    width = edges[1] - edges[0]
    outside = values.size - inside.size
    if outside:
        label = f"{label}, {outside} outside"
    ax.hist(inside, bins=edges, weights=np.full(inside.size, 1.0 / (max(values.size, 1) * width)),
            color=colour, alpha=alpha, histtype="stepfilled", edgecolor=colour, label=label)
    return outside


def score_histogram_figure(id_scores, ood_scores: Mapping[str, object], title: str = "Scores",
                           bins: int = 50) -> Figure:
    """One panel per OOD set: the ID scores (always blue) against that set (a colour of its own), each panel on
    the range holding the central 99% of both (0.5th to 99.5th percentile; the legend counts the samples outside
    that range).
    A set whose scores lie orders of magnitude away (noise under Mahalanobis) then does not squeeze ID and the
    near-OOD set into one bar. AUROC of ID against the set in its legend."""
    s_id = as_numpy(id_scores).reshape(-1).astype(np.float64)
    names = list(ood_scores)
    cols = min(3, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig = _figure(4.3 * cols, 3.3 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i, (ax, name) in enumerate(zip(axes, names)):
        s_ood = as_numpy(ood_scores[name]).reshape(-1).astype(np.float64)
        lo, hi = _central_range(s_id, s_ood)
        edges = np.linspace(lo, hi, bins + 1)
        colour = OOD_COLOURS[i % len(OOD_COLOURS)]
        _density(ax, s_id, edges, ID_COLOUR, f"ID (n={s_id.size})", 0.5)
        _density(ax, s_ood, edges, colour, f"{name} (n={s_ood.size}, AUROC {auroc(s_id, s_ood):.3f})", 0.45)
        ax.set(xlim=(lo, hi), xlabel="score (higher = more OOD)", ylabel="density", title=f"ID vs {name}")
        ax.legend(fontsize="x-small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def per_layer_auroc_figure(layer_names: Sequence[str], aurocs: Sequence[float], final_auroc: Optional[float],
                           title: str = "AUROC per layer") -> Figure:
    """Bar chart of one AUROC per layer in network order (Guglielmo & Masana, CVWW 2025, Fig. 2 style).

    The axis is fixed at [0, 1] with the chance line at 0.5 and each bar's value written on it; the final
    layer's AUROC is a dotted line. A bar is green when the layer is better than the final layer *and* better
    than chance (:func:`beats_final_layer`), grey otherwise; bars have an outline, so an AUROC of 0 shows.
    """
    names = list(layer_names)
    vals = np.asarray(list(aurocs), dtype=float)
    if len(names) != vals.size:
        raise ValueError(f"{len(names)} layer names but {vals.size} AUROC values")
    better = np.array([beats_final_layer(v, final_auroc) for v in vals], dtype=bool)
    fig = _figure(max(6.0, 0.32 * len(names) + 1.5), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    bars = ax.bar(x, vals, color=np.where(better, "tab:green", "tab:grey"), width=0.8, edgecolor="black",
                  linewidth=0.6)
    ax.bar_label(bars, fmt="%.2f", fontsize=6 if len(names) > 20 else 8, rotation=90 if len(names) > 12 else 0,
                 padding=2)
    ax.axhline(0.5, ls="--", color="tab:red", lw=1, label="chance (0.5)")
    if final_auroc is not None:
        ax.axhline(final_auroc, ls=":", color="black", lw=1.5, label=f"final layer ({final_auroc:.3f})")
    from matplotlib.patches import Patch

    handles = ax.get_legend_handles_labels()[0] + [Patch(color="tab:green", label="better than the final layer "
                                                                                    "and than chance")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="x-small")  # covers no bar
    ax.set_xticks(x, names, rotation=90, fontsize=7 if len(names) > 30 else 9)
    ax.set(ylim=(0.0, 1.05), ylabel="AUROC", title=title, xlim=(-0.6, len(names) - 0.4))
    return fig


def beats_final_layer(value: float, final: Optional[float]) -> bool:
    """Whether a layer's AUROC is better than the final layer's and better than chance (0.5): a layer at 0.08
    against a final layer at 0.01 is not better, both are worse than a coin."""
    return final is not None and bool(value > final) and bool(value > 0.5)


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


def _representation(detector_type: Optional[str]) -> str:
    from .detectors.registry import get_spec

    try:
        return get_spec(detector_type).representation if detector_type else "other"
    except Exception:  # noqa: BLE001 - a detector of the user's own that is not importable here
        return "other"


def detector_comparison_figure(rows: Sequence[Mapping], groups: Sequence[str] = ("near", "far"),
                               metric: str = "auroc", title: Optional[str] = None) -> Figure:
    """Horizontal grouped bars, one row per detector (rows ``{"detector", "type", "<group>/<metric>"}``), grouped
    by the representation it reads and sorted within a group from best to worst (mean over the OOD groups);
    several seeds are averaged and their spread drawn as error bars (none with one seed): give it the rows of one
    backbone (its seeds), never of backbones that differ otherwise. The chance line is at 0.5 for AUROC. The
    figure grows with the number of detectors, so it stays readable at 40 and more."""
    by_det: dict = {}
    kind: dict = {}
    for row in rows:
        kind.setdefault(row["detector"], _representation(row.get("type")))
        for g in groups:
            v = row.get(f"{g}/{metric}")
            if v is not None:
                by_det.setdefault(row["detector"], {}).setdefault(g, []).append(float(v))
    sign = 1.0 if metric != "fpr95" else -1.0
    order = ("logits", "features", "layers", "feature_maps", "model", "other")

    def rank(name):
        means = [np.mean(v) for v in by_det[name].values()]
        rep = kind[name]
        return (order.index(rep) if rep in order else len(order), -sign * float(np.mean(means)), name)

    names = sorted(by_det, key=rank)
    fig = _figure(7.5, max(3.0, 0.34 * len(names) * max(1, len(groups)) / 2 + 1.6))
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]  # the first on top
    height = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        vals = [by_det[n].get(g, [np.nan]) for n in names]
        spread = [np.std(v, ddof=1) if len(v) > 1 else np.nan for v in vals]
        errors = spread if any(np.isfinite(spread)) else None
        ax.barh(y - (i - (len(groups) - 1) / 2) * height, [np.mean(v) for v in vals], height,
                xerr=errors, label=f"{g} OOD", capsize=2, color=OOD_COLOURS[i % len(OOD_COLOURS)])
    ax.set_yticks(y, [f"{n}  [{kind[n]}]" for n in names], fontsize=8)
    if metric == "auroc":
        ax.axvline(0.5, ls="--", color="black", lw=1, label="chance (0.5)")
    ax.set(xlabel=f"test {metric.upper()}", xlim=(0.0, 1.0) if metric != "fpr95" else None,
           title=title or f"Selected detectors: test {metric.upper()} per OOD group")
    fig.legend(loc="outside lower center", ncols=len(groups) + 1, fontsize="small")
    return fig


def backbone_comparison_figure(rows: Sequence[Mapping], groups: Sequence[str] = ("near", "far"),
                               metric: str = "auroc", title: Optional[str] = None) -> Figure:
    """The same detectors on different backbones (architectures, training objectives): one panel per OOD group,
    per detector one bar per backbone (rows ``{"detector", "backbone_name", "<group>/<metric>"}``; the seeds of a
    backbone averaged, their spread as error bars), backbones in the order first seen, detectors in the order
    first seen. The chance line is at 0.5 for AUROC."""
    values: dict = {}
    backbones: list = []
    detectors: list = []
    for row in rows:
        bb, det = row["backbone_name"], row["detector"]
        backbones += [bb] * (bb not in backbones)
        detectors += [det] * (det not in detectors)
        for g in groups:
            v = row.get(f"{g}/{metric}")
            if v is not None:
                values.setdefault((g, det, bb), []).append(float(v))
    colours = [f"C{i % 10}" for i in range(len(backbones))]
    height = 0.8 / max(1, len(backbones))
    fig = _figure(4.0 * len(groups) + 2.0, max(3.0, 0.22 * len(detectors) * len(backbones) + 1.8))
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    y = np.arange(len(detectors))[::-1]
    for ax, g in zip(axes, groups):
        for j, bb in enumerate(backbones):
            vals = [values.get((g, d, bb), [np.nan]) for d in detectors]
            spread = [np.std(v, ddof=1) if len(v) > 1 else np.nan for v in vals]
            ax.barh(y + ((len(backbones) - 1) / 2 - j) * height, [np.mean(v) for v in vals], height,
                    xerr=spread if any(np.isfinite(spread)) else None, capsize=2, color=colours[j],
                    label=bb if g == groups[0] else None)
        if metric == "auroc":
            ax.axvline(0.5, ls="--", color="black", lw=1, label="chance (0.5)" if g == groups[0] else None)
        ax.set(xlabel=f"{g} OOD: test {metric.upper()}", xlim=(0.0, 1.0) if metric != "fpr95" else None)
    axes[0].set_yticks(y, detectors, fontsize=8)
    fig.suptitle(title or f"Backbones compared: test {metric.upper()} of each detector's selected configuration")
    fig.legend(loc="outside lower center", ncols=min(len(backbones) + 1, 6), fontsize="small")
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


#: panels of :func:`neural_collapse_figure`: (title, y label, [(history key, legend label)], log axis)
_NC_PANELS = (
    ("NC1: within-class variability", r"$\mathrm{Tr}(\Sigma_W \Sigma_B^{+}) / C$  (log axis)", [("nc1", "NC1")], True),
    ("NC2: class means towards a simplex ETF", "deviation from an ETF",
     [("nc2_equinorm", "equinorm (CV of the mean norms)"), ("nc2_equiangularity", "equiangularity")], False),
    ("NC3: classifier aligned with the class means", r"$\Vert W/\Vert W\Vert - M/\Vert M\Vert\Vert^2$",
     [("nc3", "NC3")], False),
    ("NC4: nearest class mean vs network", "fraction of samples disagreeing", [("nc4", "NC4")], False),
)


def neural_collapse_figure(history: Sequence[Mapping], title: str = "Neural collapse over training") -> Figure:
    """NC1-NC4 (Papyan, Han & Donoho 2020) against the epoch, one panel each, from a training history
    (rows with ``epoch`` and the keys of :data:`ood_core.neural_collapse.NC_KEYS`; rows without them are
    skipped). Every metric falls towards 0 as the network collapses; NC1 spans orders of magnitude and is drawn
    on a log axis (plain-number tick labels), the others on linear axes from 0. Each legend gives the last
    value."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [r for r in history if "nc1" in r]
    epochs = np.array([float(r["epoch"]) for r in rows])
    fig = _figure(10.0, 7.0)
    axes = fig.subplots(2, 2).ravel()
    for ax, (name, ylabel, lines, log) in zip(axes, _NC_PANELS):
        for i, (key, label) in enumerate(lines):
            vals = np.array([float(r.get(key, np.nan)) for r in rows])
            finite = np.flatnonzero(np.isfinite(vals))
            if not finite.size:
                continue
            last = finite[-1]
            ax.plot(epochs, vals, marker="o" if len(rows) <= 30 else None, ms=3, lw=1.5,
                    color=OOD_COLOURS[i - 1] if i else ID_COLOUR,
                    label=f"{label}: {vals[last]:.3g} at epoch {epochs[last]:g}")
        if log:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _pos: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            shown = np.array([float(r.get(k, np.nan)) for r in rows for k, _ in lines])
            shown = shown[np.isfinite(shown) & (shown > 0)]
            # within about a decade there are too few major ticks: label the minor ones too, as plain numbers
            narrow = shown.size and np.log10(shown.max() / shown.min()) < 1.5
            ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())
        else:
            ax.set_ylim(bottom=0.0)
        ax.set(title=name, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3, which="both" if log else "major")
        if ax.get_lines():
            ax.legend(fontsize="small", loc="upper right")
    fig.suptitle(f"{title} (lower = more collapse)")
    return fig


def delta_bars_figure(labels: Sequence[str], series: Mapping[str, Sequence[Optional[float]]], title: str,
                      ylabel: str) -> Figure:
    """Grouped bars of differences around a zero line: one group per label, one bar per series (missing
    values: no bar), e.g. reproduced − reported AUROC per method for near and far OOD."""
    fig = _figure(max(6.0, 0.6 * len(labels) + 2), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width=width, label=name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(list(range(len(labels))), list(labels), rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig
