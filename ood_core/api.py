"""The detector API, after pytorch-ood (``../shared/seeds/004_*``).

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

from typing import Any, Callable, ClassVar, Dict, Optional

import torch
from torch import Tensor


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
    if ndim is not None and x.ndim != ndim:
        raise InvalidInputError(f"{label}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.float()
    if finite and x.numel():
        # min and max are finite iff every entry is (NaN propagates through both); one fused
        # reduction, ~15x faster than isfinite(x).all(), which dominated cheap detectors' time
        lo, hi = torch.aminmax(x)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise InvalidInputError(f"{label}: {name} contains NaN or inf values")
    return x


class Detector:
    """Root of the detector API.

    Subclasses set :attr:`requires_fit` and :attr:`default_search_space` (a mapping of
    constructor argument → search spec, see ``orchestrator.search``) and implement
    ``predict``; representation-specific subclasses add their own methods.
    """

    requires_fit: ClassVar[bool] = False
    #: hyperparameter name -> search spec, e.g. ``{"t": {"grid": [1, 10, 100]}}``
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None):
        self.model = model
        self._fitted = False

    # -- generic API -----------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        return self.predict(x)

    def fit(self, data_loader) -> "Detector":
        """Fit on a loader of ``(x, y)`` batches. Detectors that need no fit return ``self``."""
        return self

    def predict(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

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
            if isinstance(value, torch.nn.Module):
                for p in value.parameters():
                    return p.device
        return None

    def to(self, device) -> "Detector":
        """Move tensors and modules held by the detector (also inside lists/dicts) to ``device``."""

        def move(v):
            if isinstance(v, (Tensor, torch.nn.Module)):
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


class LogitsDetector(Detector):
    """Detectors whose representation is the logit vector ``f(x) ∈ R^C``."""

    def fit_logits(self, logits: Tensor, y: Tensor) -> "LogitsDetector":
        self._mark_fitted()
        return self

    def predict_logits(self, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, data_loader) -> "LogitsDetector":
        if not self.requires_fit:
            return self
        model = self._require_model()
        logits, y = self._collect(data_loader, model)
        return self.fit_logits(logits, y)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.predict_logits(self._require_model()(x))


class FeaturesDetector(Detector):
    """Detectors whose representation is one feature vector per sample ``z ∈ R^D``."""

    def fit_features(self, z: Tensor, y: Tensor) -> "FeaturesDetector":
        self._mark_fitted()
        return self

    def predict_features(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, data_loader) -> "FeaturesDetector":
        if not self.requires_fit:
            return self
        model = self._require_model()
        z, y = self._collect(data_loader, model)
        return self.fit_features(z, y)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.predict_features(self._require_model()(x))


class FeatureMapsDetector(Detector):
    """Detectors whose representation is a feature map ``(N, C, H, W)`` (or a pooled ``(N, D)``)."""

    def fit_feature_maps(self, feature_maps: Tensor, y: Tensor) -> "FeatureMapsDetector":
        self._mark_fitted()
        return self

    def predict_feature_maps(self, feature_maps: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, data_loader) -> "FeatureMapsDetector":
        if not self.requires_fit:
            return self
        model = self._require_model()
        f, y = self._collect(data_loader, model)
        return self.fit_feature_maps(f, y)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.predict_feature_maps(self._require_model()(x))


class StructuredDetector(Detector):
    """Detectors whose representation is structured (several layers, logits + features ...)."""

    def fit_structured(self, *args, **kwargs) -> "StructuredDetector":
        self._mark_fitted()
        return self

    def predict_structured(self, *args, **kwargs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
