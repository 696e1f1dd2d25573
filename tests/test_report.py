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
