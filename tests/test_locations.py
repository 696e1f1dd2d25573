"""``report``, ``ui`` and ``features`` find a sweep's files as ``sweep`` does and never create a store.

The mistakes a user makes (running a command from another folder, a misspelt sweep name, listing features
before the sweep ran) end with exit 2 and one line that says where the command looked; the happy paths read
the finished study of the ``clean_sweep`` session fixture (read-only: its store is copied or linked).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestrator.cli import main
from orchestrator.locations import require_store, tracking_store
from orchestrator.errors import UserError
from sweep_runs import write_config


def _relative_config(folder: Path, name: str = "clean", **extra) -> Path:
    """The fault tests' study with the quickstart's locations: relative storage, MLflow's default store."""
    cfg = write_config(folder, name=name, **extra)
    raw = yaml.safe_load(cfg.read_text())
    raw["storage"] = "store"
    raw.pop("tracking_uri")
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A current folder that holds nothing of any sweep, MLFLOW_TRACKING_URI unset."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


# --------------------------------------------------------------------------- resolution

def test_tracking_store_resolves_like_mlflow(elsewhere, monkeypatch):
    here = str(elsewhere.resolve())
    default = tracking_store(None)
    assert (default.kind, default.path, default.relative) == ("sqlite", f"{here}/mlflow.db", True)
    assert default.absolute_uri == f"sqlite:///{here}/mlflow.db" and default.origin == "default tracking_uri"
    assert tracking_store("sqlite:////data/m.db").path == "/data/m.db"
    assert not tracking_store("sqlite:////data/m.db").relative
    assert tracking_store("sqlite:///sub/m.db").path == f"{here}/sub/m.db"
    assert (tracking_store("mlruns").kind, tracking_store("mlruns").path) == ("files", f"{here}/mlruns")
    assert tracking_store("file:///srv/mlruns").path == "/srv/mlruns"
    assert tracking_store("file:///srv/mlruns").absolute_uri == "file:///srv/mlruns"
    assert tracking_store("http://127.0.0.1:5000").kind == "remote"
    assert tracking_store("sqlite:///:memory:").kind == "memory"
    assert tracking_store("databricks").kind == "remote"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env/m.db")
    env = tracking_store(None)
    assert (env.origin, env.path) == ("MLFLOW_TRACKING_URI", "/env/m.db")
    assert tracking_store("sqlite:////cfg/m.db").origin == "tracking_uri"  # the file wins


def test_require_store_creates_nothing_and_says_where(elsewhere):
    with pytest.raises(UserError) as err:
        require_store(tracking_store(None))
    text = str(err.value)
    assert f"no MLflow store at {elsewhere.resolve()}/mlflow.db" in text
    assert "relative to the current folder" in text and "sqlite:///mlflow.db" in text
    with pytest.raises(UserError, match="folder does not exist"):
        require_store(tracking_store("mlruns"))
    (elsewhere / "mlflow.db").write_text("not a database")
    with pytest.raises(UserError, match="is not an SQLite database"):
        require_store(tracking_store(None))
    (elsewhere / "mlflow.db").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        require_store(tracking_store(None))
    with pytest.raises(UserError, match="in-memory"):
        require_store(tracking_store("sqlite://"))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mlflow.db"]


# --------------------------------------------------------------------------- user mistakes

def test_report_from_another_folder_exits_2_and_creates_nothing(tmp_path, elsewhere, capsys):
    cfg = _relative_config(tmp_path)
    assert main(["report", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"error: no MLflow store at {elsewhere.resolve()}/mlflow.db (default tracking_uri "
                          f"sqlite:///mlflow.db, relative to the current folder {elsewhere.resolve()})")
    assert "run this from the folder the sweep ran in" in err
    assert list(elsewhere.iterdir()) == []


def test_ui_from_another_folder_exits_2_and_creates_nothing(tmp_path, elsewhere, capsys):
    cfg = _relative_config(tmp_path)
    assert main(["ui", str(cfg)]) == 2  # before os.execv: nothing started
    assert f"no MLflow store at {elsewhere.resolve()}/mlflow.db" in capsys.readouterr().err
    assert main(["ui"]) == 2  # no sweep file: MLflow's default store, the same check
    assert list(elsewhere.iterdir()) == []
    raw = yaml.safe_load(cfg.read_text())
    raw["tracking_uri"] = "http://127.0.0.1:5000"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["ui", str(cfg)]) == 2
    assert "open it in a browser" in capsys.readouterr().err


def test_features_before_any_sweep_exits_2_and_says_where(tmp_path, elsewhere, capsys):
    cfg = _relative_config(tmp_path)
    assert main(["features", str(cfg), "--json", "out.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: no checkpoint or feature file of sweep 'clean' under {elsewhere.resolve()}/store "
                   f"(storage store, relative to the current folder {elsewhere.resolve()}): run this from the "
                   "folder the sweep ran in, or set an absolute storage")
    assert list(elsewhere.iterdir()) == []  # neither the storage folder nor the JSON file


# --------------------------------------------------------------------------- happy paths on a finished sweep

def test_report_and_unknown_experiment_from_the_sweep_folder(clean_sweep, tmp_path, monkeypatch, capsys):
    clean = clean_sweep["config"]
    shutil.copy(clean.parent / "mlflow.db", tmp_path / "mlflow.db")  # a copy: this test may write to it
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _relative_config(tmp_path)
    assert main(["report", cfg.name]) == 0
    out = capsys.readouterr().out
    assert "Mahalanobis" in out and "KNN" in out and "MaxSoftmax" in out

    other = _relative_config(tmp_path, name="cleen")
    assert main(["report", other.name]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: no sweep named 'cleen' in the MLflow store {tmp_path.resolve()}/mlflow.db (default "
                   f"tracking_uri sqlite:///mlflow.db, relative to the current folder {tmp_path.resolve()}); it "
                   "holds 'clean'")


def test_ui_names_the_absolute_store_it_serves(clean_sweep, tmp_path, monkeypatch):
    """The real command: its first line names the store absolutely; MLflow is given the absolute URI."""
    import signal
    import subprocess
    import sys

    from sweep_runs import sweep_env

    shutil.copy(clean_sweep["config"].parent / "mlflow.db", tmp_path / "mlflow.db")
    cfg = _relative_config(tmp_path)
    env = {k: v for k, v in sweep_env().items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "ui", cfg.name, "--port", "0"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        first = proc.stdout.readline()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the MLflow server it became, and its workers
        proc.wait()
    db = tmp_path.resolve() / "mlflow.db"
    assert first.startswith(f"MLflow UI for {db} (sqlite:///{db}) on http://127.0.0.1:0"), first


def test_features_lists_the_sweep_files(clean_sweep, tmp_path, monkeypatch, capsys):
    """Relative storage found from the sweep's folder; a damaged and a missing file are said as such."""
    store = clean_sweep["storage"]
    copy = tmp_path / "store"
    for part in ("checkpoints", "features"):
        shutil.copytree(store / part, copy / part)
    monkeypatch.chdir(tmp_path)
    cfg = _relative_config(tmp_path)
    assert main(["features", cfg.name, "--json", "files.json"]) == 0
    listing = json.loads((tmp_path / "files.json").read_text())
    table = capsys.readouterr().out
    assert listing["storage"] == str(copy.resolve())
    feats = listing["features"]
    assert [f["dataset"] for f in feats] == ["id-train", "id-val", "id-test", "digits-6-9-val", "photos-val",
                                             "digits-6-9", "gaussian-noise", "uniform-noise", "photos"]
    assert {f["status"] for f in feats} == {"ok"}
    train = feats[0]
    assert (train["backbone"], train["role"], train["split"], train["data_set"]) == ("cnn-s0", "id_train", "train",
                                                                                   "digits")
    assert train["columns"] == {"logits": 6, "penultimate": 128, "conv2": 64, "conv2.energy": 1}
    from ood_core.feature_store import read_features

    for f in feats:
        assert Path(f["path"]).parent.parent == copy.resolve() / "features"
        assert f["rows"] == len(read_features(f["path"], columns=["logits"]))
        assert f["metadata"]["dataset"] == f["dataset"]
    ckpt = listing["checkpoints"][0]
    assert ckpt["status"] == "ok" and Path(ckpt["path"]).is_file() and ckpt["arch"] == "small_cnn"
    assert "penultimate[128]" in table and train["path"] in table and ckpt["path"] in table

    Path(feats[2]["path"]).write_bytes(Path(feats[2]["path"]).read_bytes()[:-100])  # a truncated footer
    os.remove(feats[5]["path"])
    assert main(["features", cfg.name, "--json", "files.json"]) == 0
    again = json.loads((tmp_path / "files.json").read_text())["features"]
    assert again[2]["status"] == "unreadable" and "not a readable Parquet file" in again[2]["error"]
    assert again[5]["status"] == "missing" and again[5]["columns"]["penultimate"] == 128
    table = capsys.readouterr().out
    assert "unreadable:" in table and "not extracted yet" in table


# --------------------------------------------------------------------------- library functions

def test_describe_feature_file(tmp_path):
    from ood_core.feature_store import FeatureWriter, describe_feature_file

    uri = tmp_path / "f.parquet"
    with FeatureWriter(uri, {"dataset": "d", "split": "test"}) as w:
        w.write(np.arange(5), np.zeros(5), {"vec": np.ones((5, 3)), "maps": np.ones((5, 2, 2, 2)),
                                            "s": np.ones(5)})
    info = describe_feature_file(uri)
    assert info.rows == 5 and info.complete
    assert info.columns == {"vec": (3,), "maps": (2, 2, 2), "s": ()}
    assert [info.width(c) for c in info.columns] == [3, 8, 1]
    assert info.metadata["dataset"] == "d" and info.metadata["split"] == "test"
    with pytest.raises(FileNotFoundError):
        describe_feature_file(tmp_path / "none.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(ValueError, match="bad.parquet is not a readable Parquet file"):
        describe_feature_file(tmp_path / "bad.parquet")


def test_load_head_reads_the_final_linear_layer(tmp_path):
    from ood_core.checkpoints import CheckpointError, load_head, save_checkpoint
    from ood_core.models import build_model

    model = build_model("small_cnn", num_classes=4, in_channels=1, image_size=16, load_weights=False)
    path = str(tmp_path / "m.pt")
    sha = save_checkpoint(path, model, {"arch": "small_cnn", "num_classes": 4})
    w, b = load_head(path, expected_sha256=sha)
    assert torch.equal(w, model.head.weight.detach()) and torch.equal(b, model.head.bias.detach())
    assert w.dtype == torch.float32 and w.shape == (4, model.head.in_features)

    plain = {"module.fc.weight": torch.randn(3, 5), "module.body.weight": torch.randn(5, 5)}
    torch.save(plain, tmp_path / "plain.pt")  # a foreign state dict: DataParallel prefix, fc, no bias
    w, b = load_head(str(tmp_path / "plain.pt"))
    assert torch.equal(w, plain["module.fc.weight"]) and torch.equal(b, torch.zeros(3))

    torch.save({"body.weight": torch.randn(5, 5)}, tmp_path / "nohead.pt")
    with pytest.raises(CheckpointError, match="has no classifier head"):
        load_head(str(tmp_path / "nohead.pt"))
    save_checkpoint(str(tmp_path / "lie.pt"), model, {"num_classes": 10})
    with pytest.raises(CheckpointError, match="its head has 4 classes, its meta says 10"):
        load_head(str(tmp_path / "lie.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        load_head(str(tmp_path / "none.pt"))


def test_ui_command_opens_the_store_from_any_folder(tmp_path, elsewhere):
    from orchestrator.config import load_config
    from orchestrator.locations import ui_command

    relative = _relative_config(tmp_path)  # default sqlite:///mlflow.db: taken against the sweep's folder
    assert ui_command("clean.yaml", load_config(relative)) == f"cd {elsewhere.resolve()} && " \
                                                             "python -m orchestrator ui clean.yaml"
    absolute = write_config(tmp_path, name="abs")  # absolute storage and tracking_uri, absolute file path
    assert ui_command(str(absolute), load_config(absolute)) == f"python -m orchestrator ui {absolute}"
