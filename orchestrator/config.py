"""The sweep file: schema, loading and validation.

A sweep YAML is parsed into :class:`SweepConfig` (pydantic, unknown keys refused). Semantic
checks that need the registries of ``ood_core`` (data set, architecture and detector names,
their parameters, search spaces, hooked modules) run in :func:`validate_semantics`.
Every problem a user can cause is raised as :class:`ConfigError` whose message starts with the
field path, e.g. ``detectors[2].search.percentile: grid must be a non-empty list`` (YAML syntax errors
with the file, line and column: ``sweeps/x.yaml:12:5: not valid YAML: ...``).

Numeric settings have sane upper bounds (``epochs: 1e30`` is a typo, not a plan), and every name that
becomes a path or an artifact path (the sweep, backbones, data sets, detectors, layers) is restricted to
:data:`SAFE_NAME` so that no name can escape its folder (``name: ../../tmp/x``).
"""
from __future__ import annotations

import inspect
import itertools
import os
import re
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from orchestrator.errors import ConfigError

SEARCH_KINDS = ("grid", "uniform", "loguniform", "choice", "randint")
REDUCTIONS = ("none", "avgpool", "max", "energy", "flatten")

#: names that become a path or an artifact path: a letter or digit, then letters, digits, ``.``, ``_``, ``-``
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 100
#: seeds go to numpy / torch generators: non-negative, at most 32 bits
MAX_SEED = 2 ** 32 - 1


def check_name(name: Any) -> Any:
    """Refuse a name that could escape a folder or break a path (``..``, ``/``, spaces, a leading dot)."""
    if name is None:
        return name
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name or len(name) > MAX_NAME:
        raise ValueError(f"{name!r} is not a safe name: use letters, digits, '.', '_' and '-', starting with a "
                         f"letter or digit, without '..', at most {MAX_NAME} characters (it becomes a path)")
    return name


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
#: a name that becomes a path (see :func:`check_name`)
SafeName = Annotated[str, AfterValidator(check_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class FormatConfig(_Strict):
    """Overrides of the ID input format (channels, image size, normalisation)."""

    channels: Optional[Literal[1, 3]] = None
    image_size: Optional[int] = Field(None, ge=4, le=1024)
    mean: Optional[List[Annotated[float, Field(ge=-1e3, le=1e3)]]] = None
    std: Optional[List[Annotated[float, Field(gt=0, le=1e3)]]] = None


class DataSetConfig(_Strict):
    """One data set: a registry name, its parameters and the split to read."""

    name: Optional[SafeName] = None
    dataset: str
    split: Literal["train", "val", "test"] = "test"
    params: Dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or f"{self.dataset}-{self.split}"


class IdDataConfig(_Strict):
    dataset: str
    params: Dict[str, Any] = Field(default_factory=dict)
    format: FormatConfig = Field(default_factory=FormatConfig)


class OodTestConfig(_Strict):
    near: List[DataSetConfig] = Field(default_factory=list)
    far: List[DataSetConfig] = Field(default_factory=list)


class DataConfig(_Strict):
    id: IdDataConfig
    ood_val: List[DataSetConfig] = Field(min_length=1)
    ood_test: OodTestConfig
    #: auxiliary outliers for detectors trained with them (HeatmapOOD); never scored, and never the
    #: same data as an OOD validation or test set
    outliers: List[DataSetConfig] = Field(default_factory=list)
    allow_val_test_overlap: bool = False


class ObjectiveSection(_Strict):
    """The training objective (``ood_core.objectives``; formulas, papers and defaults there): ``name`` and the
    parameters that objective takes (``lambda``, ``tau``, ``m_in``, ``m_out``, ``layers``; for ``la_ood_cotrain``
    also ``nu``, ``cotrain_epochs``, ``lr``, ``momentum``, ``weight_decay``, ``max_fit_samples``); unset ones take
    their paper's default. Dumped as the full parameter set of ``name``, so the cache key names every value used."""

    name: Literal["cross_entropy", "logitnorm", "outlier_exposure", "energy_regularised",
                  "intermediate_energy", "la_ood_cotrain"] = "cross_entropy"
    lambda_: Optional[float] = Field(None, alias="lambda")
    tau: Optional[float] = None
    m_in: Optional[float] = None
    m_out: Optional[float] = None
    layers: Optional[List[str]] = None
    nu: Optional[float] = None
    cotrain_epochs: Optional[int] = None
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    max_fit_samples: Optional[int] = None

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    def spec(self) -> Dict[str, Any]:
        given = {"lambda": self.lambda_, "tau": self.tau, "m_in": self.m_in, "m_out": self.m_out, "layers": self.layers,
                 "nu": self.nu, "cotrain_epochs": self.cotrain_epochs, "lr": self.lr, "momentum": self.momentum,
                 "weight_decay": self.weight_decay, "max_fit_samples": self.max_fit_samples}
        return {"name": self.name, **{k: v for k, v in given.items() if v is not None}}

    @model_validator(mode="after")
    def _check(self):
        from ood_core.objectives import make_objective

        make_objective(self.spec())  # ValueError naming the parameter
        return self

    @model_serializer(mode="plain")
    def _dump(self) -> Dict[str, Any]:
        from ood_core.objectives import make_objective

        return make_objective(self.spec()).to_dict()

    @property
    def needs_outliers(self) -> bool:
        from ood_core.objectives import NEEDS_OUTLIERS

        return self.name in NEEDS_OUTLIERS


class TrainSection(_Strict):
    """Training settings (mirrors ``ood_core.training.TrainConfig``). ``recipe`` names one of
    ``ood_core.training.RECIPES``; its values fill every field the file does not set."""

    recipe: Optional[str] = None
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["cosine", "cosine_epoch", "multistep", "constant"] = "cosine"
    min_lr: float = Field(0.0, ge=0, le=10)
    milestones: List[Annotated[int, Field(ge=1, le=10_000)]] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: Literal["none", "flip", "crop_flip", "crop_flip_rotate_jitter_erase"] = "none"
    crop_padding: int = Field(4, ge=0, le=512)
    amp: bool = True
    num_workers: int = Field(0, ge=0, le=256)
    #: NC1-NC4 (Papyan, Han & Donoho 2020) after every epoch on this many ID training images (a fixed,
    #: class-stratified sample; 0 = off). A diagnostic: it changes the logged history, never the weights, so it
    #: is kept out of ``model_dump()`` and with it out of the checkpoint's cache key (changing it reuses the
    #: trained checkpoint, whose curves are those it was trained with) and out of ``TrainConfig``.
    neural_collapse_samples: int = Field(1000, ge=0, le=1_000_000, exclude=True)
    #: the loss (a name, or ``{name, lambda / tau / m_in / m_out / layers}``); cross entropy by default, which is
    #: left out of ``model_dump()`` so that the cache keys of cross-entropy backbones are those they always were
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _drop_default_objective(self, handler):
        out = handler(self)
        if isinstance(out, dict) and out.get("objective") == {"name": "cross_entropy"}:
            del out["objective"]
        return out

    @field_validator("neural_collapse_samples")
    @classmethod
    def _nc_samples(cls, n):
        if n == 1:
            raise ValueError("must be 0 (off) or at least 2 (neural collapse compares classes)")
        return n

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, recipe):
        from ood_core.training import RECIPES

        if recipe is not None and recipe not in RECIPES:
            raise ValueError(f"unknown training recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
        return recipe

    @model_validator(mode="after")
    def _apply_recipe(self):
        if self.recipe is None:
            return self
        from ood_core.training import RECIPES

        for key, value in RECIPES[self.recipe].items():
            if key not in self.model_fields_set:
                object.__setattr__(self, key, list(value) if isinstance(value, tuple) else value)
        return self


class BackboneConfig(_Strict):
    name: SafeName
    arch: str
    params: Dict[str, Any] = Field(default_factory=dict)
    seeds: List[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=1000)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: Optional[str] = None  # a trained checkpoint (path / URI) to load instead of training


class LayerConfig(_Strict):
    """A hooked module; its Parquet column is ``name`` (default: the module path), with
    ``.<reduction>`` appended unless the reduction is ``avgpool`` (e.g. ``conv2``, ``conv2.energy``)."""

    name: Optional[SafeName] = None
    module: Optional[str] = None
    preset: Optional[Literal["penultimate", "blocks", "all"]] = None
    types: Optional[List[str]] = None
    pattern: Optional[str] = None
    reduction: Literal["none", "avgpool", "max", "energy", "flatten", "tokens_mean", "cls_token",
                       "channels_last_avgpool"] = "avgpool"


class ExtractConfig(_Strict):
    batch_size: int = Field(256, ge=1, le=65_536)
    layers: List[Union[str, LayerConfig]] = Field(default_factory=lambda: ["logits", "penultimate"])
    #: the type the feature files store: ``float16`` halves them (values rounded to 11 significant bits)
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("layers")
    @classmethod
    def _needs_logits_and_penultimate(cls, layers):
        names = {l if isinstance(l, str) else l.name for l in layers}
        missing = {"logits", "penultimate"} - names
        if missing:
            raise ValueError(f"must include {sorted(missing)} (detectors and accuracy need them)")
        return layers


class DetectorConfig(_Strict):
    type: str
    name: Optional[SafeName] = None
    params: Dict[str, Any] = Field(default_factory=dict)
    search: Optional[Dict[str, Any]] = None
    num_samples: Optional[int] = Field(None, ge=1, le=100_000)
    #: the ID split the detector is fitted on: ``train`` (the default), or ``val`` as OpenOOD v1.5 does for
    #: ReAct, TempScale and KLM (their postprocessors' ``setup`` reads ``id_loader_dict['val']``)
    fit_on: Literal["train", "val"] = "train"

    @property
    def label(self) -> str:
        """The name in tables and runs: ``name``, else the type (a class's name for ``module:Class``)."""
        return self.name or self.type.rsplit(":", 1)[-1]


class SearchConfig(_Strict):
    #: fpr95: OOD accepted at 95% ID TPR; fpr95_openood: OpenOOD v1.5's, ID rejected at 95% OOD TPR
    metric: Literal["auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood"] = "auroc"
    num_samples: int = Field(1, ge=1, le=100_000)
    max_concurrent_trials: int = Field(2, ge=1, le=10_000)
    #: basic: grids crossed, random domains sampled (Tune's variant generator); optuna: TPE per detector
    algorithm: Literal["basic", "optuna"] = "basic"
    #: trials score the validation sets only and the selected configuration is scored on the test sets once;
    #: true: every trial also scores the test sets (for studies of the validation-test gap; slower)
    score_test_every_trial: bool = False

    @property
    def mode(self) -> str:
        return "min" if self.metric in ("fpr95", "fpr95_openood") else "max"


class ResourcesConfig(_Strict):
    gpus_per_task: float = Field(0, ge=0, le=64)
    gpus_per_trial: float = Field(0, ge=0, le=64)
    cpus_per_task: float = Field(1, gt=0, le=1024)
    max_retries: int = Field(2, ge=0, le=100)


class ReportConfig(_Strict):
    """What the sweep reports besides its own results."""

    #: which FPR@95 the results table shows (both are computed and logged): ``fpr95`` (OOD accepted at the
    #: threshold keeping 95% of ID) or ``fpr95_openood`` (OpenOOD v1.5's: ID rejected at 95% of OOD flagged)
    fpr95: Literal["fpr95", "fpr95_openood"] = "fpr95"
    #: an OpenOOD leaderboard CSV (its leaderboard branch's ``results/<benchmark>.csv``): the reported numbers
    #: set beside ours per method (``orchestrator.leaderboard``); read before any compute
    leaderboard: Optional[str] = None
    #: the leaderboard's ``Training`` value of the rows to compare with (OpenOOD's post-hoc methods on
    #: cross-entropy networks)
    leaderboard_training: str = "CrossEntropy"

    @field_validator("leaderboard")
    @classmethod
    def _readable_leaderboard(cls, uri):
        """Read (and parse) it now, so that a missing or malformed file stops the sweep before any compute."""
        if uri is not None:
            from orchestrator.leaderboard import read_leaderboard

            read_leaderboard(uri)
        return uri


class SweepConfig(_Strict):
    name: SafeName
    seed: Seed = 0
    storage: str = ".ood_sweep"
    #: set when ``storage`` is a plain path that every node of a cluster sees (a shared mount)
    shared_storage: bool = False
    tracking_uri: Optional[str] = None
    data: DataConfig
    backbones: List[BackboneConfig] = Field(min_length=1)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    detectors: List[DetectorConfig] = Field(min_length=1)
    search: SearchConfig = Field(default_factory=SearchConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def resolved_tracking_uri(self) -> str:
        """Config value, else ``MLFLOW_TRACKING_URI``, else MLflow's default sqlite store."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


# --------------------------------------------------------------------------- loading


def _format_loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "LayerConfig") or "[" in str(part):
            continue  # union-member names pydantic inserts
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: Dict[Any, Any] = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # the base constructor reports it
                if key in first:
                    mark = first[key]
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given at line {mark.line + 1}, column "
                                    f"{mark.column + 1})", key_node.start_mark)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def yaml_error_message(path: Union[str, Path], exc: yaml.YAMLError) -> str:
    """``file:line:column: not valid YAML: problem (context)`` (1-based line and column, as editors count)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}"
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        problem += f" ({context}" + (f" at line {cmark.line + 1}, column {cmark.column + 1}" if cmark else "") + ")"
    return f"{where}: not valid YAML: {problem}"


def read_yaml(path: Union[str, Path]) -> Any:
    """The YAML document in ``path``; :class:`ConfigError` for a missing, unreadable or invalid file."""
    shown = str(path)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{shown}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read it ({exc.strerror or exc})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_message(shown, exc)) from None


def load_config(path: Union[str, Path]) -> SweepConfig:
    """Read, parse and validate a sweep file; raise :class:`ConfigError` on any problem."""
    return parse_config(read_yaml(path))


def parse_config(raw: Any) -> SweepConfig:
    if not isinstance(raw, dict):
        raise ConfigError("<root>: the config must be a mapping of keys to values")
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        # the most specific error (a union reports one per member; the deepest names the real field)
        err = max(exc.errors(), key=lambda e: len(e["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif err["type"] == "finite_number":
            msg = "must be a finite number"
        elif err["type"] == "int_parsing_size":
            msg = f"{err.get('input')!r} is too large"
        elif err["type"] in ("int_parsing", "float_parsing", "int_from_float", "int_type", "float_type"):
            msg += f" (given: {err.get('input')!r})"
        raise ConfigError(f"{_format_loc(err['loc'])}: {msg}") from None
    validate_semantics(cfg)
    if cfg.search.algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("search.algorithm: optuna is not installed; pip install -e '.[optuna]'") from None
    return cfg


# --------------------------------------------------------------------------- semantics


def _check_dataset(path: str, dataset: str, params: Dict[str, Any], splits: List[str]) -> None:
    """Data set name, parameter names and values (without reading data); ``path`` is the field path."""
    from ood_core.data import DATASETS
    from ood_core.datasets.base import DatasetParamError
    from ood_core.datasets.params import check_values

    if dataset not in DATASETS:
        raise ConfigError(f"{path}.dataset: unknown data set {dataset!r}; known: {', '.join(sorted(DATASETS))}")
    sig = inspect.signature(DATASETS[dataset].build)
    accepted = {n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY or p.kind == p.POSITIONAL_OR_KEYWORD}
    accepted -= {"split", "fmt", "seed"}
    for key in params:
        if key not in accepted:
            raise ConfigError(
                f"{path}.params.{key}: unknown parameter for data set {dataset!r}; accepted: {', '.join(sorted(accepted)) or 'none'}"
            )
    entry = DATASETS[dataset]
    for split in splits:
        try:
            check_values(dataset, entry.build, split, params, entry.num_classes)
        except DatasetParamError as exc:
            if exc.param == "split":
                field = f"{path}.split" if path != "data.id" else f"{path}.dataset"
            else:
                field = f"{path}.params.{exc.param}"
            raise ConfigError(f"{field}: {exc}") from None


def check_search_spec(path: str, spec: Any) -> None:
    """Validate one search spec (grid / distributions / fixed value); raise ConfigError.

    A list holding at least one spec searches a list-valued hyperparameter element by element, e.g.
    per-layer weights ``[{uniform: [0, 1]}, {uniform: [0, 1]}]``; a list of plain values is fixed.
    """
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{path}: an empty list")
        for i, item in enumerate(spec):
            if isinstance(item, list):
                raise ConfigError(f"{path}[{i}]: nested lists are not searchable")
            check_search_spec(f"{path}[{i}]", item)
        return
    if not isinstance(spec, dict):
        if isinstance(spec, (int, float, str, bool)) or spec is None:
            return  # a fixed value
        raise ConfigError(f"{path}: expected a value or one of {{{', '.join(SEARCH_KINDS)}}}")
    if len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
        raise ConfigError(f"{path}: expected exactly one of {', '.join(SEARCH_KINDS)}, got {sorted(spec)}")
    kind, value = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path}.{kind}: must be a non-empty list")
        return
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"{path}.{kind}: must be a list [low, high] of two numbers")
    lo, hi = value
    if not lo < hi:
        raise ConfigError(f"{path}.{kind}: low must be smaller than high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{path}.{kind}: bounds must be positive, got [{lo}, {hi}]")
    if kind == "randint" and not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{path}.{kind}: bounds must be integers")


def reachable_values(spec: Any) -> List[Any]:
    """Every value a search spec can give, as far as a constraint check must see it: a fixed value, each
    grid / choice value, both bounds of an interval. A list of specs (a list-valued hyperparameter searched
    element-wise) gives lists in which each element takes each of its reachable values in turn."""
    if isinstance(spec, list) and any(isinstance(item, dict) for item in spec):
        per = [reachable_values(item) for item in spec]
        return [[values[j % len(values)] for values in per] for j in range(max(len(v) for v in per))]
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS:
        return list(next(iter(spec.values())))
    return [spec]


def fitting_default_space(cls: type, params: Dict[str, Any], space: Dict[str, Any],
                          data: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """A detector's default search space with the grid / choice values that its cross-parameter checks refuse
    beside the fixed ``params`` left out (KNN's default ``k`` grid cut to the bank of a fixed ``alpha``, as the
    data-relative bounds cut it to N). Where none is left, the space stays as it is, so that
    :func:`check_detector_values` refuses it naming the bound."""
    from ood_core.constraints import ParameterError

    out = dict(space)
    for name, spec in space.items():
        if name in params or not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("grid", "choice")):
            continue
        kind, values = next(iter(spec.items()))
        kept = []
        for value in values:
            try:
                cls.check_params({**params, name: value}, data)
                kept.append(value)
            except ParameterError:
                pass
        if kept:
            out[name] = {kind: kept}
    return out


#: grid points of one search checked against the cross-parameter constraints (the first ones, past this)
MAX_CHECKED_POINTS = 100_000


def check_detector_values(path: str, cls: type, params: Dict[str, Any], search: Optional[Dict[str, Any]],
                          data: Optional[Dict[str, int]] = None) -> None:
    """Check the fixed parameters and every reachable search value of a detector against its declared
    constraints (with ``data``, the bounds relative to D / C / N / L too); raise ConfigError naming the field."""
    from ood_core.constraints import ParameterError

    points = [(f"{path}.params.{k}", k, v) for k, v in params.items()]
    points += [(f"{path}.search.{k}", k, v) for k, spec in (search or {}).items() for v in reachable_values(spec)]
    for field_path, name, value in points:
        try:  # with the fixed parameters, so that a declared cross-parameter check sees them too
            cls.check_params({**params, name: value}, data)
        except ParameterError as exc:
            raise ConfigError(f"{field_path}: {exc}") from None
    # every point of the grid where several hyperparameters take finitely many values: a cross-parameter
    # check (VRA's lower_percentile <= upper_percentile) that one point fails would fail its trial
    finite = {k: reachable_values(spec) for k, spec in (search or {}).items()
              if not (isinstance(spec, list) and any(isinstance(item, dict) for item in spec))
              and not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS
                       and next(iter(spec)) not in ("grid", "choice"))}
    if len(finite) >= 2:
        for combo in itertools.islice(itertools.product(*finite.values()), MAX_CHECKED_POINTS):
            point = dict(zip(finite, combo))
            try:
                cls.check_params({**params, **point}, data)
            except ParameterError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
                raise ConfigError(f"{path}.search: {exc} (at the grid point {shown})") from None


def validate_semantics(cfg: SweepConfig) -> None:
    from ood_core.detectors.registry import detector_params, get_spec
    from ood_core.models import check_architecture

    _check_dataset("data.id", cfg.data.id.dataset, cfg.data.id.params, ["train", "val", "test"])
    labels = set()
    for group, sets in (("data.ood_val", cfg.data.ood_val), ("data.ood_test.near", cfg.data.ood_test.near),
                        ("data.ood_test.far", cfg.data.ood_test.far), ("data.outliers", cfg.data.outliers)):
        for i, ds in enumerate(sets):
            _check_dataset(f"{group}[{i}]", ds.dataset, ds.params, [ds.split])
            if ds.label in labels:
                raise ConfigError(f"{group}[{i}].name: duplicate data set name {ds.label!r}")
            labels.add(ds.label)
    if not cfg.data.ood_test.near and not cfg.data.ood_test.far:
        raise ConfigError("data.ood_test: needs at least one near or far OOD test set")
    _check_leakage(cfg)

    names = set()
    for i, bb in enumerate(cfg.backbones):
        try:
            check_architecture(bb.arch)  # a registry name, torchvision:<name> or timm:<name>; close matches if not
        except ValueError as exc:
            raise ConfigError(f"backbones[{i}].arch: {exc}") from None
        if bb.name in names:
            raise ConfigError(f"backbones[{i}].name: duplicate backbone name {bb.name!r}")
        names.add(bb.name)

    for i, layer in enumerate(cfg.extract.layers):
        if isinstance(layer, str):
            if layer not in ("logits", "penultimate"):
                raise ConfigError(
                    f"extract.layers[{i}]: {layer!r} is not a representation; write {{module: ...}}, "
                    "{preset: blocks|all|penultimate}, {types: [Conv2d]} or {pattern: 'layer*.conv1'}"
                )
            continue
        chosen = [k for k in ("module", "preset", "types", "pattern") if getattr(layer, k) is not None]
        if layer.name in ("logits", "penultimate") and not chosen:
            continue
        if not chosen:
            raise ConfigError(f"extract.layers[{i}]: give module, preset, types or pattern")
        if "module" in chosen and len(chosen) > 1:
            raise ConfigError(f"extract.layers[{i}]: module names one layer; it cannot be combined with {chosen[1]}")
        if "preset" in chosen and len(chosen) > 1:
            raise ConfigError(f"extract.layers[{i}]: a preset cannot be combined with {chosen[1]}")
        if layer.name is not None and "module" not in chosen:
            raise ConfigError(f"extract.layers[{i}].name: only a single module can be renamed")

    labels = set()
    for i, det in enumerate(cfg.detectors):
        path = f"detectors[{i}]"
        try:
            spec = get_spec(det.type)
        except KeyError as exc:
            raise ConfigError(f"{path}.type: {exc.args[0]}") from None
        if det.label in labels:
            raise ConfigError(f"{path}.name: duplicate detector name {det.label!r}")
        labels.add(det.label)
        if spec.needs_outliers and not cfg.data.outliers:
            raise ConfigError(f"{path}.type: {spec.name} trains on auxiliary outliers; list them in data.outliers")
        allowed = set(detector_params(spec.name))
        for key in det.params:
            if key not in allowed:
                raise ConfigError(
                    f"{path}.params.{key}: {spec.name} has no hyperparameter {key!r}; known: {', '.join(sorted(allowed)) or 'none'}"
                )
        if det.search is not None:
            for key, value in det.search.items():
                if key not in allowed:
                    raise ConfigError(
                        f"{path}.search.{key}: {spec.name} has no hyperparameter {key!r}; known: {', '.join(sorted(allowed)) or 'none'}"
                    )
                check_search_spec(f"{path}.search.{key}", value)
                if key in det.params:
                    raise ConfigError(f"{path}.search.{key}: also fixed in params; give it in one place")
        check_detector_values(path, spec.cls, det.params, det.search)


def _dataset_identity(ds: DataSetConfig):
    import json

    return (ds.dataset, ds.split, json.dumps(ds.params, sort_keys=True))


def val_test_overlap(cfg: SweepConfig) -> List[str]:
    """Labels of OOD validation sets that are the same data as an OOD test set."""
    tests = {_dataset_identity(ds) for ds in cfg.data.ood_test.near + cfg.data.ood_test.far}
    return [ds.label for ds in cfg.data.ood_val if _dataset_identity(ds) in tests]


def _check_leakage(cfg: SweepConfig) -> None:
    """Refuse OOD validation sets that are the same data as an OOD test set."""
    tests = {
        _dataset_identity(ds): f"data.ood_test.{group}[{i}]"
        for group, sets in (("near", cfg.data.ood_test.near), ("far", cfg.data.ood_test.far))
        for i, ds in enumerate(sets)
    }
    for i, ds in enumerate(cfg.data.ood_val):
        clash = tests.get(_dataset_identity(ds))
        if clash and not cfg.data.allow_val_test_overlap:
            raise ConfigError(
                f"data.ood_val[{i}]: same data as {clash} (selection would see the test set); "
                "use another split, or set data.allow_val_test_overlap: true to accept optimistic results"
            )
    scored = {**tests, **{_dataset_identity(ds): f"data.ood_val[{i}]" for i, ds in enumerate(cfg.data.ood_val)}}
    for i, ds in enumerate(cfg.data.outliers):
        clash = scored.get(_dataset_identity(ds))
        if clash:
            raise ConfigError(f"data.outliers[{i}]: same data as {clash} (a detector would train on what it is "
                              "scored on); use another split")
