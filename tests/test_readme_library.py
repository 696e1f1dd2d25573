"""The README's feature-file and library examples run as printed against a finished sweep's files.

The test does what a reader does: in a fresh folder it runs ``python -m orchestrator features FILE --json
features.json`` for the ``clean_sweep`` study (the quickstart's data) and executes the README's Python blocks
of the sections "Feature store" and "Using ``ood_core`` as a library", unchanged, in that folder. The
Mahalanobis numbers the snippet computes must be the ones the sweep logged for the same files.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from sweep_runs import ROOT, sweep_env


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    start = text.index("## Feature store\n")
    lib = text.index("## Using `ood_core` as a library\n")
    end = text.index("\n## ", lib + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], re.S)
    assert len(blocks) == 2, "the feature-file and the library example"
    return blocks


def test_readme_library_example_runs_as_written(clean_sweep, tmp_path, monkeypatch, capsys):
    cfg = clean_sweep["config"]
    done = subprocess.run([sys.executable, "-m", "orchestrator", "features", str(cfg), "--json", "features.json"],
                          cwd=tmp_path, env=sweep_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(readme_blocks()):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Mahalanobis {'auroc'" in out and "ReAct {'auroc'" in out

    from ood_core.metrics import ood_metrics

    maha, id_test, near = namespace["maha"], namespace["id_test"], namespace["near"]
    got = ood_metrics(maha.predict_features(id_test), maha.predict_features(near))
    logged = clean_sweep["results"]["Mahalanobis"][2]
    assert got["auroc"] == pytest.approx(logged["test/digits-6-9/auroc"], abs=1e-6)
    assert got["fpr95"] == pytest.approx(logged["test/digits-6-9/fpr95"], abs=1e-6)
    w, b = namespace["w"], namespace["b"]
    assert w.shape == (6, id_test.shape[1]) and b.shape == (6,)
    assert namespace["X"].shape == (len(namespace["y"]), 128)
