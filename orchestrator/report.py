"""The results table: one row per (backbone, detector) with the selected configuration."""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Sequence

import pandas as pd


def format_params(selected: Dict) -> str:
    """Hyperparameters as the table writes them: ``k=50, t=0.5`` (``-`` for none)."""
    if not selected:
        return "-"
    def show(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(show(i) for i in v) + "]"
        return str(v)

    return ", ".join(f"{k}={show(v)}" for k, v in selected.items())


def trial_run_name(detector: str, params: Dict) -> str:
    """The MLflow name of a trial's run, the same for a fresh and a cached search: ``KNN k=50``."""
    return f"{detector} {format_params(params)}" if params else detector


def results_frame(rows: Iterable[Dict]) -> pd.DataFrame:
    """Rows as a flat frame (selected hyperparameters and failed trials as JSON) for CSV / Parquet artifacts."""
    flat = []
    for row in rows:
        r = {k: v for k, v in row.items() if not k.startswith("_")}
        r["selected"] = json.dumps(r.get("selected", {}), sort_keys=True)
        r["failed_trials"] = json.dumps([{k: t[k] for k in ("params", "reason")} for t in r.get("failed_trials") or []],
                                        default=str)
        flat.append(r)
    return pd.DataFrame(flat)


def _failed_trials(row: Dict) -> List[Dict]:
    value = row.get("failed_trials") or []
    return json.loads(value) if isinstance(value, str) else value


def trials_cell(row: Dict) -> str:
    """``5`` or, when some failed, ``4/5`` (trials that reported metrics / trials run)."""
    total = int(row.get("trials") or 0)
    failed = len(_failed_trials(row))
    return f"{total - failed}/{total}" if failed else str(total)


def problems(rows: Sequence[Dict]) -> List[str]:
    """One line per thing that makes a result untrustworthy: failed trials (with the first reason), a
    detector whose every trial failed, constant scores, a backbone at chance accuracy."""
    out = []
    for row in rows:
        where = f"{row['detector']} @ {row['backbone']}"
        failed = _failed_trials(row)
        if row.get("failed"):
            out.append(f"{where}: FAILED, no trial finished ({len(failed)} tried); {row['failed']}")
        elif failed:
            first = failed[0]
            out.append(f"{where}: {trials_cell(row)} trials; {format_params(first['params'])}: {first['reason']}")
        if row.get("constant_scores"):
            out.append(f"{where}: constant scores (it ranks nothing: AUROC 50, FPR95 100)")
    seen = set()
    for row in rows:
        if row.get("at_chance") and row["backbone"] not in seen:
            seen.add(row["backbone"])
            out.append(f"backbone {row['backbone']}: ID test accuracy {100 * row['id_accuracy']:.2f}% is at chance "
                       f"({100 * row['chance']:.2f}%): training collapsed, its detector results mean nothing")
    return out


def summary_metrics(rows: Iterable[Dict]) -> Dict[str, float]:
    """Per detector and backbone, the near / far means, named ``<detector>.<backbone>.<group>_<metric>``."""
    out = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(("near/", "far/")):
                group, metric = key.split("/")
                out[f"{row['detector']}.{row['backbone']}.{group}_{metric}"] = value
    return out


def seed_summary(rows: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far")) -> List[Dict]:
    """Mean and standard deviation over backbone seeds, per (backbone name, detector).

    Rows carry ``backbone_name`` (the backbone without its ``-s<seed>`` suffix); groups with a single
    seed are left out.
    """
    import numpy as np

    groups: Dict[tuple, List[Dict]] = {}
    for row in rows:
        name = row.get("backbone_name") or row["backbone"].rsplit("-s", 1)[0]
        groups.setdefault((name, row["detector"]), []).append(row)
    out = []
    for (name, det), members in groups.items():
        if len(members) < 2:
            continue
        entry = {"backbone": name, "detector": det, "seeds": len(members)}
        for key in ["val_auroc"] + [f"{g}/{m}" for g in metric_groups for m in ("auroc", "fpr95")]:
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                entry[key] = (float(np.mean(values)), float(np.std(values, ddof=1)))
        out.append(entry)
    return out


def format_seed_table(summary: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far")) -> str:
    headers = ["backbone", "detector", "seeds"] + [f"{g} {m}" for g in metric_groups for m in ("AUROC", "FPR95")]
    body = []
    for e in summary:
        line = [e["backbone"], e["detector"], str(e["seeds"])]
        for g in metric_groups:
            for m in ("auroc", "fpr95"):
                v = e.get(f"{g}/{m}")
                line.append("-" if v is None else f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}")
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    render = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([render(headers), "  ".join("-" * w for w in widths)] + [render(b) for b in body])


def format_table(rows: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far"), optimistic: bool = False) -> str:
    """A plain-text table: per detector the selected hyperparameters, AUROC and FPR@95 per OOD group;
    then mean ± std over seeds when a backbone was trained with several."""
    headers = ["backbone", "detector", "selected", "trials", "val AUROC"]
    for g in metric_groups:
        headers += [f"{g} AUROC", f"{g} FPR95"]
    body: List[List[str]] = []
    for row in rows:
        selected = "FAILED" if row.get("failed") else format_params(row.get("selected", {}))
        line = [row["backbone"], row["detector"], selected, trials_cell(row), _pct(row.get("val_auroc"))]
        for g in metric_groups:
            line += [_pct(row.get(f"{g}/auroc")), _pct(row.get(f"{g}/fpr95"))]
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]

    def render(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [render(headers), "  ".join("-" * w for w in widths)] + [render(b) for b in body]
    accs = {}
    for row in rows:
        if "id_accuracy" in row:
            accs[row["backbone"]] = row["id_accuracy"]
    if accs:
        lines.append("")
        lines.append("ID test accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accs.items()))
    summary = seed_summary(rows, metric_groups)
    if summary:
        lines += ["", "Mean ± std over seeds (test metrics of each seed's selected configuration):",
                  format_seed_table(summary, metric_groups)]
    lines.append("AUROC / FPR95 in %; FPR95 = OOD accepted at the threshold that keeps 95% of ID (lower is better).")
    flagged = problems(rows)
    if flagged:
        lines += ["", "Problems:"] + [f"  ! {line}" for line in flagged]
    if optimistic:
        lines.append("OPTIMISTIC: an OOD validation set is also a test set (data.allow_val_test_overlap); "
                     "these test figures saw their own data during selection.")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}"
