"""Every shipped sweep file passes `python -m orchestrator validate`; the train task loads user checkpoints."""
from pathlib import Path

import pytest
import torch

from fake_data import write_all
from openood_fake import fake_checkpoints, largest_knn_k, write_root
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.fixture
def no_downloads(monkeypatch):
    from ood_core.datasets import arrays, folders

    def boom(*a, **k):
        raise AssertionError("validate tried to download")

    for src in arrays.SOURCES.values():
        monkeypatch.setattr(src, "download", boom)
    monkeypatch.setattr(folders, "DOWNLOADERS", {k: boom for k in folders.DOWNLOADERS})


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_all(root)
    return root


def test_the_benchmark_sweeps_are_shipped():
    assert {"quickstart.yaml", "cifar.yaml", "cifar100.yaml", "fashionmnist.yaml"} <= {p.name for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_file_validates(path, fake_root, monkeypatch, capsys, no_downloads, tmp_path):
    monkeypatch.setenv("OOD_SWEEP_DATA", str(fake_root))
    monkeypatch.chdir(tmp_path)
    fake_checkpoints(path, tmp_path)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["cifar.yaml", "cifar100.yaml"])
def test_validate_needs_no_data_on_disk(name, tmp_path, monkeypatch, capsys, no_downloads):
    monkeypatch.setenv("OOD_SWEEP_DATA", str(tmp_path / "empty"))
    assert main(["validate", str(ROOT / "sweeps" / name)]) == 0
    err = capsys.readouterr().err
    assert "warning: data set 'tinyimagenet' not found" in err and "Traceback" not in err


def test_sweep_refuses_missing_data_before_any_work(tmp_path, monkeypatch, capsys, no_downloads):
    """Offline and the data is not on disk: one line naming the set, the path and the remedy; exit 2."""
    monkeypatch.setenv("OOD_SWEEP_DATA", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(ROOT / "sweeps" / "cifar.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "cifar10" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".ood_sweep").exists()


def test_train_task_loads_a_user_checkpoint(tmp_path):
    from ood_core.checkpoints import CheckpointError, load_checkpoint
    from ood_core.data import DATASETS
    from ood_core.models import build_model
    from tasks.train import train_backbone

    fmt = DATASETS["digits"].default_format
    user = build_model("small_cnn", num_classes=6, in_channels=1, image_size=16, seed=9)
    torch.save({"model": {"module." + k: v for k, v in user.state_dict().items()}}, tmp_path / "user.pth")
    backbone = {"key": "k1", "label": "cnn-s0", "arch": "small_cnn", "params": {}, "seed": 0, "train": {},
                "checkpoint_uri": str(tmp_path / "ckpt" / "k1.pt"), "checkpoint": str(tmp_path / "user.pth")}
    id_data = {"dataset": "digits", "params": {"classes": [0, 1, 2, 3, 4, 5]}, "seed": 0}
    out = train_backbone(backbone, 6, fmt.to_dict(), id_data)
    assert len(out["source_sha256"]) == 64 and out["history"] == [] and 0 <= out["evaluation"]["acc"] <= 1
    state, meta = load_checkpoint(backbone["checkpoint_uri"], expected_sha256=out["sha256"])
    assert meta["source_sha256"] == out["source_sha256"]
    assert all(torch.equal(state[k], v) for k, v in user.state_dict().items())
    again = train_backbone(backbone, 6, fmt.to_dict(), id_data)  # cached: same file, same record
    assert again["cached"] and again["sha256"] == out["sha256"] and again["source_sha256"] == out["source_sha256"]
    wrong = dict(backbone, key="k2", checkpoint_uri=str(tmp_path / "ckpt" / "k2.pt"))
    with pytest.raises(CheckpointError, match="shape mismatches: head.weight"):
        train_backbone(wrong, 4, fmt.to_dict(), dict(id_data, params={"classes": [0, 1, 2, 3]}))


OPENOOD = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet200": "imagenet200", "imagenet1k": "imagenet1k"}


def test_the_openood_sweeps_are_shipped():
    assert {f"openood_{b}.yaml" for b in OPENOOD} <= {p.name for p in SWEEPS}


@pytest.mark.parametrize("bench", sorted(OPENOOD))
def test_openood_sweep_follows_openood_v15(bench, tmp_path, monkeypatch, capsys, no_downloads):
    """The shipped sweep reads OpenOOD's own lists (its OOD val set, near and far sets in v1.5's order), loads its
    s0/s1/s2 checkpoints (ImageNet-1K: torchvision's ResNet-50 V1), and validates with no data warning on a fake
    OpenOOD data root; with no data and no checkpoints it only warns."""
    import yaml
    from ood_core.datasets import openood

    path = ROOT / "sweeps" / f"openood_{bench}.yaml"
    cfg = yaml.safe_load(path.read_text())
    b = openood.CATALOGUE[bench]
    name = openood.dataset_name(bench)
    assert cfg["data"]["id"]["dataset"] == name and cfg["data"]["id"].get("params", {}).get("set", "id") == "id"
    assert [(d["dataset"], d["split"], d["params"]["set"]) for d in cfg["data"]["ood_val"]] == [(name, "val", b.ood_val)]
    for group in ("near", "far"):
        sets = cfg["data"]["ood_test"][group]
        assert [d["params"]["set"] for d in sets] == b.sets_of(group)
        assert all(d["dataset"] == name and d.get("split", "test") == "test" for d in sets)
    ckpts = [bb.get("checkpoint") for bb in cfg["backbones"]]
    if bench == "imagenet1k":
        # torchvision's ResNet-50 V1 weights file, loaded as a checkpoint (a backbone without one would be trained)
        assert cfg["backbones"] == [{"name": "resnet50", "arch": "resnet50_imagenet",
                                     "checkpoint": "weights/resnet50-0676ba61.pth", "seeds": [0]}]
    else:
        assert [c.rsplit("/", 2)[-2:] for c in ckpts] == [[f"s{i}", "best.ckpt"] for i in range(3)]
    # OpenOOD's fit split: ReAct, TempScale and KLM fit on ID val (their postprocessors' setup), the others on train
    assert {d["type"] for d in cfg["detectors"] if d.get("fit_on") == "val"} == {"ReAct", "TemperatureScaling",
                                                                                 "KLMatching"}
    text = path.read_text()
    assert "benchmark_imglist/" in text and "download.py" in text  # the comment saying what must be on disk

    monkeypatch.chdir(tmp_path)
    fake_checkpoints(path, tmp_path)
    # enough ID training rows for the largest KNN k (a few images, repeated)
    root = write_root(tmp_path / "openood", bench, train_rows=largest_knn_k(path), per_list=2)
    monkeypatch.setenv("OOD_SWEEP_DATA", str(root))
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert "ok" in captured.out and "warning: data set" not in captured.err, captured.err

    monkeypatch.setenv("OOD_SWEEP_DATA", str(tmp_path / "empty"))
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: data set '{name}:id' not found" in err and "Traceback" not in err
