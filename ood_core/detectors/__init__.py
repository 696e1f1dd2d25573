"""OOD detectors on the API of :mod:`ood_core.api` (higher score = more OOD) and their registry."""
from .knn import KNN
from .logits import EnergyBased, MaxLogit, MaxSoftmax
from .mahalanobis import Mahalanobis
from .react import ReAct
from .registry import (
    REGISTRY,
    DetectorSpec,
    build_detector,
    detector_params,
    fit_detector,
    get_spec,
    register,
    score_detector,
)
from .vim import ViM

__all__ = [
    "MaxSoftmax",
    "MaxLogit",
    "EnergyBased",
    "Mahalanobis",
    "ViM",
    "KNN",
    "ReAct",
    "REGISTRY",
    "DetectorSpec",
    "build_detector",
    "detector_params",
    "fit_detector",
    "get_spec",
    "register",
    "score_detector",
]
