"""LA-OOD: one-class SVMs on several layers, combined by max (registry representation ``"layers"``).

* :func:`~.ocsvm.self_adaptive_shifting` / :func:`~.ocsvm.select_gamma` (module ``ocsvm``): pseudo outliers
  and pseudo targets made from ID data only, and the RBF width they select (Wang et al. 2018);
* :class:`LAOOD`: per-layer OCSVM scores, standardised on held-out ID training rows, max over layers;
* :class:`LAOODEarlyExit`: the same scores visited in network order; a sample stops at the first
  decisive layer (ES-OOD).

The OCSVMs are scikit-learn's (CPU, float64); inputs may be tensors on any device or numpy arrays and
scores come back as a tensor on the input's device.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..api import InvalidInputError, StructuredDetector
from .multilayer import _id_rows, _layer_names, _per_layer, _pooled, _same_rows, layer_column
from .ocsvm import GAMMA_GRID, MIN_ROWS, _svm_parts, rbf_decision, select_gamma, self_adaptive_shifting

__all__ = ["LAOOD", "LAOODEarlyExit", "self_adaptive_shifting", "select_gamma", "rbf_decision", "GAMMA_GRID"]


class LAOOD(StructuredDetector):
    r"""Layer-adaptive OOD detection: one OCSVM per layer on pooled features, max of standardised scores.

    Per layer :math:`l`, the feature :math:`f_l(x)` is the spatial mean of the layer output (``(N, D_l)``
    columns as they are, ``(N, C, H, W)`` averaged over space), standardised per dimension with the mean
    and standard deviation of the ID training rows: :math:`\tilde f_l = (f_l - m_l) / s_l`. An RBF
    one-class SVM (:math:`\nu` = ``nu`` = 0.001, as in the paper; not searched) is fitted on up to
    ``max_fit_samples`` ID rows (seeded subsample); its width :math:`\gamma_l` is chosen from
    ``gamma_grid / D_l`` with pseudo outliers and pseudo targets made from those ID rows only
    (:func:`self_adaptive_shifting`, :func:`select_gamma`), unless ``gamma`` fixes it. Score:

    .. math:: s(x) = \max_l z_l(x), \qquad z_l(x) = \frac{-g_l(\tilde f_l(x)) - \mu_l}{\sigma_l}

    with :math:`g_l` the OCSVM decision function (so :math:`-g_l` is higher = more OOD) and
    :math:`\mu_l, \sigma_l` its mean and standard deviation on a held-out part of ID train (``holdout``
    fraction, at most ``max_fit_samples`` rows, disjoint from the SVM's rows; the SVM's own rows when
    fewer than 2 are held out). The standardisation makes the layers comparable before the max; the
    authors' code takes the max of the raw :math:`-g_l`. Layers are listed in ``layers``;
    :meth:`predict_per_layer` gives the ``(N, L)`` matrix :math:`z_l(x)`.

    Gamma selection minimises (accepted pseudo outliers / their count) + (rejected pseudo targets / their
    count) over the grid, ties to the smallest :math:`\gamma`; the grid is relative to :math:`1/D_l`
    because squared distances between standardised vectors grow with :math:`D_l`. The authors' code uses a
    fixed grid (0.001 ... 0.1), pseudo outliers from the same shifting, and held-out ID rows in place of
    pseudo targets. ``gammas_`` and ``selection_errors_`` record the choice per layer.

    Paper: H. Wang et al., "Layer Adaptive Deep Neural Networks for Out-of-distribution Detection",
    PAKDD 2022 (code: github.com/haoliangwang86/LA-OOD); gamma selection:
    S. Wang et al., Pattern Recognition 74 (2018).

    :param layers: column names of the layers (pooled ``(N, D)`` or ``(N, C, H, W)`` columns)
    :param nu: OCSVM :math:`\nu` (fraction of training outliers), 0.001 as in the paper
    :param gamma: fixed RBF :math:`\gamma` (a number, or one per layer); ``None`` selects it per layer
    :param gamma_grid: candidate widths as multiples of :math:`1/D_l` (default :math:`10^{-2}, \dots, 10^{2}`,
        9 log-spaced values)
    :param max_fit_samples: most ID rows per SVM fit (and per held-out set)
    :param holdout: fraction of ID rows held out to standardise the scores
    :param k: neighbours for the edge-pattern detection (default :math:`\lceil 5 \log_{10} n \rceil`)
    :param edge_threshold: a point is an edge pattern when at least ``1 - edge_threshold`` of its
        neighbours lie behind it
    :param seed: seed of the subsample / hold-out split
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(
        self,
        layers: Union[str, Sequence[str]] = (),
        nu: float = 0.001,
        gamma: Optional[Union[float, Sequence[float]]] = None,
        gamma_grid: Sequence[float] = GAMMA_GRID,
        max_fit_samples: int = 2000,
        holdout: float = 0.2,
        k: Optional[int] = None,
        edge_threshold: float = 0.1,
        seed: int = 0,
    ):
        super().__init__(None)
        name = type(self).__name__
        self.layers = _layer_names(name, layers)
        if not 0.0 < float(nu) <= 1.0:
            raise ValueError(f"{name}: nu must be in (0, 1], got {nu!r}")
        self.nu = float(nu)
        self.gamma = None if gamma is None else _per_layer(name, "gamma", gamma, len(self.layers))
        if self.gamma is not None and any(g <= 0 for g in self.gamma):
            raise ValueError(f"{name}: gamma must be > 0, got {gamma!r}")
        self.gamma_grid = [float(g) for g in gamma_grid]
        if not self.gamma_grid or any(g <= 0 for g in self.gamma_grid):
            raise ValueError(f"{name}: gamma_grid must be a non-empty list of positive numbers, got {gamma_grid!r}")
        if int(max_fit_samples) < MIN_ROWS:
            raise ValueError(f"{name}: max_fit_samples must be >= {MIN_ROWS}, got {max_fit_samples!r}")
        self.max_fit_samples = int(max_fit_samples)
        if not 0.0 <= float(holdout) < 1.0:
            raise ValueError(f"{name}: holdout must be in [0, 1), got {holdout!r}")
        self.holdout = float(holdout)
        self.k = None if k is None else int(k)
        self.edge_threshold = float(edge_threshold)
        self.seed = int(seed)
        # fitted state: float64 tensors (moved by ``to``), plus the scikit-learn models for inspection
        self.feature_mean_: List[Tensor] = []  #: per layer (D_l,)
        self.feature_std_: List[Tensor] = []  #: per layer (D_l,)
        self.support_vectors_: List[Tensor] = []  #: per layer (n_sv, D_l), standardised feature space
        self.dual_coef_: List[Tensor] = []  #: per layer (n_sv,)
        self.intercept_: List[float] = []
        self.gammas_: List[float] = []
        self.selection_errors_: List[Optional[np.ndarray]] = []  #: per layer err(gamma) over the grid
        self.score_mean_: Optional[Tensor] = None  #: (L,)
        self.score_std_: Optional[Tensor] = None  #: (L,)
        self.holdout_scores_: Optional[Tensor] = None  #: (n_stats, L) standardised held-out ID scores
        self.svms_: list = []  #: the fitted ``sklearn.svm.OneClassSVM`` per layer (CPU, not used to score)
        self.fit_index_: Optional[np.ndarray] = None  #: positions among the ID rows the SVMs were fitted on
        self.stats_index_: Optional[np.ndarray] = None  #: positions among the ID rows of the score statistics

    # -- helpers -------------------------------------------------------------------------------------------
    def _columns(self, reps) -> List[Tensor]:
        cols = [_pooled(layer_column(self, reps, key)) for key in self.layers]
        _same_rows(self, cols, self.layers)
        if self._fitted:
            for key, c, m in zip(self.layers, cols, self.feature_mean_):
                if c.shape[1] != m.shape[0]:
                    raise InvalidInputError(
                        f"{type(self).__name__}: column {key!r} has {c.shape[1]} features, fitted on {m.shape[0]}"
                    )
        return cols

    def _split(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        perm = np.random.default_rng(self.seed).permutation(n)
        n_hold = min(int(round(self.holdout * n)), self.max_fit_samples)
        if n_hold < 2 or n - n_hold < MIN_ROWS:
            fit = np.sort(perm[: self.max_fit_samples])
            return fit, fit
        return np.sort(perm[n_hold : n_hold + self.max_fit_samples]), np.sort(perm[:n_hold])

    def _raw_scores(self, l: int, col: Tensor) -> Tensor:
        """Raw OCSVM score :math:`-g_l` of the rows of one pooled column, float64 on the column's device."""
        x = col.detach().to(torch.float64)
        z = (x - self.feature_mean_[l].to(x.device)) / self.feature_std_[l].to(x.device)
        return -rbf_decision(z, self.support_vectors_[l], self.dual_coef_[l], self.intercept_[l], self.gammas_[l])

    def _standardised(self, l: int, col: Tensor) -> Tensor:
        raw = self._raw_scores(l, col)
        return (raw - self.score_mean_[l].to(raw.device)) / self.score_std_[l].to(raw.device)

    @staticmethod
    def _out(values: Tensor, like: Tensor) -> Tensor:
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        return values.to(device=like.device, dtype=dtype)

    # -- API -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_structured(self, reps: Mapping[str, Any], y) -> "LAOOD":
        from sklearn.svm import OneClassSVM

        name = type(self).__name__
        self._fitted = False  # a refit must not check widths against the previous fit
        cols = self._columns(reps)
        keep = _id_rows(self, y, cols[0].shape[0], cols[0].device).cpu().numpy()
        n = int(keep.sum())
        if n < MIN_ROWS:
            raise InvalidInputError(f"{name}: needs at least {MIN_ROWS} ID training rows, got {n}")
        fit_idx, stats_idx = self._split(n)
        device = cols[0].device
        means, stds, svs, duals, rhos, svms, gammas, errors, stats = [], [], [], [], [], [], [], [], []
        for l, col in enumerate(cols):
            x = col.detach().to("cpu", torch.float64).numpy()[keep]
            mean, std = x.mean(axis=0), x.std(axis=0)
            std = np.where(std > 0, std, 1.0)
            xs = (x - mean) / std
            if self.gamma is not None:
                g, err = self.gamma[l], None
                svm = OneClassSVM(kernel="rbf", nu=self.nu, gamma=g).fit(xs[fit_idx])
            else:
                out, tgt, _ = self_adaptive_shifting(xs[fit_idx], self.k, self.edge_threshold)
                grid = [g / xs.shape[1] for g in self.gamma_grid]
                g, svm, err = select_gamma(xs[fit_idx], out, tgt, grid, self.nu)
            sv, dual, rho = _svm_parts(svm)
            stats.append(-rbf_decision(torch.as_tensor(xs[stats_idx]), sv, dual, rho, float(g)))
            means.append(torch.as_tensor(mean, device=device))
            stds.append(torch.as_tensor(std, device=device))
            svs.append(sv.to(device))
            duals.append(dual.to(device))
            rhos.append(rho)
            svms.append(svm)
            gammas.append(float(g))
            errors.append(err)
        self.feature_mean_, self.feature_std_ = means, stds
        self.support_vectors_, self.dual_coef_, self.intercept_ = svs, duals, rhos
        self.svms_, self.gammas_, self.selection_errors_ = svms, gammas, errors
        raw = torch.stack(stats, dim=1)
        self.score_mean_ = raw.mean(dim=0)
        sd = raw.std(dim=0, unbiased=False)
        self.score_std_ = torch.where(sd > 0, sd, torch.ones_like(sd))
        self.holdout_scores_ = ((raw - self.score_mean_) / self.score_std_).to(device)
        self.score_mean_, self.score_std_ = self.score_mean_.to(device), self.score_std_.to(device)
        self.fit_index_, self.stats_index_ = fit_idx, stats_idx
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_per_layer(self, reps: Mapping[str, Any]) -> Tensor:
        """Standardised per-layer scores :math:`z_l(x)`, ``(N, L)``."""
        self._require_fit()
        cols = self._columns(reps)
        z = torch.stack([self._standardised(l, c) for l, c in enumerate(cols)], dim=1)
        return self._out(z, cols[0])

    def predict_structured(self, reps: Mapping[str, Any]) -> Tensor:
        return self.predict_per_layer(reps).max(dim=1).values


class LAOODEarlyExit(LAOOD):
    r"""ES-OOD: LA-OOD scores visited in network order, stopping at the first decisive layer.

    ``layers`` must be listed in network order. With :math:`z_l` the standardised layer scores of
    :class:`LAOOD`, sample :math:`x` exits at

    .. math:: e(x) = \min \{ l : z_l(x) > t^{high}_l \ \text{or}\ z_l(x) < t^{low}_l \} \cup \{L - 1\}

    (above ``t_high``: OOD; below ``t_low``: ID; undecided samples run to the last layer). Its score is
    the max over the layers it has seen, :math:`s(x) = \max_{l \le e(x)} z_l(x)`: without any early exit
    this is exactly the :class:`LAOOD` score, and scores stay consistent with the decisions (an OOD exit
    scores above :math:`t^{high}`, any other sample at or below the threshold of the layers it passed,
    unless its last layer is above). Layer :math:`l` is scored only for the samples still running.

    Thresholds, in standardised units: ``t_low`` / ``t_high`` (a number or one per layer) when given;
    otherwise per layer the ``q_low`` / ``q_high`` quantiles of the held-out ID scores :math:`z_l`
    (defaults 0.1 and 0.99: about 10 % of ID samples stop at the first layer as ID, about 1 % of ID
    samples per layer stop as OOD). ``q_low = 0`` never exits as ID (only OODs stop early, as ES-OOD
    does where ID samples must reach the classifier); ``q_high = 1`` never exits as OOD.
    :meth:`predict_with_exits` returns the exit layers; :meth:`average_layers_used` gives
    :math:`\bar L = \text{mean}(e(x) + 1)`, and the fraction of layer compute saved is :math:`1 - \bar L / L`
    (:meth:`compute_saved`).

    The searched grid (``q_low`` x ``q_high``) trades accuracy for compute; validation AUROC alone favours
    fewer exits, so read it together with :meth:`average_layers_used`.

    Paper: H. Wang, C. Zhao, F. Chen, "Efficient out-of-distribution detection via layer-adaptive scoring
    and early stopping", Frontiers in Big Data 7 (2024), doi:10.3389/fdata.2024.1444634.

    :param q_low: ID-exit quantile of the held-out ID scores (0: never)
    :param q_high: OOD-exit quantile of the held-out ID scores (1: never)
    :param t_low: explicit ID-exit thresholds (override ``q_low``)
    :param t_high: explicit OOD-exit thresholds (override ``q_high``)

    The other parameters are those of :class:`LAOOD`.
    """

    default_search_space: ClassVar[Dict[str, Any]] = {
        "q_low": {"grid": [0.0, 0.1, 0.5]},
        "q_high": {"grid": [0.95, 0.99]},
    }

    def __init__(
        self,
        layers: Union[str, Sequence[str]] = (),
        q_low: float = 0.1,
        q_high: float = 0.99,
        t_low: Optional[Union[float, Sequence[float]]] = None,
        t_high: Optional[Union[float, Sequence[float]]] = None,
        nu: float = 0.001,
        gamma: Optional[Union[float, Sequence[float]]] = None,
        gamma_grid: Sequence[float] = GAMMA_GRID,
        max_fit_samples: int = 2000,
        holdout: float = 0.2,
        k: Optional[int] = None,
        edge_threshold: float = 0.1,
        seed: int = 0,
    ):
        super().__init__(layers, nu, gamma, gamma_grid, max_fit_samples, holdout, k, edge_threshold, seed)
        name = type(self).__name__
        if not (0.0 <= float(q_low) <= 1.0 and 0.0 <= float(q_high) <= 1.0):
            raise ValueError(f"{name}: q_low and q_high must be in [0, 1], got {q_low!r}, {q_high!r}")
        self.q_low, self.q_high = float(q_low), float(q_high)
        n = len(self.layers)
        self.t_low = None if t_low is None else _per_layer(name, "t_low", t_low, n)
        self.t_high = None if t_high is None else _per_layer(name, "t_high", t_high, n)

    def thresholds(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per-layer ``(t_low, t_high)`` in standardised units (``-inf`` / ``+inf``: never exits that way)."""
        self._require_fit()
        h = self.holdout_scores_.cpu().numpy()
        if self.t_low is not None:
            lo = np.asarray(self.t_low, dtype=np.float64)
        else:
            lo = np.full(h.shape[1], -np.inf) if self.q_low <= 0 else np.quantile(h, self.q_low, axis=0)
        if self.t_high is not None:
            hi = np.asarray(self.t_high, dtype=np.float64)
        else:
            hi = np.full(h.shape[1], np.inf) if self.q_high >= 1 else np.quantile(h, self.q_high, axis=0)
        return lo, hi

    @torch.no_grad()
    def predict_with_exits(self, reps: Mapping[str, Any]) -> Tuple[Tensor, Tensor]:
        """``(scores (N,), exit_layer_index (N,) int64)``; layer ``l`` is scored only for running samples."""
        self._require_fit()
        cols = self._columns(reps)
        lo, hi = self.thresholds()
        device, n, n_layers = cols[0].device, cols[0].shape[0], len(cols)
        running = torch.ones(n, dtype=torch.bool, device=device)
        best = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        exits = torch.full((n,), n_layers - 1, dtype=torch.int64, device=device)
        for l, col in enumerate(cols):  # loop over layers; all running samples at once
            rows = running.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            z = self._standardised(l, col[rows])
            best[rows] = torch.maximum(best[rows], z)
            if l < n_layers - 1:
                stop = (z > float(hi[l])) | (z < float(lo[l]))
                exits[rows[stop]] = l
                running[rows[stop]] = False
        return self._out(best, cols[0]), exits

    def predict_structured(self, reps: Mapping[str, Any]) -> Tensor:
        return self.predict_with_exits(reps)[0]

    def average_layers_used(self, reps: Mapping[str, Any]) -> float:
        """Mean number of layers scored per sample, :math:`\\text{mean}(e(x) + 1) \\in [1, L]`."""
        exits = self.predict_with_exits(reps)[1]
        return float((exits + 1).double().mean()) if exits.numel() else float("nan")

    def compute_saved(self, reps: Mapping[str, Any]) -> float:
        """Fraction of per-layer detector work saved, :math:`1 - \\bar L / L`."""
        return 1.0 - self.average_layers_used(reps) / len(self.layers)
