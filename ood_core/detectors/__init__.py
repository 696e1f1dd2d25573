"""OOD detectors on the API of :mod:`ood_core.api` (higher score = more OOD) and their registry."""
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
    "MahalanobisPP",
    "RMDPP",
    "WeiPer",
    "Relation",
    "GROOD",
    "ViM",
    "KNN",
    "ReAct",
    "ASH",
    "SCALE",
    "VRA",
    "RankFeat",
    "MultiMahalanobis",
    "LayerEnergy",
    "LayerEnergyAggregate",
    "Gram",
    "LAOOD",
    "LAOODEarlyExit",
    "LayerFusion",
    "AdaScaleA",
    "AdaScaleL",
    "NACUE",
    "ODIN",
    "IODIN",
    "CADRef",
    "OptFS",
    "CFOOD",
    "LTS",
    "PNML",
    "GradNorm",
    "GradNormKL",
    "MCD",
    "MahalanobisPreprocessed",
    "HeatmapOOD",
    "TemperatureScaling",
    "KLMatching",
    "Entropy",
    "GEN",
    "OpenMax",
    "WeightedEBO",
    "RMD",
    "GMM",
    "NECO",
    "NCI",
    "fDBD",
    "NNGuide",
    "SHE",
    "DICE",
    "REGISTRY",
    "DetectorSpec",
    "build_detector",
    "detector_params",
    "fit_detector",
    "get_spec",
    "register",
    "score_detector",
]
