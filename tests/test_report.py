"""The results table: selected hyperparameters, group metrics, mean ± std over seeds, optimistic flag."""
import pytest

from orchestrator.report import format_table, seed_summary


def _row(seed, det, near, far):
    return {"backbone": f"cnn-s{seed}", "backbone_name": "cnn", "detector": det, "selected": {"t": 1.5, "a": [0.25, 1]},
            "val_auroc": 0.9, "near/auroc": near, "near/fpr95": 0.3, "far/auroc": far, "far/fpr95": 0.1,
            "id_accuracy": 0.95}


def test_table_and_seed_summary():
    rows = [_row(0, "MSP", 0.8, 0.9), _row(1, "MSP", 0.9, 0.7), _row(0, "KNN", 0.95, 0.99)]
    summary = seed_summary(rows)
    assert len(summary) == 1 and summary[0]["seeds"] == 2
    mean, std = summary[0]["near/auroc"]
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.0707107, rel=1e-5)
    text = format_table(rows)
    assert "t=1.5, a=[0.25, 1]" in text and "85.00 ± 7.07" in text and "Mean ± std over seeds" in text
    assert "OPTIMISTIC" not in text
    assert "OPTIMISTIC" in format_table(rows, optimistic=True)


def test_results_csv_puts_who_and_the_metrics_first():
    from orchestrator.report import results_frame

    row = {"backbone_key": "abc123", "search_key": "def", "seed": 0, "type": "KNN", "backbone": "cnn-s0",
           "detector": "KNN", "selected": {"k": 5}, "trials": 3, "failed_trials": [],
           "test/photos/auroc": 0.99, "far/aupr_in": 0.9, "near/fpr95": 0.2, "near/auroc": 0.9, "far/auroc": 0.95,
           "far/fpr95": 0.1, "val_auroc": 0.8, "val_fpr95": 0.3, "id_accuracy": 0.97}
    columns = list(results_frame([row]).columns)
    assert columns[:9] == ["backbone", "detector", "selected", "val_auroc", "near/auroc", "near/fpr95", "far/auroc",
                           "far/fpr95", "id_accuracy"]
    assert columns[9:12] == ["val_fpr95", "far/aupr_in", "test/photos/auroc"]  # the other metrics, then the rest
    assert set(columns[12:]) == {"backbone_key", "search_key", "seed", "type", "trials", "failed_trials"}


def test_summary_page_holds_the_table_problems_timings_figures_and_sweep_file():
    import base64
    import io

    from matplotlib.figure import Figure

    from orchestrator.summary import ordered_figures, summary_html

    rows = [_row(0, "MSP", 0.8, 0.9), _row(0, "KNN", 0.95, 0.99),
            {"backbone": "cnn-s0", "detector": "ViM", "selected": {}, "failed": "d=300 > D=128",
             "failed_trials": [{"params": {"d": 300}, "reason": "d=300 > D=128"}], "trials": 1}]
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    figures = ordered_figures({"per_layer/cnn-s0_noise.png": b"layer", "detector_comparison.png": buf.getvalue(),
                               "roc_cnn-s0.png": b"roc"})
    assert list(figures) == ["detector_comparison.png", "roc_cnn-s0.png", "per_layer/cnn-s0_noise.png"]
    page = summary_html("quickstart", rows, stages={"train": 12.5, "search": 3.25}, sweep_seconds=16.0,
                        config_text="name: quickstart\n# <b>not markup</b>", figures=figures)
    assert page.count("<tr>") == 4  # header + 3 rows
    assert '<td class="num best">95.00</td>' in page and '<td class="num best">99.00</td>' in page  # KNN's near/far
    assert '<td class="failed">FAILED</td>' in page
    assert "ViM @ cnn-s0: FAILED, no trial finished" in page  # the problems list
    assert "train 12.5 s, search 3.2 s" in page and "ID test accuracy: cnn-s0 95.00%" in page
    assert base64.b64encode(buf.getvalue()).decode() in page  # the figure itself, embedded
    assert page.index("detector_comparison.png") < page.index("per_layer/cnn-s0_noise.png")
    assert "&lt;b&gt;not markup&lt;/b&gt;" in page and "<b>not markup</b>" not in page
