"""Failure semantics: a failed trial is recorded and shown, never hidden, retried or cached as complete.

The study shares the clean reference run's store (checkpoint and features cached); a detector of the tests'
own (``tests/failing_detector.py``, given by import path) fails for some searched values.
"""
from pathlib import Path

from sweep_runs import config_of, run_counts_of, run_sweep, write_config

TESTS = Path(__file__).resolve().parent


def test_failed_trials_are_recorded_shown_and_rerun(tmp_path, clean_sweep, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    cfg = write_config(tmp_path, name="failures", storage=str(clean_sweep["storage"]), detectors=[
        {"type": "MaxSoftmax", "search": {"t": {"grid": [1, 10]}}},
        {"type": "failing_detector:FailingAbove", "name": "Partial", "params": {"limit": 1},
         "search": {"value": {"grid": [0, 1, 2]}}},
        {"type": "failing_detector:FailingAbove", "name": "AllFail", "params": {"limit": 0},
         "search": {"value": {"grid": [1, 2]}}},
    ])
    code, out, _ = run_sweep(cfg)
    assert code == 1, out[-3000:]
    assert "Traceback" not in out and "RayTaskError" not in out
    lines = out.splitlines()
    row = {name: next(l for l in lines if l.startswith("cnn-s0") and f" {name} " in l) for name in ("Partial", "AllFail")}
    assert "value=0" in row["Partial"] and " 2/3 " in row["Partial"]  # equal scores: the first trial
    assert "FAILED" in row["AllFail"] and " 0/2 " in row["AllFail"]
    assert "  ! Partial @ cnn-s0: 2/3 trials; value=2: ValueError: value 2 is above the limit 1" in lines
    assert any(l.startswith("  ! AllFail @ cnn-s0: FAILED") and "value 1 is above the limit 0" in l for l in lines)
    assert "failed: AllFail @ cnn-s0: every trial failed; ValueError: value 1 is above the limit 0" in lines
    assert "failed: Partial @ cnn-s0: 2/3 trials finished; ValueError: value 2 is above the limit 1" in lines
    assert next(l for l in lines if l.startswith("cnn-s0") and " MaxSoftmax " in l).split()[-1] != "-"

    counts, runs = run_counts_of(cfg)
    failed = [r for r in runs if r.data.tags.get("stage") == "trial" and r.info.status == "FAILED"]
    assert len(failed) == 3  # value=2 of Partial, both of AllFail: each once (a deterministic error is not retried)
    assert all(r.data.tags["error"].startswith("ValueError: value") and "retries" not in r.data.tags for r in failed)
    detector = {r.data.tags["detector"]: r for r in runs if r.data.tags.get("stage") == "detector"}
    assert detector["AllFail"].info.status == "FAILED" and "limit 0" in detector["AllFail"].data.tags["error"]
    assert detector["Partial"].info.status == "FINISHED" and detector["MaxSoftmax"].info.status == "FINISHED"

    # a search with failed trials is not cached as complete: the rerun runs those two again, from scratch
    code, again, _ = run_sweep(cfg)
    assert code == 1
    assert "[search] reusing 1 of 3 cached searches" in again and "2 searches, 5 trials" in again
    assert config_of(cfg)["name"] == "failures"


def test_collapsed_training_and_constant_scores_are_flagged(tmp_path, monkeypatch):
    """A backbone left at its initial weights (lr ~ 0) is at chance; a detector scoring everything alike ranks
    nothing: both are said in the table's problems and tagged in MLflow (the sweep itself succeeds)."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    cfg = write_config(tmp_path, name="collapsed", detectors=[
        {"type": "MaxLogit"}, {"type": "failing_detector:ConstantScores"}])
    raw = config_of(cfg)
    raw["backbones"][0]["train"].update(epochs=1, lr=1e-12)
    import yaml

    cfg.write_text(yaml.safe_dump(raw))
    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    assert "  ! ConstantScores @ cnn-s0: constant scores (it ranks nothing: AUROC 50, FPR95 100)" in out
    assert "  ! backbone cnn-s0: ID test accuracy " in out and "is at chance (16.67%): training collapsed" in out
    _, runs = run_counts_of(cfg)
    sweep = next(r for r in runs if r.data.tags.get("stage") == "sweep")
    assert sweep.data.tags["collapsed_backbones"] == "cnn-s0" and "constant scores" in sweep.data.tags["problems"]
    detector = {r.data.tags["detector"]: r for r in runs if r.data.tags.get("stage") == "detector"}
    assert detector["ConstantScores"].data.tags.get("constant_scores") == "true"
    assert "constant_scores" not in detector["MaxLogit"].data.tags


def test_a_fully_cached_rerun_starts_no_ray(clean_sweep):
    """Every stage cached: nothing is scheduled, so Ray is not started at all (before, ``ray.get([])`` started
    it implicitly with its own defaults: Tune's banner, a TensorBoard hint, ~8 s)."""
    code, out, _ = run_sweep(clean_sweep["config"])
    assert code == 0, out[-3000:]
    assert "reusing cached checkpoint" in out and "reusing 3 of 3 cached searches" in out
    for word in ("Ray", "TensorBoard", "Tune", "ray_results"):
        assert word not in out, out


def test_a_damaged_interrupted_search_state_is_set_aside(tmp_path, clean_sweep):
    """Tune's saved state of an interrupted search (``tuner.pkl``, unpickled on resume) that cannot be restored
    is set aside in one line and the search starts again, instead of blocking every rerun."""
    from orchestrator.config import load_config
    from orchestrator.plan import content_key
    from orchestrator.sweep import absolute_storage

    cfg = write_config(tmp_path, name="restore", storage=str(clean_sweep["storage"]), detectors=[
        {"type": "ViM", "search": {"d": {"grid": [8, 16]}}}])
    parsed = load_config(cfg)
    parsed = parsed.model_copy(update={"storage": absolute_storage(parsed.storage)})
    state = Path(parsed.storage) / "tune" / f"restore-{content_key({'config': parsed.model_dump()})[:12]}"
    state.mkdir(parents=True)
    (state / "tuner.pkl").write_bytes(b"\x80\x04 damaged" * 64)
    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    assert "[search] interrupted search state cannot be restored" in out and "starting the search again" in out
    aside = list(state.parent.glob("restore-*.damaged-*"))
    assert len(aside) == 1 and (aside[0] / "tuner.pkl").read_bytes() == b"\x80\x04 damaged" * 64
    assert "Traceback" not in out
