"""Detector registry: name -> class, representation, and the glue that feeds cached representations.

``reps`` (a dict of tensors or arrays, one row per sample) holds ``"logits"`` ``(N, C)``,
``"features"`` ``(N, D)`` penultimate features, and any layer columns. Dispatch by
:attr:`DetectorSpec.representation`:

=================  =============================================================
``"logits"``       ``fit_logits(reps["logits"], y)`` / ``predict_logits(reps["logits"])``
``"features"``     ``fit_features(reps["features"], y)`` / ``predict_features(...)``
``"feature_maps"`` ``fit_feature_maps(reps["feature_maps"], y)`` / ``predict_feature_maps(...)``
``"layers"``       ``fit_structured(reps, y)`` / ``predict_structured(reps)`` (the whole dict)
``"model"``        not scorable from cached representations (model-in-the-loop)
=================  =============================================================
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..api import Detector
from ..rows import RowSource
from .knn import KNN, NNGuide
from .logits import EnergyBased, MaxLogit, MaxSoftmax
from .mahalanobis import Mahalanobis
from .mahalanobis_pp import MahalanobisPP, RMDPP
from .relation import Relation
from .weiper import WeiPer
from .grood import GROOD
from .feature_stats import GMM, NCI, NECO, RMD, fDBD
from .she import SHE
from .dice import DICE
from .openmax import OpenMax
from .probability import GEN, Entropy, KLMatching, TemperatureScaling, WeightedEBO
from .model_in_loop import MCD, ODIN, GradNorm, GradNormKL, MahalanobisPreprocessed
from .model_in_loop import IODIN
from .gram import Gram
from .heatmap import HeatmapOOD
from .la_ood import LAOOD, LAOODEarlyExit
from .fusion import LayerFusion
from .adascale import AdaScaleA, AdaScaleL
from .multilayer import LayerEnergy, LayerEnergyAggregate, MultiMahalanobis
from .nac import NACUE
from .react import ReAct
from .cadref import CADRef
from .cfood import CFOOD
from .lts import LTS
from .optfs import OptFS
from .pnml import PNML
from .shaping import ASH, SCALE, VRA, RankFeat
from .vim import ViM

REPRESENTATIONS = ("logits", "features", "feature_maps", "layers", "model")
#: constructor arguments that are wiring, not hyperparameters
_WIRING = {"self", "model", "head", "w", "b", "backbone", "encoder", "feature_layers", "num_classes"}


@dataclass(frozen=True)
class DetectorSpec:
    """How the sweep builds, fits and scores one detector class: read from the class's declared contract."""

    name: str
    cls: type

    def __post_init__(self):
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"{self.name}: unknown representation {self.representation!r}; one of {REPRESENTATIONS}")

    @property
    def representation(self) -> str:
        return self.cls.representation

    @property
    def needs_head(self) -> bool:
        return self.cls.needs_head

    @property
    def needs_outliers(self) -> bool:
        return self.cls.needs_outliers

    @property
    def constraints(self) -> Dict[str, Any]:
        return dict(self.cls.parameter_constraints)

    @property
    def search_space(self) -> Dict[str, Any]:
        return self.cls.search_space()


REGISTRY: Dict[str, DetectorSpec] = {}


def register(cls: type, name: Optional[str] = None) -> DetectorSpec:
    """Add detector class ``cls`` to :data:`REGISTRY` (names are unique, case-insensitively)."""
    spec = DetectorSpec(name or cls.__name__, cls)
    clash = [k for k in REGISTRY if k.lower() == spec.name.lower() and REGISTRY[k] != spec]
    if clash:
        raise ValueError(f"detector {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


for _cls in (
    # logits
    MaxSoftmax, MaxLogit, EnergyBased, TemperatureScaling, KLMatching, Entropy, GEN, OpenMax, WeightedEBO,
    # penultimate features
    Mahalanobis, RMD, GMM, ViM, KNN, NNGuide, SHE, NCI, fDBD, DICE, NECO,
    MahalanobisPP, RMDPP, WeiPer, Relation, GROOD,
    CFOOD, PNML,
    # activation shaping
    ReAct, ASH, SCALE, VRA, RankFeat,
    CADRef, OptFS, LTS,
    # several layers
    MultiMahalanobis, LayerEnergy, LayerEnergyAggregate, Gram, LAOOD, LAOODEarlyExit,
    LayerFusion,
    # the network in the loop
    NACUE, ODIN, GradNorm, GradNormKL, MCD, MahalanobisPreprocessed, HeatmapOOD,
    IODIN,
    AdaScaleA, AdaScaleL,
):
    register(_cls)


def get_spec(name: str) -> DetectorSpec:
    """Spec of detector ``name`` (case-insensitive), or of a class given by import path
    ``"package.module:ClassName"`` (a detector of your own; it is imported and registered under that path).
    KeyError listing the known names otherwise."""
    if isinstance(name, str):
        if name in REGISTRY:
            return REGISTRY[name]
        for key, spec in REGISTRY.items():
            if key.lower() == name.lower():
                return spec
        if ":" in name:
            return register(_import_detector(name), name)
    raise KeyError(f"unknown detector {name!r}; known detectors: {', '.join(sorted(REGISTRY))} "
                   "(or a class of your own as 'package.module:ClassName')")


def _import_detector(path: str) -> type:
    import importlib

    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise KeyError(f"cannot import detector {path!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise KeyError(f"{path!r} is not a subclass of ood_core.api.Detector")
    return cls


def detector_params(name: str) -> List[str]:
    """Constructor hyperparameters of detector ``name`` a user may set (no model/head/w/b)."""
    spec = get_spec(name)
    if spec.cls.parameter_constraints:
        return spec.cls.hyperparameters()
    sig = inspect.signature(spec.cls.__init__)
    return [
        p.name
        for p in sig.parameters.values()
        if p.name not in _WIRING and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _spec_of(det: Detector) -> DetectorSpec:
    for spec in REGISTRY.values():
        if type(det) is spec.cls:
            return spec
    for spec in REGISTRY.values():
        if isinstance(det, spec.cls):
            return spec
    raise KeyError(f"{type(det).__name__} is not a registered detector; known: {', '.join(sorted(REGISTRY))}")


def build_detector(
    name: str, params: Optional[Mapping[str, Any]] = None, head: Optional[Tuple[Tensor, Tensor]] = None
) -> Detector:
    """Instantiate detector ``name`` with hyperparameters ``params``.

    ``head`` is the classifier ``(w (C, D), b (C,))``; it is passed as ``w=, b=`` or ``head=``
    to detectors that need it (``needs_head``) and ignored by the others. Unknown parameters
    raise :class:`TypeError` naming the detector, the parameter and the accepted ones.
    """
    spec = get_spec(name)
    params = dict(params or {})
    allowed = detector_params(spec.name)
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise TypeError(
            f"{spec.name}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(allowed) if allowed else '(none)'}"
        )
    kwargs: Dict[str, Any] = dict(params)
    if spec.needs_head:
        if head is None:
            raise ValueError(f"{spec.name}: needs the classifier head (w, b), but none was given")
        w, b = head
        names = inspect.signature(spec.cls.__init__).parameters
        if "head" in names:
            kwargs["head"] = (torch.as_tensor(w), None if b is None else torch.as_tensor(b))
        else:
            kwargs["w"] = torch.as_tensor(w)
            kwargs["b"] = None if b is None else torch.as_tensor(b)
    return spec.cls(**kwargs)


def _rep(spec: DetectorSpec, reps: Mapping[str, Any], key: str) -> Tensor:
    if key not in reps:
        raise KeyError(f"{spec.name} needs the representation {key!r}; available: {', '.join(sorted(reps))}")
    value = reps[key]
    return value if isinstance(value, Tensor) else torch.as_tensor(value)


def fit_detector(det: Detector, reps: Mapping[str, Any], labels) -> Detector:
    """Fit ``det`` on ID-train representations ``reps`` and ``labels`` (no-op fit when not needed)."""
    spec = _spec_of(det)
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    rep = spec.representation
    if rep in ("logits", "features") and isinstance(reps, RowSource):  # rows read in chunks where det streams
        if rep not in reps:
            raise KeyError(f"{spec.name} needs the representation {rep!r}; available: {', '.join(sorted(reps))}")
        return det.fit_rows(reps, rep)
    if rep in ("logits", "features", "feature_maps"):
        return getattr(det, f"fit_{rep}")(_rep(spec, reps, rep), y)
    if rep == "layers":
        return det.fit_structured(reps, y)
    raise ValueError(f"{spec.name} runs the model in the loop; it cannot be fitted on cached representations")


def score_detector(det: Detector, reps: Mapping[str, Any]) -> Tensor:
    """Outlier scores ``(N,)`` (higher = more OOD) of ``det`` on representations ``reps``."""
    spec = _spec_of(det)
    rep = spec.representation
    if rep in ("logits", "features", "feature_maps"):
        return getattr(det, f"predict_{rep}")(_rep(spec, reps, rep))
    if rep == "layers":
        return det.predict_structured(reps)
    raise ValueError(f"{spec.name} runs the model in the loop; it cannot score cached representations")
