"""Neural collapse in a sweep: NC1-NC4 per training epoch on a fixed subset of ID train, the final NC1-NC5 from
the cached features, the curves figure, the config setting and the report lines (digits data, small_cnn)."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from ood_core.data import DATASETS, load_dataset
from ood_core.models import build_model
from ood_core.neural_collapse import NC_KEYS, CollapseProbe, neural_collapse_report, stratified_subset
from ood_core.training import TrainConfig, train_classifier

FMT = DATASETS["digits"].default_format
ID = {"classes": [0, 1, 2, 3, 4, 5]}


@pytest.fixture(scope="module")
def digits():
    return (load_dataset("digits", split="train", fmt=FMT, seed=0, **ID),
            load_dataset("digits", split="val", fmt=FMT, seed=0, **ID))


def _model(seed=0):
    return build_model("small_cnn", num_classes=6, in_channels=1, image_size=FMT.image_size, seed=seed, width=0.5)


def _direct(model, dataset, indices):
    """NC1-NC4 straight from the model API (``features``, ``head``) on the given training images."""
    x, y = dataset.tensors[0][indices], dataset.tensors[1][indices]
    model.eval()
    with torch.no_grad():
        h = model.features(x)
        return neural_collapse_report(h, y, w=model.head.weight, logits=model.head(h))


# -- the subset ---------------------------------------------------------------------------------------------
def test_subset_is_fixed_seeded_and_stratified():
    y = np.r_[np.zeros(600), np.ones(300), np.full(100, 2)].astype(int)
    a = stratified_subset(y, 100, seed=3)
    assert np.array_equal(a, stratified_subset(y, 100, seed=3)) and not np.array_equal(a, stratified_subset(y, 100, 4))
    assert np.array_equal(np.bincount(y[a]), [60, 30, 10]) and np.all(np.diff(a) > 0)
    odd = stratified_subset(y, 7, seed=0)  # 4.2 / 2.1 / 0.7: the largest remainder gets the 7th
    assert np.array_equal(np.bincount(y[odd], minlength=3), [4, 2, 1])
    assert np.array_equal(stratified_subset(y, 5000, seed=0), np.arange(1000))  # fewer than asked: all


# -- during training ----------------------------------------------------------------------------------------
def test_nc_per_epoch_is_in_the_history_and_matches_a_direct_computation(digits):
    probe = CollapseProbe(digits[0], 200, seed=0)
    assert len(probe.indices) == 200 and len(set(probe.labels.tolist())) == 6
    model = _model()
    seen = []
    hist = train_classifier(model, digits[0], None, TrainConfig(epochs=2, batch_size=64, lr=0.05), seed=0,
                            device="cpu", probe=probe, on_epoch=seen.append)
    assert seen == hist
    for row in hist:
        assert set(NC_KEYS) | {"nc_seconds"} <= set(row) and row["nc_seconds"] >= 0
        assert all(math.isfinite(row[k]) for k in NC_KEYS)
    assert hist[-1]["nc1"] < hist[0]["nc1"]  # training collapses the classes
    direct = _direct(model, digits[0], probe.indices)  # no val set: the final weights are the last epoch's
    for key in NC_KEYS:
        assert hist[-1][key] == pytest.approx(direct[key], rel=1e-5, abs=1e-9), key


def test_the_probe_leaves_training_as_it_was(digits):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, augment="crop_flip", crop_padding=2)
    plain, with_nc = _model(), _model()
    h0 = train_classifier(plain, digits[0], digits[1], cfg, seed=1, device="cpu")
    h1 = train_classifier(with_nc, digits[0], digits[1], cfg, seed=1, device="cpu",
                          probe=CollapseProbe(digits[0], 100, seed=0))
    assert [r["train_loss"] for r in h0] == [r["train_loss"] for r in h1]
    for (k, v), w in zip(plain.state_dict().items(), with_nc.state_dict().values()):
        assert torch.equal(v, w), k
    probe = CollapseProbe(digits[0], 50, seed=0)
    plain.train()
    state, weights = torch.get_rng_state(), copy.deepcopy(plain.state_dict())
    probe(plain)
    assert torch.equal(state, torch.get_rng_state()) and plain.training  # no random draw, train mode restored
    assert all(torch.equal(v, weights[k]) for k, v in plain.state_dict().items())  # BN statistics untouched


def test_a_probe_on_broken_weights_gives_nan_instead_of_stopping_the_training(digits):
    model = _model()
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    out = CollapseProbe(digits[0], 30, seed=0)(model)
    assert all(math.isnan(out[k]) for k in NC_KEYS) and out["nc_seconds"] >= 0


class Interrupt(Exception):
    pass


def test_resumed_training_keeps_the_nc_history(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05)
    ref = train_classifier(_model(), digits[0], digits[1], cfg, seed=0, device="cpu",
                           probe=CollapseProbe(digits[0], 120, seed=0))
    uri = str(tmp_path / "ckpt.pt.resume")

    def stop_after_1(row):
        if row["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_classifier(_model(), digits[0], digits[1], cfg, seed=0, device="cpu", resume_uri=uri,
                         probe=CollapseProbe(digits[0], 120, seed=0), on_epoch=stop_after_1)
    hist = train_classifier(_model(), digits[0], digits[1], cfg, seed=0, device="cpu", resume_uri=uri,
                            probe=CollapseProbe(digits[0], 120, seed=0))
    assert [r["epoch"] for r in hist] == [1, 2]
    for a, b in zip(hist, ref):
        assert [a[k] for k in NC_KEYS] == [b[k] for k in NC_KEYS]


def test_the_train_task_logs_nc_only_when_asked(tmp_path):
    from tasks.train import train_backbone

    id_data = {"dataset": "digits", "params": ID, "seed": 0}
    backbone = {"key": "k", "label": "cnn-s0", "arch": "small_cnn", "params": {"width": 0.5}, "seed": 0,
                "train": {"epochs": 1, "batch_size": 64}, "checkpoint_uri": str(tmp_path / "k.pt"),
                "neural_collapse_samples": 60}
    out = train_backbone(backbone, 6, FMT.to_dict(), id_data)
    assert set(NC_KEYS) <= set(out["history"][0])
    off = dict(backbone, key="k0", checkpoint_uri=str(tmp_path / "k0.pt"), neural_collapse_samples=0)
    assert "nc1" not in train_backbone(off, 6, FMT.to_dict(), id_data)["history"][0]


# -- after extraction ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A checkpoint and the feature files a sweep would have cached for it (real Parquet, via the hooks)."""
    from ood_core.checkpoints import save_checkpoint
    from ood_core.hooks import LayerSpec, extract_features

    root = tmp_path_factory.mktemp("nc_features")
    model = _model(seed=2)
    train_classifier(model, load_dataset("digits", split="train", fmt=FMT, seed=0, **ID), None,
                     TrainConfig(epochs=1, batch_size=64), seed=0, device="cpu")
    save_checkpoint(str(root / "k.pt"), model, {"key": "k"})
    data = {"id-train": ("id_train", load_dataset("digits", split="train", fmt=FMT, seed=0, **ID)),
            "digits-6-9-val": ("ood_val", load_dataset("digits", split="val", fmt=FMT, seed=0, classes=[6, 7, 8, 9])),
            "noise-val": ("ood_val", load_dataset("uniform_noise", split="val", fmt=FMT, seed=0, n=40)),
            "id-test": ("id_test", load_dataset("digits", split="test", fmt=FMT, seed=0, **ID))}
    sets, inputs = {}, {}
    for label, (role, ds) in data.items():
        loader = torch.utils.data.DataLoader(ds, batch_size=128)
        uri = str(root / f"{label}.parquet")
        extract_features(model, loader, [LayerSpec("logits"), LayerSpec("penultimate")], uri)
        sets[label] = {"uri": uri, "role": role}
        inputs[label] = ds
    return {"model": model.eval(), "sets": sets, "inputs": inputs, "checkpoint": str(root / "k.pt")}


def _mean_abs_cos(class_means, ood_mean):
    return float(np.mean([abs(m @ ood_mean) / (np.linalg.norm(m) * np.linalg.norm(ood_mean)) for m in class_means]))


def test_nc5_task_matches_a_direct_computation(cached):
    from tasks.analysis import neural_collapse_analysis

    out = neural_collapse_analysis(cached["sets"], cached["checkpoint"], ["logits", "penultimate"])
    model = cached["model"]

    def feats(label):
        ds = cached["inputs"][label]
        with torch.no_grad():
            return torch.cat([model.features(x) for x, _ in torch.utils.data.DataLoader(ds, batch_size=256)]).double()

    h = feats("id-train").numpy()
    y = cached["inputs"]["id-train"].tensors[1].numpy()
    means = [h[y == c].mean(axis=0) for c in range(6)]
    ood = {k: feats(k).numpy() for k in ("digits-6-9-val", "noise-val")}
    for name, f in ood.items():
        assert out[f"nc5/{name}"] == pytest.approx(_mean_abs_cos(means, f.mean(axis=0)), rel=1e-4)
    assert out["nc5"] == pytest.approx(_mean_abs_cos(means, np.concatenate(list(ood.values())).mean(axis=0)), rel=1e-4)
    assert not any("id-test" in k for k in out)  # test sets are not read
    direct = neural_collapse_report(h, y, w=model.head.weight, b=model.head.bias)
    for key in NC_KEYS:
        assert out[key] == pytest.approx(direct[key], rel=1e-4, abs=1e-6), key
    # without a logits column, NC4 comes from the head of the checkpoint: the same predictions
    assert neural_collapse_analysis(cached["sets"], cached["checkpoint"], ["penultimate"])["nc4"] == out["nc4"]


class FakeTracker:
    def __init__(self):
        self.tables, self.metrics, self.figures = {}, {}, {}

    def log_table(self, run_id, frame, name):
        self.tables[name] = frame

    def log(self, run_id, metrics=None, **_):
        self.metrics.update(metrics or {})

    def log_figure(self, run_id, fig, name):
        self.figures[name] = fig


def test_sweep_runner_runs_the_task_per_backbone_and_skips_without_penultimate(ray_session, cached, capsys, tmp_path):
    from orchestrator.sweep import SweepRunner

    def backbone(label, columns):
        features = [SimpleNamespace(uri=e["uri"], dataset=SimpleNamespace(label=k, role=e["role"]), key=f"{label}-{k}")
                    for k, e in cached["sets"].items()]
        return SimpleNamespace(label=label, columns=columns, features=features, checkpoint_uri=cached["checkpoint"],
                               key=label)

    runner = SweepRunner.__new__(SweepRunner)
    runner.cfg = SimpleNamespace(resources=SimpleNamespace(cpus_per_task=1, max_retries=0),
                                 storage=str(tmp_path / "store"))
    runner._ray_started = True
    runner.plan = SimpleNamespace(backbones=[backbone("cnn-s0", ["logits", "penultimate"])])
    tracker = FakeTracker()
    values = runner.neural_collapse(tracker, "parent")
    assert set(values) == {"cnn-s0"} and set(NC_KEYS) | {"nc5", "nc5/noise-val"} <= set(values["cnn-s0"])
    assert list(tracker.tables["neural_collapse"]["backbone"]) == ["cnn-s0"]
    assert tracker.metrics["neural_collapse.cnn-s0.nc1"] == values["cnn-s0"]["nc1"]
    # cached by the features it read: the same values again without a task (a fully cached rerun starts no Ray)
    assert len(list((tmp_path / "store" / "analysis").glob("*.json"))) == 1
    runner._ray = lambda: pytest.fail("started Ray for a cached analysis")
    assert runner.neural_collapse() == values
    del runner._ray
    capsys.readouterr()
    runner.plan = SimpleNamespace(backbones=[backbone("cnn-s0", ["logits"])])
    assert runner.neural_collapse() == {}
    assert capsys.readouterr().out.strip() == "[collapse] skipped: the sweep does not extract 'penultimate' (add it " \
                                              "to extract.layers)"
    # a backbone whose values cannot be computed: one line, the others go on
    from ood_core.checkpoints import save_checkpoint

    other = str(tmp_path / "wide.pt")
    save_checkpoint(other, build_model("small_cnn", num_classes=6, in_channels=1, image_size=FMT.image_size), {})
    runner.plan = SimpleNamespace(backbones=[backbone("cnn-s0", ["penultimate"]),
                                             SimpleNamespace(**{**vars(backbone("wide-s0", ["penultimate"])),
                                                                "checkpoint_uri": other})])
    assert set(runner.neural_collapse()) == {"cnn-s0"}
    assert "[collapse] wide-s0: not computed: ValueError: neural collapse: w have dimension" in capsys.readouterr().out


# -- figure, report, config ------------------------------------------------------------------------------------
def _history(epochs=6):
    return [{"epoch": e, "train_loss": 1.0 / e, "nc1": 10.0 * 0.3 ** e, "nc2_equinorm": 0.5 / e,
             "nc2_equiangularity": 0.3 / e, "nc3": 1.0 / e, "nc4": 0.4 / e, "nc_seconds": 0.01}
            for e in range(1, epochs + 1)]


def test_neural_collapse_figure_draws_every_metric_and_nc1_on_a_log_axis(tmp_path):
    from ood_core.plots import neural_collapse_figure

    hist = _history()
    fig = neural_collapse_figure(hist, "train cnn (small_cnn) seed 0")
    axes = fig.axes
    assert len(axes) == 4 and axes[0].get_yscale() == "log" and all(a.get_yscale() == "linear" for a in axes[1:])
    assert [a.get_title().split(":")[0] for a in axes] == ["NC1", "NC2", "NC3", "NC4"]
    lines = {line.get_label().split(":")[0]: line for a in axes for line in a.get_lines()}
    assert len(lines) == 5 and all(a.get_xlabel() == "epoch" for a in axes)
    np.testing.assert_allclose(lines["NC1"].get_ydata(), [r["nc1"] for r in hist])
    np.testing.assert_allclose(lines["equiangularity"].get_xdata(), range(1, 7))
    assert lines["NC4"].get_label() == "NC4: 0.0667 at epoch 6"  # the last value in the legend
    assert lines["equinorm (CV of the mean norms)"].get_color() != lines["equiangularity"].get_color()
    assert all(a.get_legend() is not None for a in axes)
    assert all(a.get_ylim()[0] == 0 for a in axes[1:])
    assert "train cnn (small_cnn) seed 0" in fig._suptitle.get_text()
    fig.savefig(tmp_path / "nc.png")
    assert (tmp_path / "nc.png").stat().st_size > 10_000


def test_training_run_gets_the_figure_only_with_nc():
    from orchestrator.artifacts import log_collapse_curves

    tracker = FakeTracker()
    assert not log_collapse_curves(tracker, "run", "train cnn", [{"epoch": 1, "train_loss": 1.0}])
    assert log_collapse_curves(tracker, "run", "train cnn", _history(3)) and "neural_collapse.png" in tracker.figures


def test_report_lines_and_result_columns():
    from orchestrator.report import add_collapse, format_collapse, results_frame

    values = {"cnn-s0": {"nc1": 0.1523, "nc2_equinorm": 0.18, "nc2_equiangularity": 0.17, "nc3": 0.127, "nc4": 0.0,
                         "nc5": 0.41, "nc5/digits-6-9-val": 0.5, "nc5/photos-val": float("nan")},
              "cnn-s1": {"nc1": 0.2, "nc2_equinorm": 0.2, "nc2_equiangularity": 0.2, "nc3": 0.1, "nc4": 0.01,
                         "nc5": 0.3, "nc5/digits-6-9-val": 0.4, "nc5/photos-val": 0.2}}
    text = format_collapse(values)
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["backbone", "NC1", "NC2", "norm"] and "NC5 photos-val" in lines[1]
    assert lines[3].split() == ["cnn-s0", "0.152", "0.18", "0.17", "0.127", "0", "0.41", "0.5", "-"]
    assert format_collapse({}) == ""
    rows = [{"backbone": "cnn-s0", "detector": "KNN", "near/auroc": 0.9}, {"backbone": "cnn-s1", "detector": "KNN"}]
    add_collapse(rows, values)
    frame = results_frame(rows)
    assert frame.loc[0, "nc1"] == 0.1523 and frame.loc[1, "nc5/photos-val"] == 0.2


def test_config_setting_is_validated_and_kept_out_of_the_checkpoint_key(tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.config import TrainSection, parse_config
    from orchestrator.plan import backbone_key, resolve_input_format
    from sweep_runs import ROOT

    raw = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    for value, message in ((-1, "Input should be greater than or equal to 0"), (1, "must be 0 (off) or at least 2"),
                           (10 ** 7, "Input should be less than or equal to 1000000")):
        bad = copy.deepcopy(raw)
        bad["backbones"][0]["train"]["neural_collapse_samples"] = value
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        assert main(["validate", str(tmp_path / "bad.yaml")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: backbones[0].train.neural_collapse_samples: {message}"), err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert TrainSection().neural_collapse_samples == 1000
    assert "neural_collapse_samples" not in TrainSection().model_dump()  # nor in the plan's train section
    keys = set()
    for n in (0, 1000, 37):
        cfg = copy.deepcopy(raw)
        cfg["backbones"][0]["train"]["neural_collapse_samples"] = n
        parsed = parse_config(cfg)
        assert parsed.backbones[0].train.neural_collapse_samples == n
        keys.add(backbone_key(parsed, parsed.backbones[0], 0, resolve_input_format(parsed)))
    assert len(keys) == 1  # a diagnostic: the same trained checkpoint
