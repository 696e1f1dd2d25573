"""Ray task: the per-layer energy analysis of one backbone from its cached features."""
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
