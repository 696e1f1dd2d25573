"""``fit_on``: the ID split a detector is fitted on (OpenOOD v1.5 fits ReAct, TempScale and KLM on ID val, the
others on ID train): validated, in the search's cache key, and a detector fitted on val sees the val rows."""
import types

import numpy as np
import pytest
import yaml

from ood_core.api import FeaturesDetector
from ood_core.constraints import Instance, Param

FITTED = []  # rows each fit of RecordsFit saw (this process)


class RecordsFit(FeaturesDetector):
    """Scores = feature norm; ``fit`` records the first feature of every row it saw (https://example.invalid, a
    test double)."""

    requires_fit = True
    parameter_constraints = {"tag": Param(Instance((str,)))}

    def __init__(self, model=None, tag: str = ""):
        super().__init__(model)
        self.tag = tag

    def _fit(self, x, y):
        FITTED.append(sorted(x[:, 0].tolist()))

    def _score(self, x):
        return x.norm(dim=1)


def _sets():
    """Four small cached sets: ID train rows have first feature 1.., ID val 100.., OOD val 200.., ID test 300.."""
    base = {"id_train": (1, 6), "id_val": (100, 4), "ood_val": (200, 4), "id_test": (300, 3)}
    out = {}
    for role, (start, n) in base.items():
        x = np.zeros((n, 3), dtype=np.float32)
        x[:, 0] = np.arange(start, start + n)
        out[role] = types.SimpleNamespace(columns={"penultimate": x, "logits": x}, labels=np.zeros(n, dtype=np.int64))
    return out


@pytest.mark.parametrize("fit_on,rows", [("train", [1, 2, 3, 4, 5, 6]), ("val", [100, 101, 102, 103]),
                                         (None, [1, 2, 3, 4, 5, 6])])
def test_the_detector_is_fitted_on_the_chosen_split(fit_on, rows, monkeypatch):
    from tasks import evaluate

    sets = _sets()
    monkeypatch.setattr(evaluate, "_read", lambda uri, columns: sets[uri])
    evaluate._FITTED.clear()
    FITTED.clear()
    context = {"detector": "test_fit_on:RecordsFit", "fixed": {"tag": str(fit_on)}, "columns": ["penultimate", "logits"],
               "backbone": {"key": "bb"}, "num_classes": 2, "format": {"std": [1.0]},
               "sets": {label.replace("_", "-"): {"uri": label, "role": label} for label in sets}, "outliers": []}
    if fit_on:
        context["fit_on"] = fit_on
    scores, _ = evaluate.score_detector_on_sets(context, {})
    assert FITTED == [rows]
    # ID val is still scored as ID val; nothing else is scored under a new name
    assert set(scores) == {"id-val", "ood-val", "id-test"}
    assert scores["id-val"].tolist() == pytest.approx([100, 101, 102, 103])


def test_fit_on_is_validated_and_defaults_to_train():
    from orchestrator.config import ConfigError, parse_config
    from sweep_runs import ROOT

    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    assert all(d.fit_on == "train" for d in parse_config(raw).detectors)
    raw["detectors"][0]["fit_on"] = "val"
    assert parse_config(raw).detectors[0].fit_on == "val"
    raw["detectors"][0]["fit_on"] = "test"  # fitting on test data is never allowed
    with pytest.raises(ConfigError, match="fit_on"):
        parse_config(raw)


def test_fit_on_is_in_the_search_key():
    """The same detector fitted on val reads other inputs (another search key); fitted on train it keeps the
    inputs, hence the cache key, it always had."""
    from ood_core.detectors.registry import get_spec
    from orchestrator.config import parse_config
    from orchestrator.search_cache import search_key
    from orchestrator.sweep import search_inputs
    from sweep_runs import ROOT

    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    raw["detectors"] = [{"type": "ReAct"}, {"type": "ReAct", "name": "react_val", "fit_on": "val"},
                        {"type": "ReAct", "name": "react_train", "fit_on": "train"}]
    cfg = parse_config(raw)
    bb = types.SimpleNamespace(features=[types.SimpleNamespace(key="f1"), types.SimpleNamespace(key="f2")])
    spec = get_spec("ReAct")
    inputs = [search_inputs(cfg, bb, det, spec) for det in cfg.detectors]
    assert inputs[0] == inputs[2] == ["f1", "f2"]
    keys = [search_key(i, spec.name, {}, {}, 1, "auroc", 0, "basic", False) for i in inputs]
    assert keys[0] == keys[2] != keys[1]
