"""The results table: one row per (backbone, detector) with the selected configuration."""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Sequence, Tuple

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


#: the FPR@95 metric keys a table can show (``report.fpr95`` of the sweep file) and their column names; both are
#: computed and logged (``ood_core.metrics.FPR_DEFINITIONS``), the table names the one it shows
FPR_HEADERS = {"fpr95": "FPR95", "fpr95_openood": "OpenOOD FPR95"}
FPR_NOTES = {"fpr95": "FPR95 = OOD accepted at the threshold that keeps 95% of ID (lower is better)",
             "fpr95_openood": "OpenOOD FPR95 = ID rejected at the threshold that flags 95% of OOD, OpenOOD v1.5's "
                              "definition (lower is better)"}


def _fpr_key(fpr: str) -> str:
    if fpr not in FPR_HEADERS:
        raise ValueError(f"fpr must be one of {sorted(FPR_HEADERS)}, got {fpr!r}")
    return fpr


#: the columns a reader looks for first, in this order; then the other metrics, then identifiers
LEADING_COLUMNS = ("backbone", "detector", "selected", "val_auroc", "near/auroc", "near/fpr95", "far/auroc",
                   "far/fpr95", "id_accuracy")


def _is_metric_column(name: str) -> bool:
    return name.startswith(("val_", "near/", "far/", "test/", "nc1", "nc2", "nc3", "nc4", "nc5"))


def results_frame(rows: Iterable[Dict]) -> pd.DataFrame:
    """Rows as a flat frame for the CSV / Parquet artifacts: who and what was selected, then the metrics (the
    table's first, then every other), then identifiers and bookkeeping; selected hyperparameters and failed
    trials as JSON."""
    flat = []
    for row in rows:
        r = {k: v for k, v in row.items() if not k.startswith("_")}
        r["selected"] = json.dumps(r.get("selected", {}), sort_keys=True)
        r["failed_trials"] = json.dumps([{k: t[k] for k in ("params", "reason")} for t in r.get("failed_trials") or []],
                                        default=str)
        flat.append(r)
    frame = pd.DataFrame(flat)
    leading = [c for c in LEADING_COLUMNS if c in frame.columns]
    metrics = sorted((c for c in frame.columns if _is_metric_column(c) and c not in leading),
                     key=lambda c: (not c.startswith("val_"), c.startswith("test/"), c.startswith("nc"), c))
    rest = [c for c in frame.columns if c not in leading and c not in metrics]
    return frame[leading + metrics + rest]


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


def seed_summary(rows: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far"), fpr: str = "fpr95") -> List[Dict]:
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
        for key in ["val_auroc"] + [f"{g}/{m}" for g in metric_groups for m in ("auroc", _fpr_key(fpr))]:
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                entry[key] = (float(np.mean(values)), float(np.std(values, ddof=1)))
        out.append(entry)
    return out


def format_seed_table(summary: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far"), fpr: str = "fpr95") -> str:
    headers = ["backbone", "detector", "seeds"] + [f"{g} {m}" for g in metric_groups
                                                   for m in ("AUROC", FPR_HEADERS[_fpr_key(fpr)])]
    body = []
    for e in summary:
        line = [e["backbone"], e["detector"], str(e["seeds"])]
        for g in metric_groups:
            for m in ("auroc", fpr):
                v = e.get(f"{g}/{m}")
                line.append("-" if v is None else f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}")
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    render = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([render(headers), "  ".join("-" * w for w in widths)] + [render(b) for b in body])


def table_cells(rows: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far"),
                fpr: str = "fpr95") -> Tuple[List[str], List[List[str]]]:
    """Headers and cells of the results table (metrics in %), shared by the terminal and the summary page;
    ``fpr`` picks the FPR@95 definition shown (:data:`FPR_HEADERS`), named in its column header."""
    headers = ["backbone", "detector", "selected", "trials", "val AUROC"]
    for g in metric_groups:
        headers += [f"{g} AUROC", f"{g} {FPR_HEADERS[_fpr_key(fpr)]}"]
    body: List[List[str]] = []
    for row in rows:
        selected = "FAILED" if row.get("failed") else format_params(row.get("selected", {}))
        line = [row["backbone"], row["detector"], selected, trials_cell(row), _pct(row.get("val_auroc"))]
        for g in metric_groups:
            line += [_pct(row.get(f"{g}/auroc")), _pct(row.get(f"{g}/{fpr}"))]
        body.append(line)
    return headers, body


def format_table(rows: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far"), optimistic: bool = False,
                 fpr: str = "fpr95") -> str:
    """A plain-text table: per detector the selected hyperparameters, AUROC and FPR@95 per OOD group;
    then mean ± std over seeds when a backbone was trained with several."""
    headers, body = table_cells(rows, metric_groups, fpr)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]

    def render(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [render(headers), "  ".join("-" * w for w in widths)] + [render(b) for b in body]
    return "\n".join(lines + table_footer(rows, metric_groups, optimistic, fpr))


def table_footer(rows: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far"),
                 optimistic: bool = False, fpr: str = "fpr95") -> List[str]:
    """The lines under the results table: ID test accuracy, mean ± std over seeds, units, problems."""
    lines: List[str] = []
    accs = {}
    for row in rows:
        if "id_accuracy" in row:
            accs[row["backbone"]] = row["id_accuracy"]
    if accs:
        lines.append("")
        lines.append("ID test accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accs.items()))
    summary = seed_summary(rows, metric_groups, fpr)
    if summary:
        lines += ["", "Mean ± std over seeds (test metrics of each seed's selected configuration):",
                  format_seed_table(summary, metric_groups, fpr)]
    lines.append(f"AUROC / {FPR_HEADERS[fpr]} in %; {FPR_NOTES[fpr]}.")
    flagged = problems(rows)
    if flagged:
        lines += ["", "Problems:"] + [f"  ! {line}" for line in flagged]
    if optimistic:
        lines.append("OPTIMISTIC: an OOD validation set is also a test set (data.allow_val_test_overlap); "
                     "these test figures saw their own data during selection.")
    return lines


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}"


#: the neural-collapse values shown per backbone: (key, column header)
COLLAPSE_COLUMNS = (("nc1", "NC1"), ("nc2_equinorm", "NC2 norm"), ("nc2_equiangularity", "NC2 angle"),
                    ("nc3", "NC3"), ("nc4", "NC4"), ("nc5", "NC5"))


def add_collapse(rows: Sequence[Dict], values: Dict[str, Dict[str, float]]) -> None:
    """Put each backbone's final neural-collapse values (``SweepRunner.neural_collapse``: ``{backbone label:
    {"nc1": ..., "nc5/<set>": ...}}``) on its result rows, so that results.csv / .parquet hold them next to
    the detector metrics of the same backbone."""
    for row in rows:
        row.update(values.get(row["backbone"], {}))


def format_collapse(values: Dict[str, Dict[str, float]]) -> str:
    """Lines for under the results table: one per backbone with NC1-NC4 of its ID training features and NC5
    against the OOD validation sets pooled and one by one (Papyan, Han & Donoho 2020; NC5: Ammar et al. 2024);
    empty when there are none."""
    if not values:
        return ""
    sets = list(dict.fromkeys(k for v in values.values() for k in v if k.startswith("nc5/")))
    columns = list(COLLAPSE_COLUMNS) + [(k, f"NC5 {k.split('/', 1)[1]}") for k in sets]
    headers = ["backbone"] + [h for _, h in columns]
    show = lambda v: "-" if v is None or v != v else f"{float(v):.3g}"  # noqa: E731 - NaN as "-"
    body = [[bb] + [show(v.get(k)) for k, _ in columns] for bb, v in values.items()]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    render = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(["Neural collapse of the ID training features (0 = full collapse; NC5: |cos| of the class means "
                      "with the OOD val mean):",
                      render(headers), "  ".join("-" * w for w in widths)] + [render(b) for b in body])
