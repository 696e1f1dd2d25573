"""OOD detection metrics. Scores are "higher = more OOD" everywhere.

* ``auroc``: area under the ROC curve with OOD as the positive class (probability that a random OOD
  sample scores higher than a random ID sample, ties counting 1/2).
* ``aupr_out``: average precision with OOD positive, score as is.
* ``aupr_in``: average precision with ID positive, on the negated score.
* ``fpr_at_tpr`` (FPR@95): the classic definition (Hendrycks & Gimpel 2017; Liang et al. 2018):
  take the smallest threshold ``t`` such that accepting ``score <= t`` keeps at least ``tpr`` (95%) of
  the ID samples; report the fraction of OOD samples accepted at ``t`` (OOD with ``score <= t``).
  Key ``fpr95``.
* ``fpr_at_tpr_openood`` (FPR@95 as OpenOOD v1.5 computes it, Zhang, Yang, Wang et al. 2023;
  ``openood/evaluators/metrics.py``, ``auc_and_fpr_recall``): OOD is the positive class;
  ``roc_curve(ood_indicator, -conf)`` (scikit-learn's default ``drop_intermediate=True``), then the FPR at the
  first ROC point whose TPR is ``>= 0.95``: the fraction of *ID* samples flagged as OOD (``score >= t``) at the
  largest threshold ``t`` that flags at least 95% of the OOD samples. Key ``fpr95_openood``. Its ``conf`` is
  "higher = more ID", our score is its negation, so ``-conf`` there is our score as is.
  The two differ (they are the same only when the ID and OOD score distributions are mirror images); compare
  numbers only under the same definition, never one in place of the other.

Average precision and AUROC come from scikit-learn (step-wise AP, no interpolation). All functions
accept numpy arrays, torch tensors or sequences; scores are compared in float64.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "fpr_at_tpr_openood", "ood_metrics", "accuracy", "as_numpy",
           "FPR_DEFINITIONS"]


def as_numpy(x, dtype=np.float64) -> np.ndarray:
    """A 1-D (or as-is for 2-D logits) numpy copy of ``x`` (numpy, torch tensor on any device, list)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:  # half / bfloat16 (numpy has no bfloat16)
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _scores(id_scores, ood_scores):
    s_id = as_numpy(id_scores).reshape(-1)
    s_ood = as_numpy(ood_scores).reshape(-1)
    if s_id.size == 0 or s_ood.size == 0:
        raise ValueError("both ID and OOD scores must be non-empty")
    if not (np.isfinite(s_id).all() and np.isfinite(s_ood).all()):
        raise ValueError("scores contain NaN or inf")
    return s_id, s_ood


def _labelled(id_scores, ood_scores):
    """(y, s) with y = 1 for OOD, 0 for ID, s the concatenated scores."""
    s_id, s_ood = _scores(id_scores, ood_scores)
    y = np.concatenate([np.zeros(s_id.size, dtype=np.int8), np.ones(s_ood.size, dtype=np.int8)])
    return y, np.concatenate([s_id, s_ood])


def auroc(id_scores, ood_scores) -> float:
    """AUROC, OOD positive: ``P(s_ood > s_id) + P(s_ood == s_id) / 2``."""
    y, s = _labelled(id_scores, ood_scores)
    return float(roc_auc_score(y, s))


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class."""
    y, s = _labelled(id_scores, ood_scores)
    return float(average_precision_score(y, s))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class, ranking by ``-score``."""
    y, s = _labelled(id_scores, ood_scores)
    return float(average_precision_score(1 - y, -s))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted (``score <= t``) at the smallest ``t`` accepting ``>= tpr`` of ID.

    Computed from :func:`sklearn.metrics.roc_curve` with ID as the positive class on ``-score`` (so a
    threshold ``-t`` there accepts ``score <= t``), without dropping intermediate points.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    y, s = _labelled(id_scores, ood_scores)
    fpr_id, tpr_id, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    i = int(np.argmax(tpr_id >= tpr))  # the first (smallest score threshold) point reaching tpr
    return float(fpr_id[i])


def fpr_at_tpr_openood(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """OpenOOD v1.5's FPR@95: fraction of ID samples flagged (``score >= t``) at the first ROC point (OOD
    positive, scikit-learn's default ``drop_intermediate=True``, as OpenOOD calls it) that flags ``>= tpr`` of
    the OOD samples. Not :func:`fpr_at_tpr` (that one counts OOD accepted at 95% of ID kept)."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    y, s = _labelled(id_scores, ood_scores)
    fpr_ood, tpr_ood, _ = roc_curve(y, s)
    return float(fpr_ood[int(np.argmax(tpr_ood >= tpr))])


#: the FPR@95 metric keys and what each counts (tables and MLflow name them by these keys)
FPR_DEFINITIONS = {
    "fpr95": "OOD accepted at the threshold that keeps 95% of ID",
    "fpr95_openood": "ID rejected at the threshold that flags 95% of OOD (OpenOOD v1.5)",
}


def ood_metrics(id_scores, ood_scores) -> Dict[str, float]:
    """``{"auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood"}`` for one (ID, OOD) pair of score arrays
    (both FPR@95 definitions, see :data:`FPR_DEFINITIONS`)."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, 0.95),
        "fpr95_openood": fpr_at_tpr_openood(id_scores, ood_scores, 0.95),
    }


def accuracy(logits, labels) -> float:
    """Top-1 accuracy: mean of ``argmax(logits, 1) == labels``."""
    lg = as_numpy(logits, dtype=None)
    lb = as_numpy(labels, dtype=None).reshape(-1)
    if lg.ndim != 2 or lg.shape[0] != lb.shape[0]:
        raise ValueError(f"logits must be (N, C) and labels (N,), got {lg.shape} and {lb.shape}")
    if lb.size == 0:
        raise ValueError("accuracy of an empty set")
    return float(np.mean(np.argmax(lg, axis=1) == lb))
