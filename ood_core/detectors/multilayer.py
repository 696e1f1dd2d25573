"""Detectors on several layers at once (registry representation ``"layers"``).

Each takes ``layers``: the names of the ``reps`` columns to use (Parquet column names, see
:attr:`ood_core.hooks.LayerSpec.column`, e.g. ``"layer1"``, ``"bn1.energy"``, ``"conv3.none"``), and
implements ``fit_structured(reps, y)`` / ``predict_structured(reps)`` on the whole ``reps`` dict
(tensors or numpy arrays, one row per sample). Labels ``< 0`` are ignored when fitting.

* :class:`MultiMahalanobis`: per-layer Mahalanobis distances, weighted sum;
* :class:`LayerEnergy`: one layer's energy (LIR), sign as a hyperparameter;
* :class:`LayerEnergyAggregate`: standardised per-layer energies combined with per-layer signs;
* :class:`~.gram.Gram` (module ``gram``): Gram-matrix deviations (needs ``reps["logits"]`` and feature maps).
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..api import DetectorError, InvalidInputError, StructuredDetector, check_input
from .mahalanobis import Mahalanobis

def _layer_names(name: str, layers) -> List[str]:
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers or [])
    if not layers or not all(isinstance(l, str) and l for l in layers):
        raise ValueError(f"{name}: layers must be a non-empty list of column names, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}: duplicate layers in {layers!r}")
    return layers


def _per_layer(name: str, key: str, value, n: int, cast=float) -> List:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {key} needs one value per layer ({n}), got {len(value)}")
        return [cast(v) for v in value]
    return [cast(value)] * n


def layer_column(detector, reps: Mapping[str, Any], key: str) -> Tensor:
    """``reps[key]`` as a finite floating tensor with a sample dimension; errors name the detector."""
    label = type(detector).__name__
    if not isinstance(reps, Mapping):
        raise InvalidInputError(f"{label}: reps must be a dict of column name -> tensor, got {type(reps).__name__}")
    if key not in reps:
        raise InvalidInputError(f"{label}: needs the column {key!r}; available: {', '.join(sorted(map(str, reps)))}")
    x = check_input(detector, reps[key], name=f"column {key!r}")
    if x.ndim == 0:
        raise InvalidInputError(f"{label}: column {key!r} must have a sample dimension, got a scalar")
    return x


def _pooled(x: Tensor) -> Tensor:
    """``(N,)`` -> ``(N, 1)``; ``(N, D)`` as is; ``(N, C, ...)`` -> spatial mean ``(N, C)``."""
    if x.ndim == 1:
        return x[:, None]
    return x if x.ndim == 2 else x.reshape(x.shape[0], x.shape[1], -1).mean(dim=2)


def _same_rows(detector, cols: Sequence[Tensor], keys: Sequence[str]) -> int:
    n = {int(c.shape[0]) for c in cols}
    if len(n) != 1:
        raise InvalidInputError(
            f"{type(detector).__name__}: columns {list(keys)} have different row counts {sorted(n)}"
        )
    return n.pop()


def _id_rows(detector, y, n: int, device) -> Tensor:
    """Boolean mask of the ID rows (label >= 0), validating ``y``."""
    y = torch.as_tensor(y, device=device)
    if y.ndim != 1 or y.shape[0] != n:
        raise InvalidInputError(f"{type(detector).__name__}: labels must have shape ({n},), got {tuple(y.shape)}")
    known = y >= 0
    if not bool(known.any()):
        raise InvalidInputError(f"{type(detector).__name__}: no in-distribution samples (labels >= 0) to fit on")
    return known


class MultiMahalanobis(StructuredDetector):
    r"""Weighted sum of per-layer Mahalanobis distances.

    For each layer :math:`l` (columns ``(N, D_l)``; ``(N, C, H, W)`` columns are averaged over space),
    :class:`~.mahalanobis.Mahalanobis` is fitted (class means, shared covariance, float64) and

    .. math:: s(x) = \sum_l \alpha_l\, d_l(x), \qquad d_l(x) = \min_c (f_l(x) - \mu_{lc})^\top
              \Sigma_l^{-1} (f_l(x) - \mu_{lc})

    ``alpha`` (one weight per layer, default all 1) is a hyperparameter: the paper fits it by logistic
    regression on validation data, which ``fit`` never sees; choose it in the sweep instead.
    :meth:`predict_per_layer` gives the ``(N, L)`` matrix :math:`d_l(x)`.

    Paper: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018 (arXiv:1807.03888). Relation to pytorch-ood 0.4.0
    ``MultiMahalanobis``: per layer its score is :math:`\tfrac12 (z-\mu)^\top (N\Sigma + 10^{-6} I)^{-1}
    (z-\mu)`, so ours is :math:`2N` times theirs (up to the ridge).

    :param layers: column names of the layers
    :param alpha: per-layer weights (default: 1 each)
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, layers: Union[str, Sequence[str]] = (), alpha: Optional[Sequence[float]] = None):
        super().__init__(None)
        self.layers = _layer_names("MultiMahalanobis", layers)
        self.alpha = _per_layer("MultiMahalanobis", "alpha", 1.0 if alpha is None else alpha, len(self.layers))
        self.gaussians: List[Mahalanobis] = []

    @torch.no_grad()
    def fit_structured(self, reps: Mapping[str, Any], y) -> "MultiMahalanobis":
        cols = [_pooled(layer_column(self, reps, k)) for k in self.layers]
        _same_rows(self, cols, self.layers)
        gaussians = []
        for key, z in zip(self.layers, cols):
            try:
                gaussians.append(Mahalanobis().fit_features(z, y))
            except InvalidInputError as exc:
                raise InvalidInputError(f"MultiMahalanobis: layer {key!r}: {exc}") from exc
        self.gaussians = gaussians
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_per_layer(self, reps: Mapping[str, Any]) -> Tensor:
        """Per-layer minimum squared Mahalanobis distances, ``(N, L)``."""
        self._require_fit()
        cols = [_pooled(layer_column(self, reps, k)) for k in self.layers]
        _same_rows(self, cols, self.layers)
        out = []
        for key, z, g in zip(self.layers, cols, self.gaussians):
            try:
                out.append(g.predict_features(z))
            except InvalidInputError as exc:
                raise InvalidInputError(f"MultiMahalanobis: layer {key!r}: {exc}") from exc
        return torch.stack(out, dim=1)

    def predict_structured(self, reps: Mapping[str, Any]) -> Tensor:
        d = self.predict_per_layer(reps)
        return d @ torch.tensor(self.alpha, dtype=d.dtype, device=d.device)

    def to(self, device) -> "MultiMahalanobis":
        for g in self.gaussians:
            g.to(device)
        return self

    @property
    def device(self):
        return self.gaussians[0].device if self.gaussians else None


def layer_energy(x: Tensor) -> Tensor:
    """Per-sample energy of a column: ``(N,)`` as is (already the ``energy`` reduction), otherwise
    ``-logsumexp`` over the flattened row (``(N, ...)`` -> ``(N,)``)."""
    return x if x.ndim == 1 else -torch.logsumexp(x.reshape(x.shape[0], -1), dim=1)


def signs_from_validation(id_scores, ood_scores) -> List[int]:
    """Per-column sign (+1 / -1) that makes each column's validation AUROC >= 0.5 (OOD positive).

    ``id_scores`` ``(N, L)`` and ``ood_scores`` ``(M, L)`` are per-layer scores of the ID and OOD
    **validation** sets (never the test sets); e.g. from ``predict_per_layer``.
    """
    from ..metrics import auroc

    a = torch.as_tensor(id_scores).detach().double().cpu()
    b = torch.as_tensor(ood_scores).detach().double().cpu()
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"signs_from_validation: need (N, L) and (M, L) scores, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    return [1 if auroc(a[:, l].numpy(), b[:, l].numpy()) >= 0.5 else -1 for l in range(a.shape[1])]


class LayerEnergy(StructuredDetector):
    r"""Energy of one layer's raw output (LIR), with a sign chosen on validation data (no fit).

    .. math:: s(x) = \sigma\, E_l(x), \qquad E_l(x) = -\log \sum_j e^{a_j(x)}

    over every unit :math:`j` of the layer output :math:`a(x)` (pre-activation, no pooling). Input: a
    scalar column from the hooks' ``energy`` reduction (e.g. ``"bn1.energy"``), or any ``(N, ...)``
    column, whose energy is computed here. For the logits this is the classic energy score.

    Whether low or high energy means OOD differs between layers, so :math:`\sigma \in \{+1, -1\}`
    (``sign``) is a hyperparameter: search ``{"grid": [1, -1]}`` (validation picks it) or set it from
    :func:`signs_from_validation`; ``fit`` (ID train only) never chooses it. ``layers`` names exactly one
    column for :meth:`predict_structured`; :meth:`predict_per_layer` scores any number of layers
    (``(N, L)``, unsigned), for per-layer AUROC bar plots.

    Paper: Guglielmo & Masana, "Leveraging Intermediate Representations for Better
    Out-of-Distribution Detection", CVWW 2025; energy: Liu et al., NeurIPS 2020 (arXiv:2010.03759).

    :param layers: the column name (a one-element list, or a string)
    :param sign: +1 (high energy = OOD, as for logits) or -1
    """

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {"sign": {"grid": [1, -1]}}

    def __init__(self, layers: Union[str, Sequence[str]] = (), sign: float = 1.0):
        super().__init__(None)
        self.layers = _layer_names("LayerEnergy", layers)
        if float(sign) not in (1.0, -1.0):
            raise ValueError(f"LayerEnergy: sign must be 1 or -1, got {sign!r}")
        self.sign = float(sign)

    @torch.no_grad()
    def predict_per_layer(self, reps: Mapping[str, Any]) -> Tensor:
        """Unsigned energies of every layer in ``layers``, ``(N, L)``."""
        cols = [layer_energy(layer_column(self, reps, k)) for k in self.layers]
        _same_rows(self, cols, self.layers)
        return torch.stack(cols, dim=1)

    def fit_structured(self, reps: Mapping[str, Any], y=None) -> "LayerEnergy":
        self._mark_fitted()
        return self

    def predict_structured(self, reps: Mapping[str, Any]) -> Tensor:
        if len(self.layers) != 1:
            raise DetectorError(
                f"LayerEnergy: predict_structured scores one layer, got {len(self.layers)}; use predict_per_layer "
                f"or LayerEnergyAggregate"
            )
        return self.sign * self.predict_per_layer(reps)[:, 0]


class LayerEnergyAggregate(StructuredDetector):
    r"""Ag-EBO: per-layer energies standardised on ID train, combined with per-layer signs.

    Fit (ID training rows): :math:`m_l, s_l` = mean and standard deviation of :math:`E_l` (float64;
    :math:`s_l := 1` when it is 0). Score:

    .. math:: s(x) = \frac1L \sum_l \sigma_l \frac{E_l(x) - m_l}{s_l}

    :math:`E_l` as in :class:`LayerEnergy`. The signs :math:`\sigma_l` (``signs``, default all +1) must
    come from validation data: :meth:`select_signs` (or :func:`signs_from_validation` on
    :meth:`predict_per_layer` of the ID and OOD validation sets) sets them; ``fit`` never does.

    Paper: Guglielmo & Masana, "Leveraging Intermediate Representations for Better
    Out-of-Distribution Detection", CVWW 2025 (the paper aggregates layers; the formula above is
    ours: a standardised, sign-corrected mean); energy: Liu et al., NeurIPS 2020 (arXiv:2010.03759).

    :param layers: column names of the layers' energies
    :param signs: per-layer +1 / -1 (default: +1 each)
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, layers: Union[str, Sequence[str]] = (), signs: Optional[Sequence[float]] = None):
        super().__init__(None)
        self.layers = _layer_names("LayerEnergyAggregate", layers)
        signs = _per_layer("LayerEnergyAggregate", "signs", 1.0 if signs is None else signs, len(self.layers))
        if any(s not in (1.0, -1.0) for s in signs):
            raise ValueError(f"LayerEnergyAggregate: signs must be 1 or -1, got {signs!r}")
        self.signs = signs
        self.mean: Optional[Tensor] = None  #: (L,) float64
        self.std: Optional[Tensor] = None  #: (L,) float64

    def _energies(self, reps) -> Tensor:
        cols = [layer_energy(layer_column(self, reps, k)) for k in self.layers]
        _same_rows(self, cols, self.layers)
        return torch.stack(cols, dim=1)

    @torch.no_grad()
    def fit_structured(self, reps: Mapping[str, Any], y) -> "LayerEnergyAggregate":
        e = self._energies(reps).double()
        e = e[_id_rows(self, y, e.shape[0], e.device)]
        self.mean = e.mean(dim=0)
        std = e.std(dim=0, unbiased=False) if e.shape[0] > 1 else torch.zeros_like(self.mean)
        self.std = torch.where(std > 0, std, torch.ones_like(std))
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_per_layer(self, reps: Mapping[str, Any]) -> Tensor:
        """Standardised, unsigned per-layer energies ``(E_l - m_l) / s_l``, ``(N, L)``."""
        self._require_fit()
        e = self._energies(reps)
        return ((e.double() - self.mean.to(e.device)) / self.std.to(e.device)).to(e.dtype)

    def predict_structured(self, reps: Mapping[str, Any]) -> Tensor:
        z = self.predict_per_layer(reps)
        return z @ torch.tensor(self.signs, dtype=z.dtype, device=z.device) / len(self.layers)

    def select_signs(self, id_val_reps: Mapping[str, Any], ood_val_reps: Mapping[str, Any]) -> List[int]:
        """Set ``signs`` from ID and OOD **validation** reps (AUROC >= 0.5 per layer) and return them."""
        signs = signs_from_validation(self._energies(id_val_reps), self._energies(ood_val_reps))
        self.signs = [float(s) for s in signs]
        return signs
