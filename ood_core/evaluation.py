"""The evaluation protocol, in one place: fit on ID training data, make the detector's validation-time choices
on ID val + OOD val, score the sets.

After OpenOOD's ``Evaluator`` (Zhang et al., "OpenOOD v1.5", arXiv:2306.09301): fitting sees only ID training data
(and auxiliary outliers for the detectors that declare ``needs_outliers``, labelled < 0); choices a detector makes
after fitting (``uses_validation``, e.g. a per-layer sign) see only validation sets; test sets are only scored.

Each set is given in the form the detector's ``representation`` reads:

* ``"logits"``, ``"features"``, ``"layers"``: a mapping of cached representations (``{"logits": (N, C),
  "features": (N, D), "<layer column>": ...}``) with its labels;
* ``"feature_maps"``, ``"model"``: an iterable of ``(x, y)`` batches of inputs and ``model``, the network
  (feature-map detectors read ``model.feature_maps(x)``).

A Ray Tune trial (``tasks/evaluate.py``) calls :func:`run_protocol` on cached Parquet features; a notebook can
call it on its own tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .api import Detector
from .detectors.registry import fit_detector, score_detector

CACHED = ("logits", "features", "layers")
ID_TRAIN, ID_VAL, OOD_VAL = "id_train", "id_val", "ood_val"


@dataclass
class EvalSet:
    """One data set of the protocol: its ``role`` (``id_train``, ``id_val``, ``ood_val``, ``id_test``,
    ``near``, ``far``, ...), its ``data`` (cached representations or a loader, see the module doc) and, for
    cached representations, its ``labels``."""

    role: str
    data: Any
    labels: Optional[Any] = None


@dataclass
class Scored:
    """Scores ``(N,)`` (numpy float32, higher = more OOD), the labels, and per-sample details
    (e.g. ``exit_layer`` of early-exit detectors)."""

    scores: np.ndarray
    labels: np.ndarray
    details: Dict[str, np.ndarray] = field(default_factory=dict)


def _numpy(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def _maps(model, loader: Iterable, device) -> Tuple[Tensor, Tensor]:
    with torch.no_grad():
        maps, ys = zip(*[(model.feature_maps(x.to(device)), torch.as_tensor(y)) for x, y in loader])
    return torch.cat(maps), torch.cat(ys).to(device)


def fit(detector: Detector, train: EvalSet, model=None, device=None) -> Detector:
    """Fit ``detector`` on the ID training set (a no-op for detectors without state)."""
    rep = detector.representation
    if rep in CACHED:
        with torch.no_grad():
            return fit_detector(detector, train.data, train.labels)
    if not detector.requires_fit:
        return detector
    if rep == "feature_maps":
        return detector.fit_feature_maps(*_maps(model, train.data, device))
    return detector.fit(train.data)


def score(detector: Detector, data: EvalSet, model=None, device=None) -> Scored:
    """Scores of one set, with its labels and the detector's per-sample details."""
    rep = detector.representation
    if rep in CACHED:
        with torch.no_grad():
            if rep == "layers":
                scores, details = detector.predict_structured_details(data.data)
            else:
                scores, details = score_detector(detector, data.data), {}
        return Scored(_numpy(scores), _numpy(data.labels), {k: _numpy(v) for k, v in details.items()})
    out, ys = [], []
    for x, y in data.data:
        x = x.to(device)
        if rep == "feature_maps":
            with torch.no_grad():
                out.append(detector.predict_feature_maps(model.feature_maps(x)))
        else:
            out.append(detector.predict(x).detach())
        ys.append(torch.as_tensor(y))
    return Scored(_numpy(torch.cat(out)), _numpy(torch.cat(ys)))


def _merge(sets: Iterable[EvalSet]) -> Any:
    sets = list(sets)
    if isinstance(sets[0].data, Mapping):
        return {k: torch.cat([torch.as_tensor(s.data[k]) for s in sets]) for k in sets[0].data}
    return [batch for s in sets for batch in s.data]


def run_protocol(detector: Detector, sets: Mapping[str, EvalSet], model=None, device=None,
                 score_roles: Optional[Callable[[str], bool]] = None, fitted: bool = False) -> Dict[str, Scored]:
    """Fit on the one ``id_train`` set, let a detector with ``uses_validation`` choose on the ``id_val`` set
    and the ``ood_val`` sets merged, then score every other set (those whose role ``score_roles`` accepts,
    all by default). Returns ``{set label: Scored}``.

    ``fitted=True``: the detector is already fitted on this training set (a search reusing one fit across
    values of hyperparameters declared ``structural=False``, set with ``set_params``); the validation-time
    choices are made again."""
    by_role: Dict[str, list] = {}
    for label, s in sets.items():
        by_role.setdefault(s.role, []).append(label)
    if len(by_role.get(ID_TRAIN, [])) != 1:
        raise ValueError(f"the protocol needs exactly one {ID_TRAIN} set, got {by_role.get(ID_TRAIN, [])}")
    if model is not None and detector.representation == "model":
        detector.model = model
    if not fitted:
        fit(detector, sets[by_role[ID_TRAIN][0]], model, device)
    if detector.uses_validation:
        if not by_role.get(ID_VAL) or not by_role.get(OOD_VAL):
            raise ValueError(f"{type(detector).__name__} chooses on validation data: give {ID_VAL} and {OOD_VAL} sets")
        detector.select_on_validation(_merge(sets[l] for l in by_role[ID_VAL]),
                                      _merge(sets[l] for l in by_role[OOD_VAL]))
    return {label: score(detector, s, model, device) for label, s in sets.items()
            if s.role != ID_TRAIN and (score_roles is None or score_roles(s.role))}
