import io

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from ood_core.metrics import auroc
from ood_core.plots import ID_COLOUR, beats_final_layer, per_layer_auroc_figure, roc_figure, score_histogram_figure


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    return rng.normal(0, 1, 200), {"near": rng.normal(0.5, 1, 150), "far": torch.tensor(rng.normal(3, 1, 100))}


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _legend(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_roc_figure(scores):
    s_id, ood = scores
    fig = roc_figure(s_id, ood, "ROC test")
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "ROC test"
    texts = _legend(fig)
    assert texts[0] == f"near (AUROC {auroc(s_id, ood['near']):.3f})" and texts[1].startswith("far (AUROC 0.9")
    assert _png(fig).startswith(b"\x89PNG")


def _face(patch):
    return mcolors.to_hex(patch.get_facecolor(), keep_alpha=False)


def test_score_histogram_figure(scores):
    s_id, ood = scores
    fig = score_histogram_figure(s_id, ood, "hist")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["ID vs near", "ID vs far"]  # one panel per OOD set
    blue = mcolors.to_hex(ID_COLOUR)
    ood_colours = []
    for ax in panels:
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts[0].startswith("ID (n=200") and "AUROC" in texts[1]
        colours = {_face(p) for p in ax.patches}
        assert blue in colours and len(colours) == 2  # ID in blue, the OOD set in a colour of its own
        ood_colours += [c for c in colours if c != blue]
    assert len(set(ood_colours)) == 2  # each OOD set its own colour
    assert fig.get_suptitle() == "hist"
    assert _png(fig).startswith(b"\x89PNG")
    # constant scores do not break the binning
    _png(score_histogram_figure(np.zeros(5), {"o": np.zeros(3)}, "flat"))


def test_score_histogram_keeps_id_and_near_readable_next_to_far_away_scores():
    """Mahalanobis on the quickstart: ID and near-OOD digits around 100-600, noise around 10,000-30,000."""
    rng = np.random.default_rng(1)
    s_id, near, noise = rng.normal(150, 40, 271), rng.normal(360, 60, 179), rng.normal(15000, 3000, 500)
    fig = score_histogram_figure(s_id, {"digits-6-9": near, "gaussian-noise": noise}, "Mahalanobis")
    near_ax, noise_ax = [ax for ax in fig.axes if ax.get_visible()]
    lo, hi = near_ax.get_xlim()
    assert lo >= 0 and hi < 700  # the near panel is on the range of ID and near, not of the noise
    assert noise_ax.get_xlim()[1] > 10_000
    for patch in near_ax.patches:  # ID's and near's histograms each spread over the range, not one bar at 0
        assert patch.get_path().get_extents().width > 0.25 * (hi - lo)
    # the samples outside the 0.5-99.5 percentile range are counted in the legend
    assert any("outside" in t.get_text() for t in noise_ax.get_legend().get_texts())


def test_per_layer_auroc_figure():
    names = ["conv1", "bn1", "layer1.0.conv1", "fc"]
    vals = [0.6, 0.9, 0.75, 0.8]
    fig = per_layer_auroc_figure(names, vals, 0.8, "per layer")
    ax = fig.axes[0]
    colors = [_face(p) for p in ax.patches]
    green, grey = mcolors.to_hex("tab:green"), mcolors.to_hex("tab:grey")
    assert colors == [grey, green, grey, grey]  # only bn1 beats the final layer
    assert [t.get_text() for t in ax.get_xticklabels()] == names  # network order kept
    line = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert line and line[0].get_ydata()[0] == 0.8
    assert _png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        per_layer_auroc_figure(names, vals[:2], 0.8, "bad")


def test_per_layer_auroc_figure_is_honest_below_chance():
    """0.08 against a final layer at 0.01 is not better: both are worse than chance. Fixed axis, chance line,
    value labels (a bar at 0.0 is labelled, so it does not vanish)."""
    fig = per_layer_auroc_figure(["a", "b", "c"], [0.08, 0.0, 0.7], 0.01, "below chance")
    ax = fig.axes[0]
    green = mcolors.to_hex("tab:green")
    assert [_face(p) == green for p in ax.patches[:3]] == [False, False, True]
    assert ax.get_ylim() == (0.0, 1.05)
    assert any(ln.get_linestyle() == "--" and ln.get_ydata()[0] == 0.5 for ln in ax.get_lines())  # chance
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["0.08", "0.00", "0.70"]
    assert beats_final_layer(0.7, 0.01) and not beats_final_layer(0.08, 0.01) and not beats_final_layer(0.9, None)
    # the same axis whatever the values
    assert per_layer_auroc_figure(["a"], [0.99], 0.98).axes[0].get_ylim() == (0.0, 1.05)


def test_roc_grid_and_comparison_figures():
    import numpy as np

    from ood_core.plots import detector_comparison_figure, roc_grid_figure

    rng = np.random.default_rng(0)
    panels = {f"det{i}": (rng.normal(size=50), {"a": rng.normal(1, 1, 40), "b": rng.normal(2, 1, 40)}) for i in range(5)}
    fig = roc_grid_figure(panels, "grid")
    assert sum(ax.get_visible() for ax in fig.axes) == 5
    rows = [{"detector": "x", "type": "KNN", "near/auroc": 0.8, "far/auroc": 0.9},
            {"detector": "x", "type": "KNN", "near/auroc": 0.7, "far/auroc": 0.95},
            {"detector": "y", "type": "MaxSoftmax", "near/auroc": 0.6, "far/auroc": 0.5}]
    fig = detector_comparison_figure(rows)
    ax = fig.axes[0]
    widths = sorted(round(p.get_width(), 3) for p in ax.patches)
    assert widths == sorted([0.75, 0.925, 0.6, 0.5])  # two seeds of x averaged
    assert any(ln.get_linestyle() == "--" and ln.get_xdata()[0] == 0.5 for ln in ax.get_lines())  # chance
    assert ax.get_xlim() == (0.0, 1.0)
    # grouped by representation (logits before features), one seed of y: error bars only where seeds differ
    assert [t.get_text() for t in ax.get_yticklabels()] == ["y  [logits]", "x  [features]"]


def test_detector_comparison_scales_and_draws_no_empty_error_bars():
    from matplotlib.container import ErrorbarContainer

    from ood_core.plots import detector_comparison_figure

    rows = [{"detector": f"D{i:02d}", "type": "KNN", "near/auroc": 0.5 + i / 100, "far/auroc": 0.9} for i in range(40)]
    fig = detector_comparison_figure(rows)
    ax = fig.axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]  # one seed each: no error bars
    names = [t.get_text().split()[0] for t in ax.get_yticklabels()]
    assert names[0] == "D39" and names[-1] == "D00"  # sorted, the best on top
    width, height = fig.get_size_inches()
    assert height > 10 and width < 10  # grows downwards with the number of detectors, not into a strip
    legend = fig.legends[0]
    assert legend and not ax.get_legend()  # outside the axes: it covers no bar


def test_backbone_comparison_puts_backbones_side_by_side_per_detector():
    from ood_core.plots import backbone_comparison_figure

    rows = [{"detector": "MSP", "backbone_name": "ce", "near/auroc": 0.8, "far/auroc": 0.6},
            {"detector": "MSP", "backbone_name": "ce", "near/auroc": 0.7, "far/auroc": 0.7},  # a second seed
            {"detector": "MSP", "backbone_name": "oe", "near/auroc": 0.9, "far/auroc": 0.99},
            {"detector": "KNN", "backbone_name": "ce", "near/auroc": 0.95, "far/auroc": 1.0},
            {"detector": "KNN", "backbone_name": "oe", "near/auroc": 0.93, "far/auroc": 1.0}]
    fig = backbone_comparison_figure(rows)
    near, far = fig.axes
    assert [t.get_text() for t in near.get_yticklabels()] == ["MSP", "KNN"]
    bars = {(round(p.get_y(), 2), round(p.get_width(), 3)) for p in far.patches}
    assert {w for _, w in bars} == {0.65, 0.99, 1.0}  # ce's two seeds averaged, the backbones not
    assert len(far.patches) == 4  # 2 detectors x 2 backbones
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["ce", "chance (0.5)", "oe"]
