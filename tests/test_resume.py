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


def test_ctrl_c_is_recorded_and_raised_in_the_sweeps_own_code():
    """The first SIGINT is only recorded (raised where Python would swallow it, e.g. an at-fork hook, it
    would print a stray traceback and be lost); the driver's next poll raises it. Inside ``interruptible``
    (Tune's loop) and on a second Ctrl-C it raises at once."""
    import signal as _signal

    from orchestrator.interrupts import interruptible, latched_sigint, raise_if_interrupted

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with latched_sigint():
            _signal.raise_signal(_signal.SIGINT)
            reached.append("recorded, not raised")
            raise_if_interrupted()
            reached.append("never")
    assert reached == ["recorded, not raised"]
    raise_if_interrupted()  # nothing stays latched once the block is left

    with latched_sigint():
        with pytest.raises(KeyboardInterrupt):
            with interruptible():
                _signal.raise_signal(_signal.SIGINT)
                reached.append("never")
    with latched_sigint():
        _signal.raise_signal(_signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            _signal.raise_signal(_signal.SIGINT)  # a second Ctrl-C: at once
    assert reached == ["recorded, not raised"]
