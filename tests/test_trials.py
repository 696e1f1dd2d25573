"""What a search computes: trials score the validation sets only, a fit is reused across the values of
hyperparameters declared ``structural=False``, and the selected configuration is scored on the test sets once
(or, opted in, every trial on the test sets too)."""
import json
from pathlib import Path

from sweep_runs import results_of, run_counts_of, run_sweep, write_config

TESTS = Path(__file__).resolve().parent


def test_fits_are_reused_across_non_structural_values(tmp_path, clean_sweep, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    log = tmp_path / "fits.log"
    cfg = write_config(tmp_path, name="reuse", storage=str(clean_sweep["storage"]), detectors=[
        {"type": "failing_detector:CountingFits", "name": "Counting", "params": {"log": str(log)},
         "search": {"scale": {"grid": [1.0, 2.0]}, "offset": {"grid": [0.0, 1.0, 2.0, 3.0]}}},
    ])
    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    assert "1 searches, 8 trials" in out
    assert "[test] 1 of 1 selected configurations scored on the test sets by the last trial of their search" in out
    fits = log.read_text().splitlines()
    # 8 trials and the test scoring (by the search's last trial, in its worker): without reuse 9 fits; with it,
    # one per (worker process, scale), 2 trial workers at most
    assert len(fits) == len(set(fits)), fits  # no process fitted the same scale twice
    assert len(fits) <= 2 * 2, fits
    counts, runs = run_counts_of(cfg)
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert len(trials) == 8 and all(r.info.status == "FINISHED" for r in trials)


def test_trials_score_validation_and_the_selected_configuration_is_tested_once(tmp_path, clean_sweep):
    """The clean study: trial runs hold validation metrics only, the detector run the test metrics of the
    selected trial; opting in to test scoring of every trial selects the same and reports the same."""
    counts, runs = run_counts_of(clean_sweep["config"])
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert trials and all(any(k.startswith("val_") for k in r.data.metrics) and
                          not any(k.startswith(("test/", "near/", "far/")) for k in r.data.metrics) for r in trials)
    detectors = [r for r in runs if r.data.tags.get("stage") == "detector"]
    assert detectors and all("near/auroc" in r.data.metrics and "test/photos/auroc" in r.data.metrics
                             for r in detectors)
    sweep = next(r for r in runs if r.data.tags.get("stage") == "sweep")
    assert {"seconds/train", "seconds/search", "seconds/report"} <= set(sweep.data.metrics)
    # run names say what a run is; a training run lasts as long as the training did
    assert {r.info.run_name for r in trials if r.data.tags["detector"] == "KNN"} == \
        {"KNN k=1", "KNN k=5", "KNN k=10", "KNN k=20"}
    train = next(r for r in runs if r.data.tags.get("stage") == "train" and r.data.tags["cached"] == "false")
    assert train.info.run_name == "train cnn (small_cnn) seed 0"
    assert train.info.end_time - train.info.start_time >= 0.9 * 1000 * train.data.metrics["train_seconds"] > 1000
    for cached in (r for r in runs if r.data.tags.get("stage") == "train" and r.data.tags["cached"] == "true"):
        assert "train_seconds" not in cached.data.metrics  # it trained nothing (not a training time of 0 s)

    every = write_config(tmp_path, name="every", storage=str(clean_sweep["storage"]),
                         search={"score_test_every_trial": True})
    out_json = tmp_path / "results.json"
    code, out, _ = run_sweep_json(every, out_json)
    assert code == 0, out[-3000:]
    assert "every trial scored on test too" in out
    assert results_of(every) == clean_sweep["results"]
    counts, runs = run_counts_of(every)
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert trials and all("near/auroc" in r.data.metrics for r in trials)
    written = json.loads(out_json.read_text())
    assert {"train", "extract", "search", "test", "report"} <= set(written["stages"])
    assert abs(sum(written["stages"].values()) - written["sweep_seconds"]) < 1.0
    assert [r["detector"] for r in written["rows"]] == ["MaxSoftmax", "KNN", "Mahalanobis"]


def run_sweep_json(cfg, out_json):
    """The sweep CLI with ``--json``."""
    import subprocess
    import sys

    from sweep_runs import sweep_env

    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(cfg), "--json", str(out_json)],
                          cwd=cfg.parent, env=sweep_env(), capture_output=True, text=True, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr, False


def test_the_head_of_a_trial_is_read_without_building_the_backbone(tmp_path, monkeypatch):
    """Head-based trials read ``head.weight`` / ``head.bias`` from the checkpoint's state dict (no backbone built,
    ~100 MB less per trial process for a ResNet-50); the tensors are the built model's head."""
    import torch

    import tasks.runtime
    from ood_core.checkpoints import save_checkpoint
    from ood_core.models import build_model
    from tasks import evaluate

    fmt = {"channels": 1, "image_size": 16, "mean": [0.5], "std": [0.5]}
    model = build_model("small_cnn", num_classes=4, in_channels=1, image_size=16, load_weights=False)
    uri = str(tmp_path / "m.pt")
    save_checkpoint(uri, model, {"arch": "small_cnn"})
    backbone = {"checkpoint_uri": uri, "arch": "small_cnn", "params": {}}
    built = []
    real = tasks.runtime.load_backbone
    monkeypatch.setattr(tasks.runtime, "load_backbone", lambda *a: built.append(a) or real(*a))
    evaluate._head.cache_clear()
    w, b = evaluate._head(json.dumps(backbone), 4, json.dumps(fmt))
    assert not built
    torch.testing.assert_close(w, model.head.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(b, model.head.bias.detach(), rtol=0, atol=0)
    # a checkpoint whose head has another class count than the sweep's: the built model decides (and refuses)
    evaluate._head.cache_clear()
    try:
        evaluate._head(json.dumps(backbone), 5, json.dumps(fmt))
    except Exception:
        pass
    assert built
    evaluate._head.cache_clear()


def test_searches_that_share_a_training_statistic_do_not_start_side_by_side():
    """Mahalanobis and RMD of one backbone share the class moments (the first fit computes them, the other
    waits): the search order puts another search between them where it can, keeps the order otherwise, and
    the statistics of other backbones do not collide."""
    from ood_core.detectors.registry import get_spec
    from orchestrator.search import spread_shared_statistics

    def entries(*keys):
        return [{"key": k} for k in keys]

    def stats(e):
        backbone, name = e["key"].split("/")
        return [(backbone, s) for s in get_spec(name).cls.shared_statistics]

    order = [e["key"] for e in spread_shared_statistics(
        entries("a/Mahalanobis", "a/RMD", "a/ViM", "a/KNN", "a/EnergyBased"), stats)]
    assert order == ["a/Mahalanobis", "a/ViM", "a/RMD", "a/KNN", "a/EnergyBased"]
    keep = ["a/Mahalanobis", "b/RMD", "a/KNN", "a/RMD"]  # nothing adjacent shares: unchanged
    assert [e["key"] for e in spread_shared_statistics(entries(*keep), stats)] == keep
    # nothing else to put between them: the order stays
    assert [e["key"] for e in spread_shared_statistics(entries("a/Mahalanobis", "a/RMD"), stats)] == \
        ["a/Mahalanobis", "a/RMD"]
