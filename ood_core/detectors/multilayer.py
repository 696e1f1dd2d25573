"""Detectors on several layers at once (representation ``"layers"``).

Each reads ``layers``: the names of the ``reps`` columns to use (Parquet column names, see
:attr:`ood_core.hooks.LayerSpec.column`, e.g. ``"layer1"``, ``"bn1.energy"``, ``"conv3.none"``) from the dict
given to ``fit_structured(reps, y)`` / ``predict_structured(reps)`` (tensors or arrays, one row per sample;
rows labelled < 0 are not fitted on). pytorch-ood's form, a list with one tensor per layer, is accepted too.
:class:`LayerDetector` validates the columns, once, for every detector of this family.

* :class:`MultiMahalanobis`: per-layer Mahalanobis distances, weighted sum;
* :class:`LayerEnergy`: one layer's energy (LIR), sign as a hyperparameter;
* :class:`LayerEnergyAggregate`: standardised per-layer energies combined with per-layer signs;
* :class:`~.gram.Gram` and :class:`~.la_ood.LAOOD` live in their own modules.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..api import InvalidInputError, StructuredDetector, check_input
from ..constraints import Constraint, Instance, Interval, L, ListOf, Param
from .mahalanobis import Mahalanobis


# -- the layer columns, validated once for the whole family ------------------------------------------------
@dataclass(frozen=True)
class ColumnNames(ListOf):
    """One column name, or a list of distinct non-empty names."""

    item: Constraint = Instance((str,))
    scalar: bool = True

    def problem(self, value, data=None):
        msg = super().problem(value, data)
        if msg is None:
            names = [value] if isinstance(value, str) else list(value)
            if not all(names):
                return "must not contain an empty name"
            if len(set(names)) != len(names):
                return "must not name a column twice"
        return msg


@dataclass(frozen=True)
class Sign(Constraint):
    """+1 or -1."""

    def accepts_type(self, value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    def problem(self, value, data=None):
        return None if self.accepts_type(value) and float(value) in (1.0, -1.0) else "must be 1 or -1"


#: the ``layers`` declaration of every detector of the family
LAYERS = Param(ColumnNames(), doc="names of the reps columns (layers) to read")


def _pooled(x: Tensor) -> Tensor:
    """``(N,)`` -> ``(N, 1)``; ``(N, D)`` as is; ``(N, C, ...)`` -> spatial mean ``(N, C)``."""
    if x.ndim == 1:
        return x[:, None]
    return x if x.ndim == 2 else x.reshape(x.shape[0], x.shape[1], -1).mean(dim=2)


class LayerDetector(StructuredDetector):
    """Base of the detectors that read layer columns. It resolves ``layers`` in ``reps`` and validates every
    column through the base class's checks (floating, finite, a sample dimension, equal row counts, after a
    fit each column's fitted width: ``n_features_in_`` maps column name -> width); a per-layer parameter
    (``ListOf(..., length=L)``) is checked against ``L = len(layers)`` as soon as ``layers`` is known."""

    layers: Any = None

    @classmethod
    def check_params(cls, params: Mapping[str, Any], data: Optional[Mapping[str, int]] = None) -> None:
        layers = params.get("layers")
        if isinstance(layers, (str, list, tuple)) and (data or {}).get("L") is None:
            data = {**(data or {}), "L": 1 if isinstance(layers, str) else len(layers)}
        super().check_params(params, data)

    def _layer_inputs(self, reps) -> Dict[str, Any]:
        """``{name: column}`` of the layers: from a dict (the columns ``layers`` names) or from pytorch-ood's
        list of tensors (one per layer, in order; named by ``layers`` when given)."""
        label = type(self).__name__
        names = None if self.layers is None else ([self.layers] if isinstance(self.layers, str) else list(self.layers))
        if isinstance(reps, Mapping):
            if names is None:
                raise InvalidInputError(f"{label}: give layers= (the names of the reps columns to read)")
            missing = [k for k in names if k not in reps]
            if missing:
                raise InvalidInputError(f"{label}: needs the column {missing[0]!r}; "
                                        f"available: {', '.join(sorted(map(str, reps)))}")
            return {k: reps[k] for k in names}
        if isinstance(reps, (list, tuple)):
            if names is not None and len(names) != len(reps):
                raise InvalidInputError(f"{label}: got {len(reps)} layer tensors for layers={names}")
            return dict(zip(names or [f"layer {i}" for i in range(len(reps))], reps))
        raise InvalidInputError(f"{label}: reps must be a dict of column name -> tensor (or a list of tensors, "
                                f"one per layer), got {type(reps).__name__}")

    def _checked(self, columns: Mapping[str, Any], widths: bool = True) -> Dict[str, Tensor]:
        """The columns validated by :func:`~ood_core.api.check_input`, with equal row counts and (``widths``,
        after a fit) the fitted widths."""
        label = type(self).__name__
        cols = {k: check_input(self, v, name=f"column {k!r}") for k, v in columns.items()}  # refuses scalars too
        rows = {int(x.shape[0]) for x in cols.values()}
        if len(rows) > 1:
            raise InvalidInputError(f"{label}: columns {list(cols)} have different row counts {sorted(rows)}")
        fitted = getattr(self, "n_features_in_", None)
        if widths and isinstance(fitted, dict):
            if len(fitted) != len(cols):
                raise InvalidInputError(f"{label}: got {len(cols)} columns, fitted on {len(fitted)}: {list(fitted)}")
            got = [x.shape[1] if x.ndim >= 2 else None for x in cols.values()]
            for name, g, want in zip(cols, got, fitted.values()):
                if g != want:
                    raise InvalidInputError(f"{label}: column {name!r} has width {g}, but the detector was fitted "
                                            f"for width {want}")
        return cols

    def _training_columns(self, columns: Mapping[str, Any], y, n_layers: Optional[int] = None
                          ) -> Tuple[Dict[str, Tensor], Tensor]:
        """Validated ID training rows of every column (each through ``_training_input``: rows labelled < 0
        dropped, the data-relative constraints checked, ``L`` included) and their labels."""
        cols = self._checked(columns, widths=False)
        out, y_id = {}, None
        for name, x in cols.items():
            out[name], y_id = self._training_input(x, y, ndim=None, name=f"column {name!r}", finite=False)
        self.n_features_in_ = {k: (x.shape[1] if x.ndim >= 2 else None) for k, x in out.items()}
        self.check_data(L=len(out) if n_layers is None else n_layers)
        return out, y_id


# -- MultiMahalanobis -----------------------------------------------------------------------------------
class MultiMahalanobis(LayerDetector):
    r"""Weighted sum of per-layer Mahalanobis distances.

    For each layer :math:`l` (columns ``(N, D_l)``; ``(N, C, H, W)`` columns are averaged over space),
    :class:`~.mahalanobis.Mahalanobis` is fitted (class means, shared covariance, float64) and

    .. math:: s(x) = \sum_l \alpha_l\, d_l(x), \qquad d_l(x) = \min_c (f_l(x) - \mu_{lc})^\top
              \Sigma_l^{-1} (f_l(x) - \mu_{lc})

    ``alpha`` (one weight per layer, default 1 each) only weighs the scores (not structural): the paper fits
    it by logistic regression on validation data, which ``fit`` never sees; choose it in the sweep.
    :meth:`predict_per_layer` gives the ``(N, L)`` matrix :math:`d_l(x)`.

    Paper: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018 (arXiv:1807.03888); code: github.com/pokaxpoka/deep_Mahalanobis_detector.

    pytorch-ood 0.4.0 ``MultiMahalanobis(model, alpha=None)``: accepted as is (``model``: the list of
    consecutive modules, used by ``fit(loader)`` / ``predict(x)``); ``fit_structured`` / ``predict_structured``
    take its list of per-layer tensors as well as a reps dict named by ``layers``. Differences: per layer its
    score is :math:`\tfrac12 (z-\mu)^\top (N\Sigma + 10^{-6} I)^{-1} (z-\mu)`, so ours is :math:`2N` times
    theirs (up to the ridge); its fit requires every class 0..K-1 and no label < 0, ours drops rows < 0.

    :param model: pytorch-ood's list of consecutive layers (``fit`` / ``predict`` on raw inputs)
    :param alpha: per-layer weights (default: 1 each)
    :param layers: column names of the layers in ``reps``
    """

    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "alpha": Param(ListOf(Interval(float, 0, None), length=L), None, structural=False,
                       doc="weight of each layer (None: 1 each)"),
        "layers": Param(ColumnNames(), None, doc="names of the reps columns (None: pytorch-ood's list form)"),
    }

    def __init__(self, model: Optional[Sequence[nn.Module]] = None, alpha: Optional[Sequence[float]] = None,
                 layers: Union[None, str, Sequence[str]] = None):
        super().__init__(model)
        self.alpha = alpha
        self.layers = layers
        self.gaussians: List[Mahalanobis] = []

    def _layer_outputs(self, x: Tensor) -> List[Tensor]:
        """Pooled outputs of pytorch-ood's consecutive modules."""
        out = []
        for module in self._require_model():
            x = module(x)
            out.append(_pooled(x))
        return out

    @torch.no_grad()
    def fit(self, data_loader) -> "MultiMahalanobis":
        zs, ys = [], []
        for x, y in data_loader:
            zs.append(self._layer_outputs(x))
            ys.append(y)
        return self.fit_structured([torch.cat(z) for z in zip(*zs)], torch.cat(ys))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.predict_structured(self._layer_outputs(x))

    @torch.no_grad()
    def fit_structured(self, reps, y) -> "MultiMahalanobis":
        cols, y = self._training_columns(self._layer_inputs(reps), y)
        self.gaussians = [Mahalanobis().fit_features(_pooled(z), y) for z in cols.values()]
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_per_layer(self, reps) -> Tensor:
        """Per-layer minimum squared Mahalanobis distances :math:`d_l(x)`, ``(N, L)``."""
        self._require_fit()
        cols = self._checked(self._layer_inputs(reps))
        return torch.stack([g.predict_features(_pooled(z)) for g, z in zip(self.gaussians, cols.values())], dim=1)

    def predict_structured(self, reps) -> Tensor:
        d = self.predict_per_layer(reps)
        alpha = [1.0] * d.shape[1] if self.alpha is None else self.alpha
        return d @ torch.tensor(alpha, dtype=d.dtype, device=d.device)

    def to(self, device) -> "MultiMahalanobis":
        super().to(device)
        for g in self.gaussians:
            g.to(device)
        return self


# -- per-layer energies ---------------------------------------------------------------------------------
def layer_energy(x: Tensor) -> Tensor:
    """Per-sample energy of a column: ``(N,)`` as is (already the ``energy`` reduction), otherwise
    ``-logsumexp`` over the flattened row (``(N, ...)`` -> ``(N,)``)."""
    return x if x.ndim == 1 else -torch.logsumexp(x.reshape(x.shape[0], -1), dim=1)


def signs_from_validation(id_scores, ood_scores) -> List[int]:
    """Per-column sign (+1 / -1) that makes each column's validation AUROC >= 0.5 (OOD positive).

    ``id_scores`` ``(N, L)`` and ``ood_scores`` ``(M, L)`` are per-layer scores of the ID and OOD
    **validation** sets (never the test sets).
    """
    from ..metrics import auroc

    a = torch.as_tensor(id_scores).detach().double().cpu()
    b = torch.as_tensor(ood_scores).detach().double().cpu()
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"signs_from_validation: need (N, L) and (M, L) scores, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    return [1 if auroc(a[:, l].numpy(), b[:, l].numpy()) >= 0.5 else -1 for l in range(a.shape[1])]


class LayerEnergy(LayerDetector):
    r"""Energy of one layer's raw output (LIR), with a sign chosen on validation data (no fit).

    .. math:: s(x) = \sigma\, E_l(x), \qquad E_l(x) = -\log \sum_j e^{a_j(x)}

    over every unit :math:`j` of the layer output :math:`a(x)` (pre-activation, no pooling). Input: a scalar
    column from the hooks' ``energy`` reduction (e.g. ``"bn1.energy"``), or any ``(N, ...)`` column, whose
    energy is computed here. For the logits this is the classic energy score.

    Whether low or high energy means OOD differs between layers, so :math:`\sigma \in \{+1, -1\}` (``sign``)
    is a hyperparameter, searched over ``{1, -1}`` on validation data; ``fit`` (ID train) never chooses it.

    Paper: Guglielmo & Masana, "Leveraging Intermediate Representations for Better Out-of-Distribution
    Detection", CVWW 2025; energy: Liu et al., NeurIPS 2020 (arXiv:2010.03759).

    :param layers: the column name (or a one-element list)
    :param sign: +1 (high energy = OOD, as for logits) or -1
    """

    needs_labels: ClassVar[bool] = False
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "layers": Param(ColumnNames(length=1), doc="the column (one layer)"),
        "sign": Param(Sign(), structural=False, doc="+1: high energy = OOD; -1: low energy = OOD"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"sign": {"grid": [1, -1]}}

    def __init__(self, layers: Union[str, Sequence[str]], sign: float = 1.0):
        super().__init__(None)
        self.layers = layers
        self.sign = sign

    @torch.no_grad()
    def predict_structured(self, reps) -> Tensor:
        (x,) = self._checked(self._layer_inputs(reps)).values()
        return self.sign * layer_energy(x)


class LayerEnergyAggregate(LayerDetector):
    r"""Ag-EBO: per-layer energies standardised on ID train, combined with per-layer signs.

    Fit (ID training rows): :math:`m_l, s_l` = mean and standard deviation of :math:`E_l` (float64;
    :math:`s_l := 1` when it is 0). Score:

    .. math:: s(x) = \frac1L \sum_l \sigma_l \frac{E_l(x) - m_l}{s_l}

    :math:`E_l` as in :class:`LayerEnergy`. The signs :math:`\sigma_l` are chosen on validation data
    (:meth:`select_on_validation`: +1 where the layer's AUROC of ID val against OOD val is >= 0.5, else -1),
    unless ``signs`` fixes them; ``fit`` never chooses them. ``signs_`` holds the signs chosen on validation
    (+1 each until then), used when ``signs`` is None.

    Paper: Guglielmo & Masana, "Leveraging Intermediate Representations for Better Out-of-Distribution
    Detection", CVWW 2025 (the paper aggregates layers; the formula above is ours: a standardised,
    sign-corrected mean); energy: Liu et al., NeurIPS 2020 (arXiv:2010.03759).

    :param layers: column names of the layers' energies
    :param signs: per-layer +1 / -1; None (default): chosen on validation data (+1 each until then)
    """

    needs_labels: ClassVar[bool] = False
    requires_fit: ClassVar[bool] = True
    uses_validation: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "layers": LAYERS,
        "signs": Param(ListOf(Sign(), length=L), None, structural=False,
                       doc="per-layer sign; None: chosen on validation data"),
    }

    def __init__(self, layers: Union[str, Sequence[str]], signs: Optional[Sequence[float]] = None):
        super().__init__(None)
        self.layers = layers
        self.signs = signs

    def _energies(self, reps) -> Tensor:
        return torch.stack([layer_energy(x) for x in self._checked(self._layer_inputs(reps)).values()], dim=1)

    @torch.no_grad()
    def fit_structured(self, reps, y=None) -> "LayerEnergyAggregate":
        cols, _ = self._training_columns(self._layer_inputs(reps), y)
        e = torch.stack([layer_energy(x).double() for x in cols.values()], dim=1)
        std = e.std(dim=0, unbiased=False)
        self.mean_, self.std_ = e.mean(dim=0), torch.where(std > 0, std, torch.ones_like(std))
        self.signs_ = [1.0] * e.shape[1]
        self._mark_fitted()
        return self

    @torch.no_grad()
    def select_on_validation(self, id_val, ood_val) -> None:
        """Signs from ID and OOD **validation** reps (AUROC >= 0.5 per layer); kept when ``signs`` is given."""
        self._require_fit()
        if self.signs is None:
            self.signs_ = [float(s) for s in signs_from_validation(self._energies(id_val), self._energies(ood_val))]

    @torch.no_grad()
    def predict_per_layer(self, reps) -> Tensor:
        """Standardised, unsigned per-layer energies :math:`(E_l - m_l) / s_l`, ``(N, L)``."""
        self._require_fit()
        e = self._energies(reps)
        return ((e.double() - self.mean_) / self.std_).to(e.dtype)

    def predict_structured(self, reps) -> Tensor:
        z = self.predict_per_layer(reps)
        signs = [float(s) for s in self.signs] if self.signs is not None else self.signs_
        return z @ torch.tensor(signs, dtype=z.dtype, device=z.device) / z.shape[1]

