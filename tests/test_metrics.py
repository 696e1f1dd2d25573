import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ood_core.metrics import accuracy, aupr_in, aupr_out, auroc, fpr_at_tpr, fpr_at_tpr_openood, ood_metrics


# ---------------------------------------------------------------- independent brute-force references
def bf_auroc(s_id, s_ood):
    """P(ood > id) + P(ood == id) / 2 over all pairs."""
    total = 0.0
    for a in s_ood:
        for b in s_id:
            total += 1.0 if a > b else (0.5 if a == b else 0.0)
    return total / (len(s_ood) * len(s_id))


def bf_ap(pos, neg):
    """Step-wise average precision, positives ranked by descending score, ties grouped."""
    scores = sorted(set(pos) | set(neg), reverse=True)
    ap, prev_recall = 0.0, 0.0
    for t in scores:
        tp = sum(1 for s in pos if s >= t)
        fp = sum(1 for s in neg if s >= t)
        recall = tp / len(pos)
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def bf_fpr(s_id, s_ood, tpr=0.95):
    """Loop over candidate thresholds from low to high; the first accepting >= tpr of ID decides."""
    for t in sorted(set(s_id)):
        if sum(1 for s in s_id if s <= t) / len(s_id) >= tpr:
            return sum(1 for s in s_ood if s <= t) / len(s_ood)
    raise AssertionError("unreachable")


CASES = {
    "continuous": (np.random.default_rng(0).normal(0, 1, 60), np.random.default_rng(1).normal(1, 1, 45)),
    "ties": (np.random.default_rng(2).integers(0, 5, 80).astype(float),
             np.random.default_rng(3).integers(2, 7, 50).astype(float)),
    "perfect": (np.linspace(0, 1, 40), np.linspace(2, 3, 30)),
    "reversed": (np.linspace(2, 3, 40), np.linspace(0, 1, 30)),
    "constant": (np.zeros(20), np.zeros(10)),
    "n100_boundary": (np.arange(100.0), np.arange(90.0, 120.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_against_brute_force_and_sklearn(case):
    s_id, s_ood = CASES[case]
    y = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
    s = np.r_[s_id, s_ood]
    assert auroc(s_id, s_ood) == pytest.approx(bf_auroc(s_id, s_ood), abs=1e-12)
    assert auroc(s_id, s_ood) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr_out(s_id, s_ood) == pytest.approx(bf_ap(list(s_ood), list(s_id)), abs=1e-12)
    assert aupr_out(s_id, s_ood) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert aupr_in(s_id, s_ood) == pytest.approx(bf_ap(list(-s_id), list(-s_ood)), abs=1e-12)
    assert aupr_in(s_id, s_ood) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    for tpr in (0.95, 0.5, 0.8, 1.0):
        assert fpr_at_tpr(s_id, s_ood, tpr) == pytest.approx(bf_fpr(list(s_id), list(s_ood), tpr), abs=1e-12)


def test_known_values():
    assert ood_metrics(*CASES["perfect"]) == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0,
                                                            "fpr95_openood": 0.0})
    m = ood_metrics(*CASES["reversed"])
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0
    assert ood_metrics(*CASES["constant"])["auroc"] == 0.5
    # 100 ID scores 0..99: threshold 94 accepts exactly 95% of ID; OOD 90..119 accepted up to 94 -> 5/30
    assert fpr_at_tpr(*CASES["n100_boundary"]) == pytest.approx(5 / 30)


def test_torch_inputs_and_validation():
    s_id, s_ood = CASES["continuous"]
    ref = ood_metrics(s_id, s_ood)
    got = ood_metrics(torch.tensor(s_id, dtype=torch.float32), torch.tensor(s_ood, dtype=torch.float32))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-6)
    assert auroc(list(s_id), torch.tensor(s_ood).half()) == pytest.approx(ref["auroc"], abs=0.02)
    with pytest.raises(ValueError, match="non-empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.0, float("nan")], [1.0])
    with pytest.raises(ValueError):
        fpr_at_tpr([0.0], [1.0], tpr=0.0)


def test_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 0, 0])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(torch.tensor(logits), torch.tensor(labels)) == 0.75
    with pytest.raises(ValueError):
        accuracy(logits[:, 0], labels)


def openood_fpr(s_id, s_ood, tpr_th=0.95):
    """OpenOOD v1.5's lines (openood/evaluators/metrics.py, auc_and_fpr_recall), its ``conf`` = our ``-score``,
    label -1 for OOD."""
    from sklearn import metrics

    conf = -np.r_[s_id, s_ood]
    label = np.r_[np.zeros(len(s_id), dtype=int), -np.ones(len(s_ood), dtype=int)]
    ood_indicator = np.zeros_like(label)
    ood_indicator[label == -1] = 1
    fpr_list, tpr_list, thresholds = metrics.roc_curve(ood_indicator, -conf)
    return fpr_list[np.argmax(tpr_list >= tpr_th)]


def bf_fpr_openood(s_id, s_ood, tpr):
    """By hand, without ties: the largest threshold t flagging (score >= t) at least ``tpr`` of OOD; the fraction
    of ID flagged there."""
    for t in sorted(s_ood, reverse=True):
        if np.mean(np.asarray(s_ood) >= t) >= tpr:
            return float(np.mean(np.asarray(s_id) >= t))


@pytest.mark.parametrize("case", list(CASES))
def test_openood_fpr95_is_what_openood_computes(case):
    s_id, s_ood = CASES[case]
    for tpr in (0.95, 0.5, 0.8, 1.0):
        assert fpr_at_tpr_openood(s_id, s_ood, tpr) == pytest.approx(openood_fpr(s_id, s_ood, tpr), abs=1e-12)


def test_openood_fpr95_by_hand():
    s_id, s_ood = CASES["continuous"]  # no ties
    for tpr in (0.95, 0.5, 0.8):
        assert fpr_at_tpr_openood(s_id, s_ood, tpr) == pytest.approx(bf_fpr_openood(s_id, s_ood, tpr), abs=1e-12)
    # ID 0..19; OOD 5.5..14.5 and 100..109: the two definitions give different numbers
    s_id, s_ood = np.arange(20.0), np.r_[np.arange(5.5, 15.5), np.arange(100.0, 110.0)]
    # OpenOOD: 19 of 20 OOD flagged at t = 6.5 -> ID 7..19 flagged = 13/20
    assert fpr_at_tpr_openood(s_id, s_ood) == pytest.approx(13 / 20)
    # ours: 95% of ID kept at score <= 18 -> OOD 5.5..14.5 accepted = 10/20
    assert fpr_at_tpr(s_id, s_ood) == pytest.approx(10 / 20)
    # ties: ID 0..99, OOD 90..119. Flagging >= 28.5 of 30 OOD first happens at t = 91 (ID 91..99: 9/100), but the
    # ROC points t = 99..91 lie on one diagonal (each step one ID and one OOD) and scikit-learn's
    # drop_intermediate, which OpenOOD keeps, removes them: the next point, t = 90, flags 10/100 ID.
    assert fpr_at_tpr_openood(*CASES["n100_boundary"]) == pytest.approx(10 / 100)
    assert ood_metrics(*CASES["n100_boundary"])["fpr95_openood"] == pytest.approx(10 / 100)
