import io

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from ood_core.metrics import auroc
from ood_core.plots import per_layer_auroc_figure, roc_figure, score_histogram_figure


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


def test_score_histogram_figure(scores):
    s_id, ood = scores
    fig = score_histogram_figure(s_id, ood, "hist")
    texts = _legend(fig)
    assert texts[0].startswith("ID") and any(t.startswith("near (AUROC") for t in texts)
    assert _png(fig).startswith(b"\x89PNG")
    # constant scores do not break the binning
    _png(score_histogram_figure(np.zeros(5), {"o": np.zeros(3)}, "flat"))


def test_per_layer_auroc_figure():
    names = ["conv1", "bn1", "layer1.0.conv1", "fc"]
    vals = [0.6, 0.9, 0.75, 0.8]
    fig = per_layer_auroc_figure(names, vals, 0.8, "per layer")
    ax = fig.axes[0]
    colors = [mcolors.to_hex(p.get_facecolor()) for p in ax.patches]
    green, grey = mcolors.to_hex("tab:green"), mcolors.to_hex("tab:grey")
    assert colors == [grey, green, grey, grey]  # only bn1 beats the final layer
    assert [t.get_text() for t in ax.get_xticklabels()] == names  # network order kept
    line = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert line and line[0].get_ydata()[0] == 0.8
    assert _png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        per_layer_auroc_figure(names, vals[:2], 0.8, "bad")


def test_roc_grid_and_comparison_figures():
    import numpy as np

    from ood_core.plots import detector_comparison_figure, roc_grid_figure

    rng = np.random.default_rng(0)
    panels = {f"det{i}": (rng.normal(size=50), {"a": rng.normal(1, 1, 40), "b": rng.normal(2, 1, 40)}) for i in range(5)}
    fig = roc_grid_figure(panels, "grid")
    assert sum(ax.get_visible() for ax in fig.axes) == 5
    rows = [{"detector": "x", "near/auroc": 0.8, "far/auroc": 0.9}, {"detector": "x", "near/auroc": 0.7, "far/auroc": 0.95},
            {"detector": "y", "near/auroc": 0.6, "far/auroc": 0.5}]
    fig = detector_comparison_figure(rows)
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == sorted([0.75, 0.925, 0.6, 0.5])
