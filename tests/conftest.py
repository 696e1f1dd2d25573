import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# the node-local decoded copies of feature files (ood_core.feature_map) of this test session, removed at its end
_FEATURE_CACHE = tempfile.mkdtemp(prefix="ood-sweep-features-tests-")
os.environ.setdefault("OOD_SWEEP_FEATURE_CACHE", _FEATURE_CACHE)
atexit.register(shutil.rmtree, _FEATURE_CACHE, True)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for every test that needs Ray (2 CPUs, no dashboard)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def clean_sweep(tmp_path_factory):
    """One uninterrupted run of the fault tests' study (``tests/sweep_runs.py``), the reference that
    resumed, lost-node and concurrent runs are compared with: ``{"config", "storage", "results"}``."""
    from sweep_runs import results_of, run_sweep, write_config

    cfg = write_config(tmp_path_factory.mktemp("clean"), name="clean")
    code, out, _ = run_sweep(cfg)
    assert code == 0, out[-3000:]
    return {"config": cfg, "storage": cfg.parent / "store", "results": results_of(cfg)}
