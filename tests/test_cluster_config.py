"""The shipped cluster-launcher files pass Ray's own validation (the one `ray up` runs)."""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_file_passes_ray_validation(name):
    cfg = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert any("pip install" in c and "ood-sweep" in c for c in cfg["setup_commands"])


def test_validation_rejects_a_broken_file():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))
