"""OpenOOD leaderboard deltas: its CSV format read, reproduced − reported by hand, our rows written back in it, the
setting refused before compute, and a whole sweep that prints and logs the delta table."""
from pathlib import Path

import pytest
import yaml

from orchestrator import leaderboard as lb
from orchestrator.cli import main

# three rows of OpenOOD's leaderboard branch, results/cifar10.csv, as it is written there (and a '/' cell)
BOARD = """Training,Postprocessor,Near-OOD_AUROC,Far-OOD_AUROC,ID_Accuracy,Outlier_Data,Arch,Additional_Description
CrossEntropy,MSP,88.03 ± 0.25,90.73 ± 0.43,95.06 ± 0.30,No,ResNet18,100 epochs
CrossEntropy,KNN,90.64 ± 0.20,92.96 ± 0.14,95.06 ± 0.30,No,ResNet18,100 epochs
CIDER,KNN,90.71 ± 0.16,94.71 ± 0.36,/,No,ResNet18,100 epochs
CrossEntropy,MSP,76.02,85.23,76.18,No,ResNet50,torchvision ckpt
"""


def _rows():
    """Result rows of two checkpoints (fractions, as the sweep holds them)."""
    return [
        {"backbone": "r-s0", "detector": "MaxSoftmax", "near/auroc": 0.87, "far/auroc": 0.90, "id_accuracy": 0.95,
         "near/fpr95_openood": 0.50, "far/fpr95_openood": 0.40},
        {"backbone": "r-s1", "detector": "MaxSoftmax", "near/auroc": 0.89, "far/auroc": 0.92, "id_accuracy": 0.96,
         "near/fpr95_openood": 0.52, "far/fpr95_openood": 0.42},
        {"backbone": "r-s0", "detector": "knn50", "near/auroc": 0.91, "far/auroc": 0.93, "id_accuracy": 0.95},
        {"backbone": "r-s0", "detector": "Entropy", "near/auroc": 0.80, "far/auroc": 0.85, "id_accuracy": 0.95},
        {"backbone": "r-s0", "detector": "KLMatching", "failed": "boom"},
    ]


def test_parse_openood_format():
    rows = lb.parse_leaderboard(BOARD)
    assert rows[0]["method"] == "MSP" and rows[0]["Near-OOD_AUROC"] == (88.03, 0.25)
    assert rows[2]["ID_Accuracy"] is None and rows[3]["Far-OOD_AUROC"] == (85.23, None)
    assert lb.reported_row(rows, "KNN", "CrossEntropy", "ResNet18")["Far-OOD_AUROC"] == (92.96, 0.14)
    assert lb.reported_row(rows, "MSP", "CrossEntropy", "ResNet50")["Near-OOD_AUROC"] == (76.02, None)
    with pytest.raises(lb.LeaderboardError, match="missing column"):
        lb.parse_leaderboard("Training,Method\nCrossEntropy,MSP\n", "x.csv")
    with pytest.raises(lb.LeaderboardError, match=r"x.csv line 3, column Far-OOD_AUROC: 'ninety'"):
        lb.parse_leaderboard(BOARD.replace("92.96 ± 0.14", "ninety"), "x.csv")


def test_deltas_by_hand():
    board = lb.parse_leaderboard(BOARD)
    types = {"MaxSoftmax": "MaxSoftmax", "knn50": "KNN", "Entropy": "Entropy", "KLMatching": "KLMatching"}
    table = {e["detector"]: e for e in lb.deltas(_rows(), board, types, "CrossEntropy", "ResNet18")}
    assert set(table) == {"MaxSoftmax", "knn50", "Entropy"}  # a detector whose every trial failed has no numbers
    msp = table["MaxSoftmax"]
    # near AUROC: mean of 87 and 89 = 88, std (ddof 0, as OpenOOD's np.std) 1; reported 88.03
    assert msp["near/auroc/reproduced"] == pytest.approx(88.0) and msp["near/auroc/reproduced_std"] == pytest.approx(1.0)
    assert msp["near/auroc/reported"] == 88.03 and msp["near/auroc/delta"] == pytest.approx(-0.03)
    assert msp["far/auroc/delta"] == pytest.approx(91.0 - 90.73)
    assert msp["near/fpr95_openood/reproduced"] == pytest.approx(51.0) and msp["near/fpr95_openood/reported"] is None
    assert msp["near/fpr95_openood/delta"] is None  # the leaderboard has no FPR@95
    assert table["knn50"]["method"] == "KNN" and table["knn50"]["far/auroc/delta"] == pytest.approx(93.0 - 92.96)
    assert table["Entropy"]["on_leaderboard"] is False and table["Entropy"]["near/auroc/delta"] is None
    text = lb.format_deltas(list(table.values()), "cifar10.csv")
    assert "near AUROC ours" in text and "-0.03" in text and "+0.27" in text and "no FPR@95" in text


def test_fpr_columns_compare_with_openood_definition():
    board = lb.parse_leaderboard(BOARD.replace("Additional_Description\n", "Additional_Description,"
                                               "Near-OOD_FPR@95,Far-OOD_FPR@95\n", 1)
                                 .replace("100 epochs\nCrossEntropy,KNN", "100 epochs,49.00 ± 1.00,38.5\n"
                                                                          "CrossEntropy,KNN", 1))
    table = lb.deltas(_rows(), board, {"MaxSoftmax": "MaxSoftmax"}, "CrossEntropy", "ResNet18")
    msp = next(e for e in table if e["detector"] == "MaxSoftmax")
    assert msp["near/fpr95_openood/delta"] == pytest.approx(51.0 - 49.0)
    assert msp["far/fpr95_openood/delta"] == pytest.approx(41.0 - 38.5)
    assert "near OpenOOD FPR95 ours" in lb.format_deltas(table, "f.csv")


def test_ours_in_the_leaderboard_format():
    types = {"MaxSoftmax": "MaxSoftmax", "knn50": "KNN", "Entropy": "Entropy"}
    text = lb.ours_csv(_rows(), types, "CrossEntropy", "ResNet18")
    assert text.splitlines()[0] == ",".join(lb.COLUMNS)
    assert "CrossEntropy,MSP,88.00 ± 1.00,91.00 ± 1.00,95.50 ± 0.50,No,ResNet18,ood-sweep reproduction" in text
    assert "CrossEntropy,KNN,91.00,93.00,95.00,No,ResNet18" in text
    again = lb.parse_leaderboard(text)  # it reads back as a leaderboard file
    assert [r["method"] for r in again] == ["MSP", "KNN", "Entropy"]


def _with_board(tmp_path, board):
    from sweep_runs import write_config

    return write_config(tmp_path, name="board", report={"leaderboard": str(board), "fpr95": "fpr95_openood"})


def test_missing_or_malformed_file_stops_before_compute(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _with_board(tmp_path, tmp_path / "nope.csv")
    assert main(["sweep", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: report.leaderboard: ") and "nope.csv" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["validate", str(_with_board(tmp_path, bad))]) == 2
    assert "report.leaderboard: " in capsys.readouterr().err


def test_sweep_prints_and_logs_the_deltas(tmp_path):
    """The quickstart study with a leaderboard file naming its detectors: the delta table printed under the
    results table (whose FPR column is OpenOOD's, so named), logged as a table, a figure and our CSV."""
    import mlflow
    from sweep_runs import run_sweep

    board = tmp_path / "board.csv"
    board.write_text(BOARD.replace("ResNet18", "SmallCNN"))
    cfg = _with_board(tmp_path, board)
    assert yaml.safe_load(cfg.read_text())["backbones"][0]["arch"] not in lb.ARCH_NAMES  # any Arch row matches
    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    assert "near OpenOOD FPR95" in out and "OpenOOD FPR95 = ID rejected" in out
    assert "OpenOOD leaderboard (" in out and "near AUROC ours" in out
    table_lines = [l for l in out.splitlines() if l.startswith(("MaxSoftmax ", "KNN "))]
    assert any(" MSP " in l for l in table_lines) and any(" KNN " in l for l in table_lines)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("board")
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "sweep"][0]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    names |= {a.path for a in client.list_artifacts(parent.info.run_id, "leaderboard")}
    assert {"leaderboard_deltas.csv", "leaderboard_deltas.png", "leaderboard/ours.csv"} <= names
    local = Path(client.download_artifacts(parent.info.run_id, "leaderboard/ours.csv", str(tmp_path)))
    ours = lb.parse_leaderboard(local.read_text())
    assert {r["method"] for r in ours} == {"MSP", "KNN", "MDS"}


def test_openood_fpr_is_a_selection_metric_minimised():
    from orchestrator.config import parse_config
    from sweep_runs import ROOT

    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    raw["search"] = {"metric": "fpr95_openood"}
    raw["report"] = {"fpr95": "fpr95_openood"}
    cfg = parse_config(raw)
    assert cfg.search.mode == "min" and cfg.report.fpr95 == "fpr95_openood" and cfg.report.leaderboard is None
