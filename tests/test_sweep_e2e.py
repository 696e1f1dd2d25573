"""End to end: a small offline sweep through Ray tasks, Parquet, Tune and MLflow, run twice."""
import copy
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import parse_config
from orchestrator.sweep import SweepRunner

ROOT = Path(__file__).resolve().parents[1]


def _small_config(tmp_path):
    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    raw["name"] = "e2e"
    raw["storage"] = str(tmp_path / "store")
    raw["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["backbones"][0]["train"]["epochs"] = 6
    raw["detectors"] = [
        {"type": "MaxSoftmax", "search": {"t": {"grid": [1, 1000]}}},
        {"type": "EnergyBased", "search": {"t": {"loguniform": [0.5, 5]}}, "num_samples": 2},
        {"type": "Mahalanobis"},
        {"type": "ReAct", "search": {"percentile": {"grid": [90, 99]}}},
    ]
    return raw


def _runs(uri, name):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def first_sweep(ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    raw = _small_config(tmp_path)
    cfg = parse_config(copy.deepcopy(raw))
    rows = SweepRunner(cfg, yaml.safe_dump(raw)).run()
    return tmp_path, raw, cfg, rows


def test_results_table(first_sweep):
    _, _, cfg, rows = first_sweep
    assert [r["detector"] for r in rows] == ["MaxSoftmax", "EnergyBased", "Mahalanobis", "ReAct"]
    for r in rows:
        for key in ("val_auroc", "near/auroc", "far/auroc", "near/fpr95", "far/fpr95", "test/photos/aupr_in",
                    "test/digits-6-9/aupr_out"):
            assert 0.0 <= r[key] <= 1.0, (r["detector"], key)
        assert 0.5 < r["id_accuracy"] <= 1.0
    assert rows[0]["selected"]["t"] in (1, 1000)
    assert 0.5 <= rows[1]["selected"]["t"] <= 5
    assert rows[3]["selected"]["percentile"] in (90, 99)
    assert rows[2]["far/auroc"] > 0.9  # Mahalanobis separates noise and photos from digits


def test_selection_uses_validation_only(first_sweep):
    tmp_path, _, cfg, rows = first_sweep
    client, runs = _runs(cfg.tracking_uri, "e2e")
    trials = [r for r in runs if r.data.tags.get("stage") == "trial" and r.data.tags.get("detector") == "ReAct"]
    assert len(trials) == 2
    best_val = max(trials, key=lambda r: r.data.metrics["val_auroc"])
    assert float(best_val.data.params["percentile"]) == rows[3]["selected"]["percentile"]


def test_parquet_features_open_with_pandas(first_sweep):
    tmp_path, _, cfg, _ = first_sweep
    files = sorted((tmp_path / "store" / "features").rglob("*.parquet"))
    assert len(files) == 3 + 2 + 4  # id train/val/test, 2 ood val, 4 ood test
    for f in files:
        frame = pd.read_parquet(f)
        meta = {k.decode(): v.decode() for k, v in pq.read_schema(f).metadata.items()}
        assert {"index", "label", "logits", "penultimate", "conv2"} <= set(frame.columns)
        assert frame["index"].is_unique
        assert len(frame["logits"].iloc[0]) == 6 and len(frame["penultimate"].iloc[0]) == 128
        assert meta["ood_sweep.backbone_key"] and meta["ood_sweep.dataset"] and meta["ood_sweep.split"]
        assert "conv2" in meta["ood_sweep.layers"]


def test_mlflow_nested_runs_and_artifacts(first_sweep, tmp_path):
    _, _, cfg, _ = first_sweep
    client, runs = _runs(cfg.tracking_uri, "e2e")
    by_id = {r.info.run_id: r for r in runs}
    stages = [r.data.tags.get("stage") for r in runs]
    assert stages.count("sweep") == 1 and stages.count("train") == 1 and stages.count("detector") == 4
    assert stages.count("trial") == 2 + 2 + 1 + 2
    sweep = next(r for r in runs if r.data.tags["stage"] == "sweep")
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        stage = r.data.tags["stage"]
        if stage == "sweep":
            assert parent is None
        elif stage in ("train", "detector"):
            assert parent == sweep.info.run_id
        else:
            assert by_id[parent].data.tags["stage"] == "detector"
            # a trial scores the validation sets only; the detector run holds the selected one's test metrics
            assert any(k.startswith("val_") for k in r.data.metrics)
            assert not any(k.startswith("test/") for k in r.data.metrics)
            assert any(k.startswith("test/") for k in by_id[parent].data.metrics)
    names = {a.path for a in client.list_artifacts(sweep.info.run_id)}
    assert {"results.csv", "results.parquet", "config", "roc_cnn-s0.png", "detector_comparison.png",
            "summary.html"} <= names
    page = client.download_artifacts(sweep.info.run_id, "summary.html", str(tmp_path))
    page = open(page).read()
    assert page.count("<tr>") == 1 + 4 and page.count("data:image/png;base64,") >= 2  # table, comparison, ROC grid
    assert page.index("detector_comparison.png") < page.index("roc_cnn-s0.png")
    assert sweep.data.tags["optimistic"] == "false"
    train = next(r for r in runs if r.data.tags["stage"] == "train")
    assert len(client.get_metric_history(train.info.run_id, "val_acc")) == 6
    assert client.list_artifacts(train.info.run_id, "checkpoint")
    det = next(r for r in runs if r.data.tags["stage"] == "detector")
    assert {"roc.png", "scores.png"} <= {a.path for a in client.list_artifacts(det.info.run_id)}
    # every detector run says which backbone it scored, so MLflow's table groups runs by objective or arch
    for det in (r for r in runs if r.data.tags["stage"] == "detector"):
        assert det.data.tags["objective"] == "cross_entropy" and det.data.tags["backbone_name"] == "cnn"
        assert det.data.tags["arch"] == "small_cnn"


def test_second_run_reuses_everything_and_changed_search_recomputes_only_itself(first_sweep, capsys):
    tmp_path, raw, cfg, rows = first_sweep
    capsys.readouterr()
    again = SweepRunner(parse_config(copy.deepcopy(raw)), "").run()
    out = capsys.readouterr().out
    assert "reusing cached checkpoint" in out
    assert "reusing 9 of 9 cached feature files" in out
    assert "reusing 4 of 4 cached searches" in out
    assert [r["near/auroc"] for r in again] == [r["near/auroc"] for r in rows]
    _, runs = _runs(cfg.tracking_uri, "e2e")
    names = {flag: set(r.info.run_name for r in runs if r.data.tags.get("stage") == "trial" and
                          r.data.tags.get("detector") == "MaxSoftmax" and r.data.tags.get("cached") == flag)
             for flag in ("false", "true")}
    assert names["false"] == names["true"] == {"MaxSoftmax t=1", "MaxSoftmax t=1000"}  # fresh and cached alike

    changed = copy.deepcopy(raw)
    changed["detectors"][3]["search"]["percentile"]["grid"] = [85, 95]
    third = SweepRunner(parse_config(changed), "").run()
    out = capsys.readouterr().out
    assert "reusing 3 of 4 cached searches" in out
    assert "1 searches, 2 trials" in out
    assert third[3]["selected"]["percentile"] in (85, 95)
    assert [r["near/auroc"] for r in third[:3]] == [r["near/auroc"] for r in rows[:3]]
    client, runs = _runs(cfg.tracking_uri, "e2e")
    assert sum(r.data.tags.get("stage") == "sweep" for r in runs) == 3
    assert sum(r.data.tags.get("stage") == "train" and r.data.tags.get("cached") == "true" for r in runs) == 2


def test_report_prints_latest_table(first_sweep, capsys):
    from orchestrator.cli import main

    tmp_path, raw, _, rows = first_sweep
    cfg_file = tmp_path / "e2e.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["report", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    for det in ("MaxSoftmax", "EnergyBased", "Mahalanobis", "ReAct"):
        assert det in out
    assert "ID test accuracy" in out


def test_ui_serves_the_sweep_store_on_localhost(first_sweep, monkeypatch):
    from orchestrator import cli

    tmp_path, raw, _, _ = first_sweep
    cfg_file = tmp_path / "e2e.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    seen = {}
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: seen.update(argv=argv))
    assert cli.main(["ui", str(cfg_file), "--port", "5123"]) == 0
    argv = seen["argv"]
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == raw["tracking_uri"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_corrupt_cache_files_are_detected_and_recomputed(first_sweep, capsys):
    import json as _json

    tmp_path, raw, cfg, rows = first_sweep
    store = tmp_path / "store"
    feature = sorted((store / "features").rglob("*.parquet"))[0]
    feature.write_bytes(feature.read_bytes()[: feature.stat().st_size // 2])  # a torn write
    search = sorted((store / "search").glob("*.json"))[0]
    search.write_text("{not json")
    capsys.readouterr()
    again = SweepRunner(parse_config(copy.deepcopy(raw)), "").run()
    out = capsys.readouterr().out
    assert "reusing 8 of 9 cached feature files" in out
    assert "reusing 3 of 4 cached searches" in out
    pd.read_parquet(feature)  # rewritten whole
    _json.loads(search.read_text())
    assert [r["near/auroc"] for r in again] == [r["near/auroc"] for r in rows]
    _, runs = _runs(cfg.tracking_uri, "e2e")
    names = {flag: set(r.info.run_name for r in runs if r.data.tags.get("stage") == "trial" and
                          r.data.tags.get("detector") == "MaxSoftmax" and r.data.tags.get("cached") == flag)
             for flag in ("false", "true")}
    assert names["false"] == names["true"] == {"MaxSoftmax t=1", "MaxSoftmax t=1000"}  # fresh and cached alike
