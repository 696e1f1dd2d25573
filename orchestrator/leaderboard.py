"""OpenOOD's leaderboard beside our results: reproduced, reported and their difference per method.

OpenOOD v1.5 (Zhang, Yang, Wang et al. 2023) publishes its numbers as CSV files on its repository's
``leaderboard`` branch (``results/cifar10.csv``, ``cifar100.csv``, ``imagenet200_ood.csv``, ``imagenet1k_ood.csv``
and the ``*_fsood.csv`` ones), one row per (training, post-processor, architecture)::

    Training,Postprocessor,Near-OOD_AUROC,Far-OOD_AUROC,ID_Accuracy,Outlier_Data,Arch,Additional_Description
    CrossEntropy,MSP,88.03 ± 0.25,90.73 ± 0.43,95.06 ± 0.30,No,ResNet18,100 epochs

Values are percentages, ``mean ± std`` over its three training runs (or a single value; ``/`` when there is none).
The leaderboard reports AUROC only; a file that also has ``Near-OOD_FPR@95`` / ``Far-OOD_FPR@95`` columns (the
layout of OpenOOD's own ``eval_ood.py`` metrics) gets FPR@95 deltas too, compared with ``fpr95_openood``, OpenOOD's
definition (ID rejected at 95% OOD TPR), never with ours.

Set in the sweep file as ``report: {leaderboard: path/to/cifar10.csv}``; the file is read when the sweep file is
loaded (``validate`` and ``sweep``), so a missing or malformed one stops before any compute. After the sweep
:func:`log_deltas` writes the delta table (``leaderboard_deltas.csv`` / ``.parquet``), a figure
(``leaderboard_deltas.png``) and our own rows in the leaderboard's CSV format (``leaderboard/ours.csv``, ready to
submit) on the sweep run, and returns the text printed under the results table.
"""
from __future__ import annotations

import csv
import io
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

#: our detector type -> OpenOOD's post-processor name on its leaderboard (``configs/postprocessors``)
METHOD_NAMES = {
    "MaxSoftmax": "MSP", "MaxLogit": "MLS", "EnergyBased": "EBO", "TemperatureScaling": "TempScale",
    "OpenMax": "OpenMax", "ODIN": "ODIN", "Mahalanobis": "MDS", "RMD": "RMDS", "Gram": "Gram",
    "GradNorm": "GradNorm", "ReAct": "ReAct", "KLMatching": "KLM", "ViM": "VIM", "KNN": "KNN", "DICE": "DICE",
    "RankFeat": "RankFeat", "ASH": "ASH", "SHE": "SHE", "GEN": "GEN", "SCALE": "SCALE", "NNGuide": "NNGuide",
    "NCI": "NCI", "fDBD": "fDBD", "NACUE": "NAC", "Relation": "Relation",
}

#: our architecture -> the leaderboard's ``Arch``
ARCH_NAMES = {"resnet18": "ResNet18", "resnet18_32x32": "ResNet18", "resnet18_224x224": "ResNet18",
              "resnet50_imagenet": "ResNet50", "vit_b_16": "ViT-B/16", "swin_t": "Swin-T"}

COLUMNS = ("Training", "Postprocessor", "Near-OOD_AUROC", "Far-OOD_AUROC", "ID_Accuracy", "Outlier_Data", "Arch",
           "Additional_Description")
REQUIRED = COLUMNS[:4]
#: optional columns -> our metric key (OpenOOD's FPR@95 is ``fpr95_openood``)
OPTIONAL = {"Near-OOD_FPR@95": "near/fpr95_openood", "Far-OOD_FPR@95": "far/fpr95_openood"}
#: (our metric key, leaderboard column) in the delta table's order
COMPARED = (("near/auroc", "Near-OOD_AUROC"), ("far/auroc", "Far-OOD_AUROC"),
            ("near/fpr95_openood", "Near-OOD_FPR@95"), ("far/fpr95_openood", "Far-OOD_FPR@95"))
_VALUE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:±\s*(\d+(?:\.\d+)?))?\s*$")


class LeaderboardError(ValueError):
    """A leaderboard file that is missing or not in OpenOOD's format (the message names file, line, column)."""


def parse_value(text: str) -> Optional[Tuple[float, Optional[float]]]:
    """``"88.03 ± 0.25"`` -> ``(88.03, 0.25)``; ``"74.77"`` -> ``(74.77, None)``; ``"/"`` or empty -> None."""
    text = (text or "").strip()
    if text in ("", "/", "-"):
        return None
    m = _VALUE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a percentage or 'mean ± std'")
    return float(m.group(1)), (float(m.group(2)) if m.group(2) is not None else None)


def parse_leaderboard(text: str, where: str = "leaderboard") -> List[Dict]:
    """The rows of a leaderboard CSV: ``{"training", "method", "arch", "description", <column>: (mean, std) or
    None}`` for the value columns; :class:`LeaderboardError` naming ``where``, the line and the column."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise LeaderboardError(f"{where}: not an OpenOOD leaderboard CSV; missing column(s) {missing} "
                               f"(expected {','.join(COLUMNS)})")
    rows = []
    for n, raw in enumerate(reader, start=2):
        row = {"training": (raw.get("Training") or "").strip(), "method": (raw.get("Postprocessor") or "").strip(),
               "arch": (raw.get("Arch") or "").strip(), "description": (raw.get("Additional_Description") or "").strip()}
        for col in ("Near-OOD_AUROC", "Far-OOD_AUROC", "ID_Accuracy", *OPTIONAL):
            if col in header:
                try:
                    row[col] = parse_value(raw.get(col))
                except ValueError as exc:
                    raise LeaderboardError(f"{where} line {n}, column {col}: {exc}") from None
        rows.append(row)
    if not rows:
        raise LeaderboardError(f"{where}: no rows")
    return rows


def read_leaderboard(uri: str) -> List[Dict]:
    """Read and parse a leaderboard file (path or URI); :class:`LeaderboardError` when missing or malformed."""
    from ood_core import storage

    if not storage.exists(uri):
        raise LeaderboardError(f"{uri!r} does not exist (OpenOOD's leaderboard branch has results/<benchmark>.csv: "
                               "git clone -b leaderboard https://github.com/Jingkang50/OpenOOD)")
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError:
        raise LeaderboardError(f"{uri}: not a UTF-8 text file") from None
    return parse_leaderboard(text, uri)


def reported_row(board: Sequence[Dict], method: str, training: str, arch: Optional[str]) -> Optional[Dict]:
    """The leaderboard row of ``method`` trained with ``training`` on ``arch`` (the first when several)."""
    for row in board:
        if row["method"] == method and row["training"] == training and (arch is None or row["arch"] == arch):
            return row
    return None


def _mean_std(values: Sequence[float]) -> Optional[Tuple[float, Optional[float]]]:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # OpenOOD: np.std (ddof 0)


def reproduced(rows: Sequence[Dict]) -> Dict[str, Dict[str, Tuple[float, Optional[float]]]]:
    """Per detector, mean and std (in %) over its rows (one per backbone checkpoint) of the compared metrics and
    the ID accuracy, as OpenOOD aggregates its three runs (``np.std``, ddof 0)."""
    by_det: Dict[str, List[Dict]] = {}
    for row in rows:
        if not row.get("failed"):
            by_det.setdefault(row["detector"], []).append(row)
    out = {}
    for det, members in by_det.items():
        entry = {}
        for key in [k for k, _ in COMPARED] + ["id_accuracy"]:
            ms = _mean_std([100 * m[key] for m in members if m.get(key) is not None])
            if ms is not None:
                entry[key] = ms
        out[det] = entry
    return out


def deltas(rows: Sequence[Dict], board: Sequence[Dict], detector_types: Dict[str, str], training: str,
           arch: Optional[str]) -> List[Dict]:
    """One dict per detector of the sweep: ``detector``, ``method`` (OpenOOD's name or None), and per compared
    metric ``<key>/reproduced``, ``<key>/reported``, ``<key>/delta`` (reproduced − reported, in %; None where
    either side is missing)."""
    ours = reproduced(rows)
    out = []
    for det, values in ours.items():
        method = METHOD_NAMES.get(detector_types.get(det, det))
        ref = reported_row(board, method, training, arch) if method else None
        entry = {"detector": det, "method": method, "on_leaderboard": ref is not None}
        for key, col in COMPARED:
            mine = values.get(key)
            theirs = ref.get(col) if ref else None
            entry[f"{key}/reproduced"] = mine[0] if mine else None
            entry[f"{key}/reproduced_std"] = mine[1] if mine else None
            entry[f"{key}/reported"] = theirs[0] if theirs else None
            entry[f"{key}/delta"] = mine[0] - theirs[0] if mine and theirs else None
        out.append(entry)
    return out


def format_deltas(table: Sequence[Dict], source: str) -> str:
    """The delta table as text: per method reproduced / reported / Δ for near and far AUROC and OpenOOD FPR95."""
    shown = [(k, c) for k, c in COMPARED if any(e.get(f"{k}/reported") is not None for e in table)] or list(COMPARED[:2])
    names = {"near/auroc": "near AUROC", "far/auroc": "far AUROC", "near/fpr95_openood": "near OpenOOD FPR95",
             "far/fpr95_openood": "far OpenOOD FPR95"}
    headers = ["detector", "OpenOOD"]
    for key, _ in shown:
        headers += [f"{names[key]} ours", "reported", "Δ"]
    show = lambda v, sign=False: "-" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")  # noqa: E731
    body = []
    for e in table:
        if e["on_leaderboard"]:
            line = [e["detector"], e["method"]]
        else:
            line = [e["detector"], f"{e['method']} (not listed)" if e["method"] else "(no OpenOOD name)"]
        for key, _ in shown:
            line += [show(e[f"{key}/reproduced"]), show(e[f"{key}/reported"]), show(e[f"{key}/delta"], True)]
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    render = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [f"OpenOOD leaderboard ({source}): reproduced − reported, in %", render(headers),
             "  ".join("-" * w for w in widths)] + [render(b) for b in body]
    if not any(e.get("near/fpr95_openood/reported") is not None for e in table):
        lines.append("The leaderboard reports no FPR@95; ours (both definitions) are in results.csv.")
    return "\n".join(lines)


def _pct_cell(ms: Optional[Tuple[float, Optional[float]]]) -> str:
    if ms is None:
        return "/"
    return f"{ms[0]:.2f}" if ms[1] is None else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def ours_csv(rows: Sequence[Dict], detector_types: Dict[str, str], training: str, arch: str,
             description: str = "ood-sweep reproduction") -> str:
    """Our results in the leaderboard's CSV format (its columns, ``mean ± std`` over the checkpoints, in %);
    a detector without an OpenOOD name keeps our name."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for det, values in reproduced(rows).items():
        name = METHOD_NAMES.get(detector_types.get(det, det), det)
        writer.writerow([training, name, _pct_cell(values.get("near/auroc")), _pct_cell(values.get("far/auroc")),
                         _pct_cell(values.get("id_accuracy")), "No", arch, description])
    return out.getvalue()


def backbone_arch(cfg) -> Optional[str]:
    """The leaderboard ``Arch`` of the sweep's backbones (None when they differ or are not on the leaderboard)."""
    names = {ARCH_NAMES.get(bb.arch) for bb in cfg.backbones}
    return names.pop() if len(names) == 1 else None


def log_deltas(tracker, run_id: str, cfg, rows: Sequence[Dict]) -> str:
    """After the sweep: the delta table, its figure and our leaderboard CSV on the sweep run; the text to print."""
    board = read_leaderboard(cfg.report.leaderboard)
    types = {d.label: d.type for d in cfg.detectors}
    arch = backbone_arch(cfg)
    training = cfg.report.leaderboard_training
    table = deltas(rows, board, types, training, arch)
    import pandas as pd

    tracker.log_table(run_id, pd.DataFrame(table), "leaderboard_deltas")
    tracker.log_text(run_id, ours_csv(rows, types, training, arch or cfg.backbones[0].arch), "leaderboard/ours.csv")
    listed = [e for e in table if e["on_leaderboard"]]
    if listed:
        from ood_core.plots import delta_bars_figure

        tracker.log_figure(run_id, lambda: delta_bars_figure(
            [f"{e['detector']}\n({e['method']})" for e in listed],
            {"near AUROC": [e["near/auroc/delta"] for e in listed], "far AUROC": [e["far/auroc/delta"] for e in listed]},
            f"{cfg.name}: reproduced − OpenOOD leaderboard", "reproduced − reported (points)"), "leaderboard_deltas.png")
    return format_deltas(table, cfg.report.leaderboard)
