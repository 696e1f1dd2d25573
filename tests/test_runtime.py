"""Worker-process setup (tasks.runtime)."""
import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120).stderr


def test_a_worker_stopped_inside_a_finalizer_prints_no_traceback():
    # what Ray does to a reused trial actor at the end of a search: an exit raised while a finalizer runs
    code = """
        import weakref
        from tasks.runtime import setup_worker
        {setup}
        class A: pass
        def stop(_ref): raise {exc}
        a = A(); r = weakref.ref(a, stop); del a
        """
    for exc in ("SystemExit(0)", "KeyboardInterrupt()"):
        assert "Traceback" in _run(code.format(setup="", exc=exc))  # Python prints it by default
        assert "Traceback" not in _run(code.format(setup="setup_worker()", exc=exc))
    # anything else still reaches the terminal
    assert "ValueError: boom" in _run(code.format(setup="setup_worker()", exc="ValueError('boom')"))
