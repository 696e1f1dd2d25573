"""The detector API, after pytorch-ood (Kirchheim, Filax & Ortmeier, "PyTorch-OOD: A Library for Out-of-Distribution
Detection based on PyTorch", CVPR Workshops 2022).

Every detector scores samples so that **higher = more OOD**. A detector owns optional
state (class means, covariances, principal subspaces...) that is fitted on ID training
data only, and can score either raw inputs through ``model`` (``fit`` / ``predict``) or a
cached representation directly, which is how ``ood-sweep`` uses it on Parquet features:

==========================  =========================================================
base class                   representation methods
==========================  =========================================================
:class:`LogitsDetector`      ``fit_logits(logits, y)`` / ``predict_logits(logits)``
:class:`FeaturesDetector`    ``fit_features(z, y)`` / ``predict_features(z)``
:class:`FeatureMapsDetector` ``fit_feature_maps(f, y)`` / ``predict_feature_maps(f)``
:class:`StructuredDetector`  ``fit_structured(...)`` / ``predict_structured(...)``
==========================  =========================================================

Detectors run on the device of their inputs; ``to(device)`` moves their fitted state.
"""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .constraints import Param, check_params


class DetectorError(Exception):
    """Base class of the errors a detector raises on misuse; the message names the detector."""


class RequiresFitException(DetectorError):
    """``predict`` was called on a detector that must be fitted first."""


class ModelNotSetException(DetectorError):
    """A method needs ``model`` (raw inputs) but the detector was built with ``model=None``."""


class InvalidInputError(DetectorError, ValueError):
    """Inputs with the wrong shape, dtype, or containing NaN / inf."""


def check_input(detector: "Detector", x: Tensor, ndim: Optional[int] = None, name: str = "input",
                finite: bool = True) -> Tensor:
    """Validate ``x`` for ``detector``: a floating tensor of ``ndim`` dimensions, all finite.

    Returns ``x`` (converted to a tensor if it was array-like). Raises
    :class:`InvalidInputError` with a message naming the detector and the problem.
    ``finite=False`` leaves out the value check (one pass over ``x``): for callers whose own
    reductions of ``x`` are non-finite whenever an entry is, and which then call this again.
    """
    label = type(detector).__name__
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:  # pragma: no cover - message path
            raise InvalidInputError(f"{label}: {name} must be a tensor, got {type(x).__name__}") from exc
    if (ndim is not None and x.ndim != ndim) or x.ndim == 0:
        want = f"{ndim} dimensions" if ndim is not None else "at least one dimension"
        raise InvalidInputError(f"{label}: {name} must have {want}, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.float()
    if finite and x.numel():
        # min and max are finite iff every entry is (NaN propagates through both): one reduction
        lo, hi = torch.aminmax(x)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise InvalidInputError(f"{label}: {name} contains NaN or inf values")
    return x


def _checked_init(init):
    """Wrap a detector's ``__init__``: pytorch-ood's keyword aliases are mapped to ours, and the values
    passed (defaults included) are checked against ``parameter_constraints`` before ``__init__`` stores
    them. Only the outermost constructor of a ``super().__init__`` chain checks."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if self.__dict__.get("_initialising"):
            return init(self, *args, **kwargs)
        cls = type(self)
        for alias, name in cls.aliases.items():
            if alias in kwargs and alias not in sig.parameters:
                if name in kwargs:
                    raise TypeError(f"{cls.__name__}: give {name}= or {alias}=, not both")
                kwargs[name] = kwargs.pop(alias)
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as exc:
            accepted = ", ".join(n for n in sig.parameters if n != "self")
            raise TypeError(f"{cls.__name__}: {exc}; accepted: {accepted}") from None
        bound.apply_defaults()
        cls.check_params({k: v for k, v in bound.arguments.items() if k != "self"})
        self.__dict__["_initialising"] = True
        try:
            init(*bound.args, **bound.kwargs)
        finally:
            self.__dict__.pop("_initialising", None)

    wrapper._contract_wrapped = True
    return wrapper



def _same(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are the same value (tensors and lists compared element-wise)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are different
        return a is b


class Detector:
    """Root of the detector API: the declared contract, and the machinery every detector shares.

    A subclass declares, once, as class attributes:

    * :attr:`representation`: what it consumes (``"logits"``, ``"features"``, ``"feature_maps"``,
      ``"layers"`` or ``"model"``: the network in the loop);
    * :attr:`needs_head` / :attr:`needs_outliers`: whether it needs the classifier head ``(w, b)`` /
      auxiliary outliers in ``fit`` (label < 0);
    * :attr:`parameter_constraints`: each hyperparameter's :class:`~ood_core.constraints.Param`
      (type, range, options, bounds relative to the data ``D`` / ``C`` / ``N`` / ``L``, structural or not);
    * :attr:`default_search_space` (``orchestrator.search`` specs), adapted to the data by
      :meth:`search_space`;
    * :attr:`aliases`: pytorch-ood's keyword names accepted for ours (``backbone`` for ``model`` ...).

    ``__init__`` only stores its arguments. The values passed are checked against the declared
    constraints when the object is built (one place, here); the data-relative bounds are checked in
    ``fit`` (:meth:`check_data`) and by the sweep's plan before any training.
    """

    representation: ClassVar[str] = "model"
    needs_head: ClassVar[bool] = False
    needs_outliers: ClassVar[bool] = False
    requires_fit: ClassVar[bool] = False
    #: ``fit`` reads the class labels (False: one-class / label-free fits, where ``y`` may be omitted)
    needs_labels: ClassVar[bool] = True
    #: makes a choice on validation data after fit (:meth:`select_on_validation`: ID val + OOD val)
    uses_validation: ClassVar[bool] = False
    #: the fit reads the training rows in chunks (``fit_rows`` on a :class:`~ood_core.rows.RowSource`), never all
    #: of them at once: sufficient statistics, exact streaming selection, a sampled bank
    streams_fit: ClassVar[bool] = False
    #: names of the training-set statistics the streamed fit shares with other fits on one machine
    #: (:func:`ood_core.streaming.shared`): the first fit that asks computes one, the others wait for it, so a
    #: scheduler keeps fits of one statistic from starting side by side
    shared_statistics: ClassVar[Tuple[str, ...]] = ()
    parameter_constraints: ClassVar[Dict[str, Param]] = {}
    #: hyperparameter name -> search spec, e.g. ``{"t": {"grid": [1, 10, 100]}}``
    default_search_space: ClassVar[Dict[str, Any]] = {}
    #: keyword aliases accepted by the constructor (pytorch-ood's names) -> our names
    aliases: ClassVar[Dict[str, str]] = {"backbone": "model", "encoder": "model"}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_contract_wrapped", False):
            cls.__init__ = _checked_init(init)

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        self.model = model
        self._fitted = False

    # -- the contract ------------------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> List[str]:
        """Names of the declared hyperparameters (constructor arguments that are not wiring)."""
        return list(cls.parameter_constraints)

    @classmethod
    def check_params(cls, params: Mapping[str, Any], data: Optional[Mapping[str, int]] = None) -> None:
        """Raise :class:`~ood_core.constraints.ParameterError` for a value its declaration refuses
        (with ``data``, also the bounds relative to ``D`` / ``C`` / ``N`` / ``L``)."""
        check_params(cls.__name__, cls.parameter_constraints, params, data)

    def get_params(self) -> Dict[str, Any]:
        """The declared hyperparameters' current values."""
        return {name: getattr(self, name) for name in self.parameter_constraints if hasattr(self, name)}

    def check_data(self, **data: Optional[int]) -> None:
        """Check the hyperparameters against the data being fitted (``D=``, ``C=``, ``N=``, ``L=``); the sizes
        are kept, so that :meth:`set_params` on the fitted detector checks against them too."""
        sizes = {**self.__dict__.get("_data_sizes", {}), **{k: v for k, v in data.items() if v is not None}}
        type(self).check_params(self.get_params(), sizes)
        self._data_sizes = sizes

    @classmethod
    def structural(cls, name: str) -> bool:
        """Whether hyperparameter ``name`` changes the fitted state (undeclared names count as structural)."""
        decl = cls.parameter_constraints.get(name)
        return decl is None or decl.structural

    def set_params(self, **params: Any) -> "Detector":
        """Change hyperparameters, as scikit-learn's ``set_params``; returns ``self``.

        On a fitted detector only hyperparameters declared ``structural=False`` may change: they act when
        scoring, so the fitted state stays valid (a search reuses one fit for all the values of such a
        hyperparameter). The values are checked against the declared constraints and the fitted data's sizes.
        """
        name = type(self).__name__
        unknown = [k for k in params if k not in self.parameter_constraints]
        if unknown:
            raise TypeError(f"{name}: unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
                            f"declared: {', '.join(self.parameter_constraints) or '(none)'}")
        if self.__dict__.get("_fitted"):
            changed = [k for k, v in params.items() if self.structural(k) and not _same(getattr(self, k, None), v)]
            if changed:
                raise ValueError(f"{name}: {', '.join(changed)} changes the fitted state; build and fit a new "
                                 "detector for it")
        type(self).check_params({**self.get_params(), **params}, self.__dict__.get("_data_sizes"))
        for key, value in params.items():
            setattr(self, key, value)
        return self

    @classmethod
    def search_space(cls, data: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
        """The default search space for ``data`` (``D``, ``C``, ``N``, ``L``): grid and choice values that
        do not fit the data are left out (OpenOOD's grids are kept where they fit). A detector whose
        grid must be rescaled rather than cut overrides this."""
        space = copy.deepcopy(cls.default_search_space)
        if not data:
            return space
        for name, spec in list(space.items()):
            decl = cls.parameter_constraints.get(name)
            if decl is None or not isinstance(spec, dict) or len(spec) != 1:
                continue
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice"):
                kept = [v for v in values if decl.problem(v, data) is None]
                if kept:
                    space[name] = {kind: kept}
                else:
                    del space[name]  # nothing fits: the constructor's default applies
        return space

    def select_on_validation(self, id_val: Any, ood_val: Any) -> None:
        """Choices made on validation data after ``fit`` (ID val and OOD val representations, in the form
        ``predict`` takes them), e.g. a per-layer sign; only for detectors with :attr:`uses_validation`."""

    # -- generic API -----------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        return self.predict(x)

    def fit(self, data_loader) -> "Detector":
        """Fit on a loader of ``(x, y)`` batches. Detectors that need no fit return ``self``."""
        return self

    def predict(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- input checks, shared by every detector ----------------------------------------
    def _input(self, x, ndim: Optional[int] = 2, name: str = "input", finite: bool = True,
               width: Optional[int] = None) -> Tensor:
        """``x`` as a floating tensor of ``ndim`` dimensions, all finite, and of width ``width`` (by default,
        after a fit, the fitted width :attr:`n_features_in_`); :class:`InvalidInputError` naming the class
        otherwise."""
        x = check_input(self, x, ndim=ndim, name=name, finite=finite)
        width = getattr(self, "n_features_in_", None) if width is None else width
        if isinstance(width, int) and x.ndim >= 2 and x.shape[1] != width:
            raise InvalidInputError(f"{type(self).__name__}: {name} have width {x.shape[1]}, but the detector "
                                    f"was fitted / built for width {width}")
        return x

    def _training_input(self, x, y, ndim: Optional[int] = 2, name: str = "input",
                        finite: bool = True) -> Tuple[Tensor, Tensor]:
        """Validated ID training rows ``(x, y)``: rows labelled < 0 (auxiliary outliers) dropped; sets
        :attr:`n_features_in_` and checks the data-relative constraints (``D``, ``N``, ``C``)."""
        x = check_input(self, x, ndim=ndim, name=name, finite=finite)
        y = self._training_labels(y, x.shape[0], x.shape[1] if x.ndim >= 2 else None, x.device, name)
        known = y >= 0
        if not bool(known.all()):
            x, y = x[known], y[known]
        return x, y

    def _training_labels(self, y, n: int, width: Optional[int], device, name: str = "input") -> Tensor:
        """The labels ``(n,)`` of ``n`` training rows of width ``width``, checked (integers; smaller than the
        number of classes for logits; at least one ID row); checks the data-relative constraints with the number
        of ID rows (labels >= 0) and sets :attr:`n_features_in_`. Returns them as int64, outliers included."""
        label = type(self).__name__
        if y is None:
            if self.needs_labels:
                raise InvalidInputError(f"{label}: fit needs the labels y ({n},) of the {name} "
                                        "(label < 0 marks an auxiliary outlier)")
            y = torch.zeros(n, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device)
        if y.ndim != 1 or y.shape[0] != n:
            raise InvalidInputError(f"{label}: labels must have shape ({n},) to match {name}, "
                                    f"got {tuple(y.shape)}")
        if torch.is_floating_point(y):
            if y.numel() and not (torch.isfinite(y).all() and (y == y.round()).all()):
                raise InvalidInputError(f"{label}: labels must be integers")
        y = y.long()
        known = int((y >= 0).sum())
        if known == 0:
            raise InvalidInputError(f"{label}: no in-distribution samples (labels >= 0) to fit on")
        if width == 0:
            raise InvalidInputError(f"{label}: {name} have zero dimensions")
        top = int(y.max()) if y.numel() else -1
        if self.representation == "logits" and width is not None and top >= width:
            raise InvalidInputError(f"{label}: labels must be smaller than the number of classes C={width} "
                                    f"(the logits' width), got {top}")
        head = getattr(self, "w", None)
        if self.needs_head and isinstance(head, Tensor) and width is not None and head.shape[1] != width:
            raise InvalidInputError(f"{label}: {name} have dimension {width}, head weights expect {head.shape[1]}")
        classes = head.shape[0] if isinstance(head, Tensor) else (top + 1 if top >= 0 else None)
        if self.representation == "logits" and width is not None:
            classes = width
        self.check_data(D=width, C=classes, N=known)
        self.n_features_in_ = width
        return y

    # -- state helpers -----------------------------------------------------------------
    def _require_model(self) -> Callable[[Tensor], Tensor]:
        if self.model is None:
            raise ModelNotSetException(
                f"{type(self).__name__}: no model was given; use the representation methods "
                f"(e.g. predict_logits / predict_features) or pass model=..."
            )
        return self.model

    def _require_fit(self) -> None:
        if self.requires_fit and not self._fitted:
            raise RequiresFitException(f"{type(self).__name__}: call fit before predict")

    def _mark_fitted(self) -> None:
        self._fitted = True

    @property
    def device(self) -> Optional[torch.device]:
        """Device of the detector's tensor state, if it has any."""
        for value in vars(self).values():
            if isinstance(value, Tensor):
                return value.device
            if isinstance(value, Detector) and value.device is not None:
                return value.device
            if isinstance(value, torch.nn.Module):
                for p in value.parameters():
                    return p.device
        return None

    def to(self, device) -> "Detector":
        """Move tensors and modules held by the detector (also inside lists/dicts) to ``device``."""

        def move(v):
            if isinstance(v, (Tensor, torch.nn.Module, Detector)):
                return v.to(device)
            if isinstance(v, list):
                return [move(i) for i in v]
            if isinstance(v, tuple):
                return tuple(move(i) for i in v)
            if isinstance(v, dict):
                return {k: move(i) for k, i in v.items()}
            return v

        for key, value in list(vars(self).items()):
            if key == "model":
                if isinstance(value, torch.nn.Module):
                    value.to(device)
                continue
            setattr(self, key, move(value))
        return self

    @torch.no_grad()
    def _collect(self, data_loader, fn: Callable[[Tensor], Tensor]):
        """Run ``fn`` over a loader of ``(x, y)`` and concatenate outputs and labels."""
        outs, ys = [], []
        for x, y in data_loader:
            outs.append(fn(x))
            ys.append(y)
        return torch.cat(outs), torch.cat(ys)


def _defined_first(cls: type, name: str, other: str) -> bool:
    """Whether ``cls`` resolves ``name`` to a class that comes before the one that defines ``other`` in its
    method resolution order (a subclass overrode ``name`` alone)."""
    owners = [next(k for k in cls.__mro__ if attr in vars(k)) for attr in (name, other)]
    return cls.__mro__.index(owners[0]) < cls.__mro__.index(owners[1])


class _OneInputDetector(Detector):
    """Detectors that read one tensor per sample. Subclasses implement the formula: ``_fit(x, y)`` on
    validated ID training rows (when the detector has state) and ``_score(x)`` on validated rows; the
    representation methods do the input checks, the fitted flag and the data-relative constraints once,
    here."""

    _ndim: ClassVar[Optional[int]] = 2
    _input_name: ClassVar[str] = "input"
    #: the representation methods' suffix (``fit_<_method>`` / ``predict_<_method>``)
    _method: ClassVar[str] = "features"

    def _fit_input(self, x: Tensor, y: Optional[Tensor]) -> "Detector":
        x, y = self._training_input(x, y, ndim=self._ndim, name=self._input_name)
        with torch.no_grad():
            self._fit(x, y)
        self._mark_fitted()
        return self

    def _predict_input(self, x: Tensor) -> Tensor:
        self._require_fit()
        x = self._input(x, ndim=self._ndim, name=self._input_name)
        if not self._fitted and x.ndim == 2:  # no fit checked the data-relative bounds: check them here
            self.check_data(D=x.shape[1], C=x.shape[1] if self.representation == "logits" else None)
        return self._score(x)

    def _fit(self, x: Tensor, y: Tensor) -> None:
        """Fit the state from validated ID training rows (nothing by default)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a subclass that overrides _fit alone (to transform the rows, say) would be bypassed by the _fit_stream it
        # inherits: it fits in memory, through its own _fit
        if cls.streams_fit and _defined_first(cls, "_fit", "_fit_stream"):
            cls.streams_fit = False

    def fit_rows(self, rows, column: str) -> "Detector":
        """Fit on column ``column`` of a :class:`~ood_core.rows.RowSource` (a training set that need not be held
        in memory twice): a detector with :attr:`streams_fit` reads it chunk by chunk, in as many passes as its
        fit needs; the others read the whole column; one that needs no fit reads nothing."""
        if not self.requires_fit:
            return self
        if not self.streams_fit:
            return self._fit_input(rows.tensor(column), rows.labels)
        shape = rows.shape(column)
        if self._ndim is not None and len(shape) + 1 != self._ndim:
            raise InvalidInputError(f"{type(self).__name__}: {self._input_name} must have {self._ndim} dimensions, "
                                    f"got shape {(rows.num_rows, *shape)}")
        self._training_labels(rows.labels, rows.num_rows, shape[0] if shape else None, rows.labels.device,
                              self._input_name)

        def chunks():
            for x, y in rows.chunks(column):
                x = check_input(self, x, ndim=self._ndim, name=self._input_name)
                known = y >= 0
                yield (x, y) if bool(known.all()) else (x[known], y[known])

        chunks.share = lambda name, compute: rows.shared(column, name, compute)  # see ood_core.streaming.shared
        with torch.no_grad():
            self._fit_stream(chunks)
        self._mark_fitted()
        return self

    def _fit_stream(self, chunks: Callable[[], Iterable[Tuple[Tensor, Tensor]]]) -> None:
        """Fit from ``chunks()``: each call starts a new pass over the validated ID training rows as float32
        ``(x, y)`` chunks (labels >= 0; the data-relative constraints are already checked). Detectors that
        declare :attr:`streams_fit` implement it; the result equals :meth:`_fit` on all rows up to rounding."""
        raise NotImplementedError(f"{type(self).__name__} declares streams_fit but has no _fit_stream")

    def _score(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, data_loader) -> "Detector":
        """Fit on a loader of ``(x, y)`` batches through ``model`` (its output is the representation)."""
        if not self.requires_fit:
            return self
        x, y = self._collect(data_loader, self._require_model())
        return getattr(self, f"fit_{self._method}")(x, y)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return getattr(self, f"predict_{self._method}")(self._require_model()(x))


class LogitsDetector(_OneInputDetector):
    """Detectors whose representation is the logit vector ``f(x) ∈ R^C``."""

    representation: ClassVar[str] = "logits"
    _method: ClassVar[str] = "logits"
    _ndim: ClassVar[Optional[int]] = 2
    _input_name: ClassVar[str] = "logits"

    def fit_logits(self, logits: Tensor, y: Optional[Tensor] = None) -> "LogitsDetector":
        return self._fit_input(logits, y)

    def predict_logits(self, logits: Tensor) -> Tensor:
        return self._predict_input(logits)


class FeaturesDetector(_OneInputDetector):
    """Detectors whose representation is one feature vector per sample ``z ∈ R^D``."""

    representation: ClassVar[str] = "features"
    _method: ClassVar[str] = "features"
    _ndim: ClassVar[Optional[int]] = 2
    _input_name: ClassVar[str] = "features"

    def fit_features(self, features: Tensor, y: Optional[Tensor] = None) -> "FeaturesDetector":
        return self._fit_input(features, y)

    def predict_features(self, features: Tensor) -> Tensor:
        return self._predict_input(features)


class FeatureMapsDetector(_OneInputDetector):
    """Detectors whose representation is a feature map ``(N, C, H, W)`` (or a pooled ``(N, D)``)."""

    representation: ClassVar[str] = "feature_maps"
    _method: ClassVar[str] = "feature_maps"
    _ndim: ClassVar[Optional[int]] = None
    _input_name: ClassVar[str] = "feature maps"

    def fit_feature_maps(self, feature_maps: Tensor, y: Optional[Tensor] = None) -> "FeatureMapsDetector":
        return self._fit_input(feature_maps, y)

    def predict_feature_maps(self, feature_maps: Tensor) -> Tensor:
        return self._predict_input(feature_maps)


class StructuredDetector(Detector):
    """Detectors whose representation is structured (several layers, logits + features ...)."""

    representation: ClassVar[str] = "layers"

    def predict_structured_details(self, *args, **kwargs) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Scores and per-sample details (e.g. ``exit_layer`` of early-exit detectors); none by default."""
        return self.predict_structured(*args, **kwargs), {}

    def fit_structured(self, *args, **kwargs) -> "StructuredDetector":
        self._mark_fitted()
        return self

    def predict_structured(self, *args, **kwargs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
