"""Config validation: every user mistake ends with one line naming the field, exit code 2."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"


@pytest.fixture(scope="module")
def base():
    return yaml.safe_load(QUICKSTART.read_text())


def _set(cfg, path, value):
    """Set ``value`` at a dotted path with [i] indices; ``value=DELETE`` removes the key."""
    node = cfg
    parts = path.replace("]", "").replace("[", ".").split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    last = parts[-1]
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return cfg


DELETE = object()

CASES = [
    # (path to change, new value, expected start of the error message)
    ("colour", "red", "colour: unknown key"),
    ("data.id.flavour", 1, "data.id.flavour: unknown key"),
    ("seed", "zero", "seed:"),
    ("backbones[0].train.epochs", 0, "backbones[0].train.epochs:"),
    ("backbones[0].train.lr", "fast", "backbones[0].train.lr:"),
    ("backbones[0].arch", "resnet9000", "backbones[0].arch: unknown architecture 'resnet9000'"),
    ("data.id.dataset", "imagenet-42", "data.id.dataset: unknown data set 'imagenet-42'"),
    ("data.ood_test.far[0].dataset", "nope", "data.ood_test.far[0].dataset: unknown data set 'nope'"),
    ("data.ood_test.near[0].params.colour", 3, "data.ood_test.near[0].params.colour: unknown parameter"),
    ("data.ood_val[0].split", "holdout", "data.ood_val[0].split:"),
    ("detectors[2].type", "Energie", "detectors[2].type:"),
    ("detectors[6].search.percentile", {"grid": []}, "detectors[6].search.percentile.grid: must be a non-empty list"),
    ("detectors[6].search.percentile", {"uniform": [99, 85]}, "detectors[6].search.percentile.uniform: low must be smaller"),
    ("detectors[6].search.percentile", {"normal": [90, 1]}, "detectors[6].search.percentile: expected exactly one of"),
    ("detectors[2].search.t", {"loguniform": [0, 10]}, "detectors[2].search.t.loguniform: bounds must be positive"),
    ("detectors[5].search.k", {"randint": [1.5, 10]}, "detectors[5].search.k.randint: bounds must be integers"),
    ("detectors[6].search.threshhold", {"grid": [1.0]}, "detectors[6].search.threshhold: ReAct has no hyperparameter"),
    ("detectors[0].params.temperature", 2, "detectors[0].params.temperature: MaxSoftmax has no hyperparameter"),
    ("detectors", [], "detectors:"),
    ("backbones", DELETE, "backbones:"),
    ("data.ood_val", [], "data.ood_val:"),
    ("extract.layers[2].reduction", "median", "extract.layers[2].reduction:"),
    ("extract.layers[2].module", "conv99", "extract.layers[2].module: small_cnn has no module 'conv99'"),
    ("extract.layers", ["logits"], "extract.layers:"),
    ("search.metric", "accuracy", "search.metric:"),
    ("data.ood_val[0]", {"name": "leak", "dataset": "gaussian_noise", "split": "test", "params": {"n": 500}},
     "data.ood_val[0]: same data as data.ood_test.far[0]"),
    ("detectors[1].name", "MaxSoftmax", "detectors[1].name: duplicate detector name"),
    ("detectors[1]", {"type": "HeatmapOOD"}, "detectors[1].type: HeatmapOOD trains on auxiliary outliers; list them"),
    ("data.outliers", [{"dataset": "gaussian_noise", "split": "test", "params": {"n": 500}}],
     "data.outliers[0]: same data as data.ood_test.far[0]"),
    ("data.outliers", [{"dataset": "sklearn_photos", "split": "val"}], "data.outliers[0]: same data as data.ood_val[1]"),
    ("data.outliers", [{"dataset": "photos", "split": "train"}], "data.outliers[0].dataset: unknown data set 'photos'"),
    # the detectors' declared constraints: every value a search can reach
    ("detectors[6].search.percentile", {"grid": [90, 150]}, "detectors[6].search.percentile: ReAct: percentile=150 "),
    ("detectors[6].search.percentile", {"uniform": [50, 101]}, "detectors[6].search.percentile: ReAct: percentile=101 "),
    ("detectors[6].search.percentile", {"grid": [0.9]},
     "detectors[6].search.percentile: ReAct: percentile=0.9 must be in (1, 100]; it is in percent"),
    ("detectors[6].params.detector", "enrgy", "detectors[6].params.detector: ReAct: detector='enrgy' must be one of"),
    ("detectors[5].search.k", {"grid": [0, 5]}, "detectors[5].search.k: KNN: k=0 "),
    ("detectors[2].search.t", {"grid": [-1, 1]}, "detectors[2].search.t: EnergyBased: t=-1 "),
    ("detectors[4].search.d", {"randint": [0, 8]}, "detectors[4].search.d: ViM: d=0 "),
    # ... and against the data (known from the model's shapes and the data set's size, before any training)
    ("detectors[5].search.k", {"grid": [1, 5000]}, "detectors[5].search.k: KNN: k=5000 must be in [1, N=650]"),
    ("detectors[4].search.d", {"grid": [16, 128]}, "detectors[4].search.d: ViM: d=128 must be in [1, D - 1=127]"),
    # data-set parameter values, before any data is read (a traceback from validate before)
    ("data.id.params.classes", [], "data.id.params.classes: dataset 'digits': classes must be a non-empty list"),
    ("data.id.params.classes", [0, 99], "data.id.params.classes: dataset 'digits': classes must be a non-empty list of "
                                        "distinct integers in 0..9, got [0, 99]"),
    ("data.ood_test.near[0].params.classes", [6, 6], "data.ood_test.near[0].params.classes: dataset 'digits':"),
    ("data.ood_test.far[0].params.n", -5, "data.ood_test.far[0].params.n: dataset 'gaussian_noise': n must be an "
                                          "integer >= 1, got -5"),
    ("data.ood_val[1].params", {"patch": 1}, "data.ood_val[1].params.patch: dataset 'sklearn_photos': patch must be"),
    ("data.ood_val[1].params", {"fractions": [0.5, 0.5, 0.5]}, "data.ood_val[1].params.fractions: dataset "
                                                                "'sklearn_photos': fractions"),
    ("data.id", {"dataset": "textures"}, "data.id.dataset: dataset 'textures' is an OOD-only set"),
    ("data.ood_val[0]", {"dataset": "textures", "split": "val"},
     "data.ood_val[0].params.val_size: dataset 'textures': the val split is empty"),
    # numbers: sane bounds, finite
    ("backbones[0].train.epochs", 1e30, "backbones[0].train.epochs: 1e+30 is too large"),
    ("backbones[0].train.epochs", 1_000_000, "backbones[0].train.epochs: Input should be less than or equal to 10000"),
    ("backbones[0].train.lr", 1e30, "backbones[0].train.lr: Input should be less than or equal to 10"),
    ("backbones[0].train.lr", float("nan"), "backbones[0].train.lr: must be a finite number"),
    ("backbones[0].train.batch_size", 10 ** 9, "backbones[0].train.batch_size: Input should be less than or equal"),
    ("backbones[0].train.weight_decay", 5, "backbones[0].train.weight_decay: Input should be less than or equal to 1"),
    ("backbones[0].seeds", [-1], "backbones[0].seeds[0]: Input should be greater than or equal to 0"),
    ("seed", 2 ** 40, "seed: Input should be less than or equal to 4294967295"),
    ("extract.batch_size", 10 ** 9, "extract.batch_size: Input should be less than or equal"),
    ("search.num_samples", 10 ** 9, "search.num_samples: Input should be less than or equal"),
    ("data.id.format", {"std": [0.0]}, "data.id.format.std[0]: Input should be greater than 0"),
    # names that become paths: a safe character set, no way out of the folder
    ("name", "../../../tmp/x", "name: '../../../tmp/x' is not a safe name"),
    ("name", "a/b", "name: 'a/b' is not a safe name"),
    ("name", ".hidden", "name: '.hidden' is not a safe name"),
    ("backbones[0].name", "../cnn", "backbones[0].name: '../cnn' is not a safe name"),
    ("data.ood_val[0].name", "val set", "data.ood_val[0].name: 'val set' is not a safe name"),
    ("data.ood_test.far[0].name", "..", "data.ood_test.far[0].name: '..' is not a safe name"),
    ("detectors[1].name", "../../x", "detectors[1].name: '../../x' is not a safe name"),
    ("extract.layers[2].name", "c/../../d", "extract.layers[2].name: 'c/../../d' is not a safe name"),
]


@pytest.mark.parametrize("path,value,expected", CASES, ids=[c[0] + "=" + str(c[1])[:20] for c in CASES])
def test_config_error_names_field(base, tmp_path, capsys, path, value, expected):
    cfg = _set(copy.deepcopy(base), path, value)
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    code = main(["validate", str(cfg_file)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: " + expected), err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_default_spaces_adapt_to_the_data(base):
    from orchestrator.plan import make_plan

    cfg = copy.deepcopy(base)
    for det in cfg["detectors"]:
        det.pop("search", None)
    cfg["detectors"].append({"type": "NECO"})
    cfg["detectors"].append({"type": "GEN"})
    plan = make_plan(parse_config(cfg))
    searches = plan.backbones[0].searches
    assert plan.n_train == 650 and plan.backbones[0].widths["penultimate"] == 128 and plan.num_classes == 6
    assert all(d < 128 for d in searches["ViM"]["d"]["grid"])  # OpenOOD's {256, 1000} cannot fit 128-d features
    assert all(k <= 650 for k in searches["KNN"]["k"]["grid"])
    assert all(m <= 6 for m in searches["GEN"]["M"]["grid"])


def test_sweep_refuses_an_unfittable_value_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("k: {grid: [1, 5, 10, 20, 50]}", "k: {grid: [1, 5000]}"))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(bad)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: detectors[5].search.k: KNN: k=5000 must be in [1, N=650]"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".ood_sweep").exists()


def test_quickstart_is_valid(capsys):
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "ok" in capsys.readouterr().out


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["validate", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("- a list\n")
    assert main(["validate", str(bad)]) == 2


def test_yaml_errors_give_line_and_column(tmp_path, capsys):
    text = QUICKSTART.read_text()
    bad = tmp_path / "x.yaml"
    # line 14 of the file: a flow mapping left open; YAML notices at the '-' of line 15
    lines = text.splitlines()
    assert "digits-6-9-val" in lines[13] and lines[13].endswith("}}")
    lines[13] = lines[13][:-1]
    bad.write_text("\n".join(lines) + "\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {bad}:15:5: not valid YAML: expected ',' or '}}', but got '-' (while parsing a flow "
                   "mapping at line 14, column 7)"), err
    bad.write_text("name: x\nseed: 0\nseed: 1\n")  # YAML would silently keep the last one
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}:3:1: not valid YAML: duplicate key 'seed' (first given at line 2, column 1)", err
    bad.write_bytes(b"name: \xff\xfe\n")
    assert main(["validate", str(bad)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {bad}: not a UTF-8 text file")


def test_overlap_allowed_when_marked(base):
    cfg = copy.deepcopy(base)
    cfg["data"]["ood_val"][0] = dict(cfg["data"]["ood_test"]["far"][0], name="same-as-test")
    with pytest.raises(ConfigError):
        parse_config(copy.deepcopy(cfg))
    cfg["data"]["allow_val_test_overlap"] = True
    assert parse_config(cfg).data.allow_val_test_overlap


def test_tracking_uri_precedence(base, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_config(copy.deepcopy(base)).resolved_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert parse_config(copy.deepcopy(base)).resolved_tracking_uri() == "sqlite:///env.db"
    cfg = copy.deepcopy(base)
    cfg["tracking_uri"] = "sqlite:///cfg.db"
    assert parse_config(cfg).resolved_tracking_uri() == "sqlite:///cfg.db"


def test_cli_subprocess_exit_code_and_help(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("arch: small_cnn", "arch: tiny_transformer"))
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(bad)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: backbones[0].arch: unknown architecture")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow work
    helped = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    for word in ("sweep", "validate", "ui", "report"):
        assert word in helped.stdout


def test_every_grid_point_meets_the_cross_parameter_checks_before_any_work():
    """A grid whose cross product holds a point a detector refuses (VRA's lower percentile above its upper one;
    KNN's k above the bank of one alpha) is refused by the plan, naming the search and the point, not by a
    failed trial after training; grids whose points all fit pass, and random domains are checked per value."""
    from ood_core.detectors import KNN, VRA
    from orchestrator.config import check_detector_values

    data = {"D": 16, "C": 8, "N": 50000, "L": None}
    with pytest.raises(ConfigError, match=r"^detectors\[3\]\.search: VRA: lower_percentile=96 must not exceed "
                                          r"upper_percentile=90 \(at the grid point lower_percentile=96, "
                                          r"upper_percentile=90\)$"):
        check_detector_values("detectors[3]", VRA, {}, {"lower_percentile": {"grid": [40, 96]},
                                                        "upper_percentile": {"grid": [90, 99]}}, data)
    check_detector_values("detectors[3]", VRA, {}, {"lower_percentile": {"grid": [40, 60]},
                                                    "upper_percentile": {"grid": [90, 99]}}, data)
    with pytest.raises(ConfigError, match=r"^detectors\[0\]\.search: KNN: k=1000 must be <= the bank size .* "
                                          r"\(at the grid point alpha=0.01, k=1000\)$"):
        check_detector_values("detectors[0]", KNN, {}, {"alpha": {"grid": [0.01, 1.0]}, "k": {"grid": [50, 1000]}},
                              data)
    check_detector_values("detectors[0]", VRA, {}, {"lower_percentile": {"uniform": [40, 96]},
                                                    "upper_percentile": {"grid": [97, 99]}}, data)
