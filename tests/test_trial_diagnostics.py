"""A trial of an approximate search reports what the approximation cost: KNN with a faiss IVF index logs its
recall@k on held-out bank rows and on the OOD validation set (``val_ivf_recall_id`` / ``val_ivf_recall_ood``); the
exact search reports nothing extra. The training set reaches a streaming fit as a RowSource over the mapped copy."""
import types

import numpy as np
import pytest

from ood_core.rows import RowSource


def _sets(seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"id_train": 3000, "id_val": 200, "ood_val": 200, "id_test": 200}
    out = {}
    for role, n in sizes.items():
        shift = 3.0 if role == "ood_val" else 0.0
        x = (rng.normal(size=(n, 16)) + shift).astype(np.float32)
        out[role] = types.SimpleNamespace(columns={"penultimate": x, "logits": x[:, :4].copy()},
                                          labels=rng.integers(0, 4, n))
    return out


def _context(params):
    return {"detector": "KNN", "fixed": params, "columns": ["penultimate", "logits"], "backbone": {"key": "bb"},
            "num_classes": 4, "format": {"std": [1.0]}, "outliers": [],
            "sets": {role.replace("_", "-"): {"uri": role, "role": role} for role in
                     ("id_train", "id_val", "ood_val", "id_test")}}


def test_an_ivf_search_reports_its_recall_and_the_exact_one_nothing(monkeypatch):
    pytest.importorskip("faiss")
    from tasks import evaluate

    sets = _sets()
    monkeypatch.setattr(evaluate, "_read", lambda uri, columns: sets[uri])
    seen = []
    real = evaluate._rows
    monkeypatch.setattr(evaluate, "_rows", lambda *a: seen.append(real(*a)) or seen[-1])
    evaluate._FITTED.clear()
    exact: dict = {}
    evaluate.score_detector_on_sets(_context({}), {"k": 5}, evaluate.VALIDATION_ROLES, exact)
    assert exact == {}
    assert len(seen) == 1 and isinstance(seen[0], RowSource)  # KNN streams its fit

    evaluate._FITTED.clear()
    approx: dict = {}
    evaluate.score_detector_on_sets(_context({"index": "ivf", "nlist": 40, "nprobe": 1}), {"k": 5},
                                    evaluate.VALIDATION_ROLES, approx)
    assert set(approx) == {"val_ivf_recall_id", "val_ivf_recall_ood"}
    assert 0 < approx["val_ivf_recall_id"] < 1 and 0 <= approx["val_ivf_recall_ood"] < 1

    evaluate._FITTED.clear()
    full: dict = {}  # every cell probed: the search is exact
    evaluate.score_detector_on_sets(_context({"index": "ivf", "nlist": 40, "nprobe": 40}), {"k": 5},
                                    evaluate.VALIDATION_ROLES, full)
    assert full == {"val_ivf_recall_id": 1.0, "val_ivf_recall_ood": 1.0}
