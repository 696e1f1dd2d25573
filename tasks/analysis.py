"""Ray tasks reading one backbone's cached features: the per-layer energy analysis and the final neural-collapse
values."""
from __future__ import annotations

from typing import Dict, List

import numpy as np


def per_layer_analysis(sets: Dict[str, Dict], energy_columns: List[str]) -> List[Dict]:
    """Rows of :func:`ood_core.layer_analysis.per_layer_table` for the ``*.energy`` columns plus the logits.

    ``sets``: label -> {"uri", "role"} as in a trial context. OOD validation sets are pooled.
    """
    from ood_core.feature_store import read_features
    from ood_core.layer_analysis import logits_energy, per_layer_table

    def energies(uri: str) -> np.ndarray:
        fs = read_features(uri, columns=energy_columns + ["logits"])
        cols = [fs.columns[c].reshape(-1).astype(np.float64) for c in energy_columns]
        return np.stack(cols + [logits_energy(fs.columns["logits"])], axis=1)

    by_role = lambda role: [l for l, e in sets.items() if e["role"] == role]  # noqa: E731
    id_val = energies(sets["id-val"]["uri"])
    ood_val = np.concatenate([energies(sets[l]["uri"]) for l in by_role("ood_val")])
    id_test = energies(sets["id-test"]["uri"])
    ood_test = {l: energies(sets[l]["uri"]) for l in by_role("near") + by_role("far")}
    names = [c[: -len(".energy")] for c in energy_columns] + ["logits"]
    if energy_columns and np.allclose(id_val[:, -2], id_val[:, -1], rtol=1e-4, atol=1e-4):
        # the last hooked layer is the classifier itself: it is the final layer, no separate logits row
        names, id_val, ood_val, id_test = names[:-1], id_val[:, :-1], ood_val[:, :-1], id_test[:, :-1]
        ood_test = {k: v[:, :-1] for k, v in ood_test.items()}
    return per_layer_table(names, id_val, ood_val, id_test, ood_test)


def neural_collapse_analysis(sets: Dict[str, Dict], checkpoint_uri: str, columns: List[str]) -> Dict[str, float]:
    """Final neural-collapse values of one trained backbone from its cached features
    (:func:`ood_core.neural_collapse.collapse_summary`): NC1-NC4 on the whole ID training set, NC5 against each
    OOD validation set (``nc5/<set>``) and against them pooled (``nc5``). The test sets are not read.

    ``sets``: label -> {"uri", "role"} as in a trial context; ``columns``: the extracted columns (``penultimate``
    is needed; without ``logits`` NC4 uses the head's output, which is the same in eval mode). The head
    ``(W, b)`` comes from the checkpoint at ``checkpoint_uri``.
    """
    from ood_core.checkpoints import load_checkpoint
    from ood_core.feature_store import read_features
    from ood_core.neural_collapse import collapse_summary

    state, _meta = load_checkpoint(checkpoint_uri)
    train_uri = next(e["uri"] for e in sets.values() if e["role"] == "id_train")
    train = read_features(train_uri, columns=["penultimate"] + (["logits"] if "logits" in columns else []))
    ood = {label: read_features(e["uri"], columns=["penultimate"]).columns["penultimate"]
           for label, e in sets.items() if e["role"] == "ood_val"}
    return collapse_summary(train.columns["penultimate"], train.labels, w=state["head.weight"], b=state["head.bias"],
                            logits=train.columns.get("logits"), ood_sets=ood)
