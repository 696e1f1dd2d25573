"""Layer selection presets, the per-layer analysis (direction fixed on validation) and list search specs."""
import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from ood_core.hooks import select_layers
from ood_core.layer_analysis import logits_energy, per_layer_table
from ood_core.metrics import auroc
from ood_core.models import build_model
from orchestrator.config import ConfigError, parse_config
from orchestrator.plan import make_plan
from orchestrator.search import entry_variants, is_random

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return build_model("small_cnn", num_classes=6, in_channels=1, image_size=16)


def test_presets_and_selectors(model):
    all_layers = select_layers(model, preset="all")
    assert all_layers == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "head"]
    blocks = select_layers(model, preset="blocks")
    assert blocks and all(b in dict(model.named_modules()) for b in blocks)
    assert select_layers(model, preset="penultimate") == blocks[-1:]
    assert select_layers(model, types=["BatchNorm2d"]) == ["bn1", "bn2", "bn3"]
    assert select_layers(model, pattern="conv*") == ["conv1", "conv2", "conv3"]
    with pytest.raises(ValueError):
        select_layers(model, preset="everything")


def _raw(**changes):
    raw = yaml.safe_load((ROOT / "sweeps" / "layers.yaml").read_text())
    raw.update(changes)
    return raw


def test_plan_expands_presets_into_columns():
    plan = make_plan(parse_config(_raw()))
    cols = plan.backbones[0].columns
    assert {"logits", "penultimate", "conv1.energy", "bn2.energy", "head.energy", "conv1", "conv2"} <= set(cols)
    assert len(cols) == len(set(cols))


def test_layer_detector_needs_extracted_columns():
    raw = _raw()
    raw["detectors"] = [{"type": "MultiMahalanobis", "params": {"layers": ["conv1", "conv9"]}}]
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.params\.layers\[1\]: 'conv9' is not extracted"):
        make_plan(parse_config(raw))
    raw["detectors"] = [{"type": "MultiMahalanobis"}]
    with pytest.raises(ConfigError, match=r"detectors\[0\]\.params\.layers: MultiMahalanobis needs"):
        make_plan(parse_config(raw))


@pytest.mark.parametrize("layer,message", [
    ({"preset": "all", "module": "conv1"}, "module names one layer"),
    ({"reduction": "energy"}, "give module, preset, types or pattern"),
    ({"preset": "every"}, "extract.layers[2].preset"),
    ({"name": "x", "preset": "all"}, "only a single module can be renamed"),
])
def test_bad_layer_selectors(layer, message):
    raw = _raw()
    raw["extract"]["layers"][2] = layer
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_direction_is_fixed_on_validation_not_test():
    rng = np.random.default_rng(0)
    n = 400
    # layer 0: OOD has HIGHER energy on val and test; layer 1: LOWER on val, but higher on test
    id_val = rng.normal(0, 1, (n, 2))
    ood_val = np.c_[rng.normal(2, 1, n), rng.normal(-2, 1, n)]
    id_test = rng.normal(0, 1, (n, 2))
    ood_test = {"x": np.c_[rng.normal(2, 1, n), rng.normal(2, 1, n)]}
    rows = per_layer_table(["a", "b"], id_val, ood_val, id_test, ood_test)
    assert [r["sign"] for r in rows] == [1, -1]
    assert rows[0]["auroc/x"] > 0.9
    # the sign chosen on validation is kept even though it is wrong for this test set
    assert rows[1]["auroc/x"] == pytest.approx(auroc(-id_test[:, 1], -ood_test["x"][:, 1]))
    assert rows[1]["auroc/x"] < 0.1
    assert all(r["val_auroc"] >= 0.5 for r in rows)


def test_logits_energy_matches_formula():
    z = np.random.default_rng(1).normal(size=(5, 4)) * 30
    ref = [-np.log(np.sum(np.exp(row - row.max()))) - row.max() for row in z]
    np.testing.assert_allclose(logits_energy(z), ref, rtol=1e-12)


def test_list_search_specs():
    cfg = _raw()
    parse_config(cfg)  # MultiMahalanobis alpha: a list of uniform specs
    space = {"alpha": [{"uniform": [0, 1]}, {"uniform": [0, 1]}, 0.5]}
    assert is_random(space)
    points = entry_variants(space, 5, 0, "key")
    assert len(points) == 5 and all(len(p["alpha"]) == 3 and p["alpha"][2] == 0.5 for p in points)
    assert len({tuple(p["alpha"]) for p in points}) == 5
    assert points == entry_variants(space, 5, 0, "key")  # seeded per entry
    bad = copy.deepcopy(cfg)
    bad["detectors"][4]["search"]["alpha"][1] = {"uniform": [1, 0]}
    with pytest.raises(ConfigError, match=r"detectors\[4\]\.search\.alpha\[1\]\.uniform"):
        parse_config(bad)


def test_optuna_space_round_trip():
    optuna = pytest.importorskip("optuna")
    from orchestrator.search import OptunaSpace
    from tasks.evaluate import entry_of

    space = OptunaSpace({"alpha": [{"uniform": [0, 1]}, {"loguniform": [0.1, 10]}], "k": {"randint": [1, 3]},
                         "variant": {"grid": ["a", "b"]}, "fixed": 7}, "bb/det", {"detector": "det"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        const = space(trial)
        key, params = entry_of({**trial.params, **const})
        assert key == "bb/det"
        assert 0 <= params["alpha"][0] <= 1 and 0.1 <= params["alpha"][1] <= 10
        assert params["k"] in (1, 2, 3) and params["variant"] in ("a", "b") and params["fixed"] == 7
        seen.add(params["k"])
        study.tell(trial, 0.0)
    assert seen == {1, 2, 3}  # randint includes both ends
