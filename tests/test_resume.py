"""Kill-and-resume: a sweep killed (SIGKILL, SIGINT) at several points and started again with the
same command finishes with the results of an uninterrupted run and without duplicated MLflow runs."""
import signal

import pytest

from sweep_runs import EXPECTED_RUNS, results_of, run_counts_of, run_sweep, write_config


def test_sigkill_during_search_then_resume(clean_sweep, tmp_path):
    cfg = write_config(tmp_path)
    code, out, fired = run_sweep(cfg, kill_after="[search]", delay=3.0)
    assert fired and code != 0, out[-2000:]
    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    assert "resuming the interrupted sweep run" in out
    assert results_of(cfg) == clean_sweep["results"]
    counts, runs = run_counts_of(cfg)
    assert counts == EXPECTED_RUNS, counts
    assert all(r.info.status == "FINISHED" for r in runs)


def test_ctrl_c_during_training_stops_cleanly_and_says_how_to_resume(clean_sweep, tmp_path):
    cfg = write_config(tmp_path)
    code, out, fired = run_sweep(cfg, kill_after="[train]", sig=signal.SIGINT, delay=1.0)
    assert fired
    assert code == 130, out[:1500] + "\n...\n" + out[-2500:]
    assert "run the same command again to resume" in out
    assert "Traceback" not in out
    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    assert results_of(cfg) == clean_sweep["results"]
    counts, _ = run_counts_of(cfg)
    assert counts == EXPECTED_RUNS, counts


def test_a_swallowed_ctrl_c_still_stops_the_sweep_at_the_next_boundary():
    """SIGINT raised inside code that swallows KeyboardInterrupt (a destructor, a catch-all handler)
    is remembered, and the next stage boundary raises it again."""
    import signal as _signal

    from orchestrator.interrupts import latched_sigint, raise_if_interrupted

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with latched_sigint():
            try:
                _signal.raise_signal(_signal.SIGINT)
            except BaseException:  # noqa: BLE001 - a library swallowing it
                pass
            reached.append("after")
            raise_if_interrupted()
            reached.append("never")
    assert reached == ["after"]
    raise_if_interrupted()  # nothing stays latched once the block is left
