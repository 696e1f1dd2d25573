"""The one-page summary of a sweep (``summary.html`` on the sweep's MLflow run): the results table, what makes
a result untrustworthy, the time per stage, the sweep file and the sweep run's figures, embedded so that the page
reads the same in MLflow's artifact viewer, downloaded, or mailed."""
from __future__ import annotations

import base64
import html
from typing import Dict, Mapping, Sequence

from orchestrator import report

#: the order in which the sweep run's figures appear (by name prefix); the rest follow by name
FIGURE_ORDER = ("backbone_comparison", "detector_comparison", "roc_", "per_layer/", "neural_collapse")

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 0.85em; }
th, td { padding: 0.2em 0.5em; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.failed { color: #b00020; font-weight: bold; } .best { font-weight: bold; }
.problems { color: #b00020; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; } img { max-width: 100%; }
"""


def _best_cells(headers: Sequence[str], body: Sequence[Sequence[str]]) -> set:
    """(row, column) of the best value of each metric column: highest AUROC, lowest FPR95."""
    best = set()
    for j, h in enumerate(headers):
        if not h.endswith(("AUROC", "FPR95")):
            continue
        values = [(float(r[j]), i) for i, r in enumerate(body) if r[j] not in ("-", "")]
        if not values:
            continue
        target = min(values)[0] if h.endswith("FPR95") else max(values)[0]
        best |= {(i, j) for v, i in values if v == target}
    return best


def results_html(rows: Sequence[Dict], metric_groups: Sequence[str] = ("near", "far"), fpr: str = "fpr95") -> str:
    """The results table as HTML, the best value of each metric column in bold."""
    headers, body = report.table_cells(rows, metric_groups, fpr=fpr)
    best = _best_cells(headers, body)
    out = ["<div class='scroll'><table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for i, cells in enumerate(body):
        tds = []
        for j, c in enumerate(cells):
            cls = ["num"] if j >= 3 else []
            if c == "FAILED":
                cls.append("failed")
            if (i, j) in best:
                cls.append("best")
            tds.append(f'<td class="{" ".join(cls)}">{html.escape(c)}</td>' if cls else f"<td>{html.escape(c)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def summary_html(name: str, rows: Sequence[Dict], *, stages: Mapping[str, float], sweep_seconds: float,
                 config_text: str, figures: Mapping[str, bytes], optimistic: bool = False,
                 metric_groups: Sequence[str] = ("near", "far"), blocks: Sequence[str] = (), fpr: str = "fpr95") -> str:
    """The page: title, table, notes under it, ``blocks`` (preformatted text such as the neural-collapse table),
    problems, seconds per stage, figures (PNG, embedded), sweep file."""
    e = html.escape
    flagged = report.problems(rows)
    notes = [line for line in report.table_footer(rows, metric_groups, optimistic, fpr=fpr)
             if line and line != "Problems:" and not line.startswith("  ! ")]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sweep {e(name)}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Sweep <code>{e(name)}</code></h1>",
             f"<p>{len(rows)} (backbone, detector) results; the selected configuration of each was chosen on the "
             "validation sets only; the AUROC / FPR95 columns are its test metrics, averaged over the sets of each "
             "group. Best value per column in bold.</p>",
             results_html(rows, metric_groups, fpr)]
    parts.append("<pre>" + e("\n".join(notes)) + "</pre>")
    parts += ["<pre>" + e(text) + "</pre>" for text in blocks]
    if flagged:
        parts.append("<h2 class='problems'>Problems</h2><ul class='problems'>" +
                     "".join(f"<li>{e(line)}</li>" for line in flagged) + "</ul>")
    timing = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in stages.items())
    parts.append(f"<p>Done in {sweep_seconds:.1f} s ({e(timing)}).</p>")
    if figures:
        parts.append("<h2>Figures</h2>")
        for fname, png in figures.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{e(fname)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{e(fname)}</figcaption></figure>")
    parts.append("<p>Per detector: its run (<code>&lt;detector&gt; @ &lt;backbone&gt;</code>) holds the ROC curves "
                 "and score histograms of the selected configuration; its trial runs hold each configuration's "
                 "validation metrics.</p>")
    parts.append("<h2>Sweep file</h2><pre>" + e(config_text) + "</pre></body></html>")
    return "\n".join(parts)


def _figure_rank(name: str):
    for i, prefix in enumerate(FIGURE_ORDER):
        if name.startswith(prefix):
            return i, name
    return len(FIGURE_ORDER), name


def ordered_figures(figures: Mapping[str, bytes]) -> Dict[str, bytes]:
    """``figures`` (name -> PNG) in :data:`FIGURE_ORDER`."""
    return {name: figures[name] for name in sorted(figures, key=_figure_rank)}
