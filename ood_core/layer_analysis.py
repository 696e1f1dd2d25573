"""Per-layer OOD analysis of intermediate representations (Guglielmo & Masana, "Leveraging
Intermediate Representations for Better Out-of-Distribution Detection", CVWW 2025).

Every hooked layer ``l`` gives a per-sample energy :math:`E_l(x) = -\\log\\sum_j e^{a_j(x)}` over its
flattened raw output (the ``energy`` reduction of :mod:`ood_core.hooks`); the final layer's energy is
that of the logits. Whether a high or a low energy means OOD differs between layers, so each layer's
**direction is fixed on validation data** (ID val against OOD val, AUROC >= 0.5 after the sign), never
on test labels (the public toy flips AUROC < 0.5 on the test set, which is optimistic). The test AUROC
of every layer is then reported with that sign, for every OOD test set.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np

from .detectors.multilayer import signs_from_validation
from .metrics import auroc


def logits_energy(logits) -> np.ndarray:
    """Energy of the final layer, ``-logsumexp(logits)``, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


def per_layer_table(layers: Sequence[str], id_val: np.ndarray, ood_val: np.ndarray, id_test: np.ndarray,
                    ood_test: Mapping[str, np.ndarray]) -> List[Dict]:
    """One row per layer: its validation-fixed ``sign``, ``val_auroc`` and the test AUROC per OOD set.

    All score arrays are ``(N, L)`` per-layer energies in the order of ``layers`` (network order,
    the final layer last). Rows carry ``layer``, ``position``, ``sign``, ``val_auroc`` and
    ``auroc/<set>`` for every test set.
    """
    signs = signs_from_validation(id_val, ood_val)
    rows = []
    for l, name in enumerate(layers):
        s = float(signs[l])
        row = {"layer": name, "position": l, "sign": int(s),
               "val_auroc": auroc(s * id_val[:, l], s * ood_val[:, l])}
        for set_name, scores in ood_test.items():
            row[f"auroc/{set_name}"] = auroc(s * id_test[:, l], s * scores[:, l])
        rows.append(row)
    return rows
