"""LA-OOD: one-class SVMs on several layers, combined by max (representation ``"layers"``).

* :func:`~.ocsvm.self_adaptive_shifting` / :func:`~.ocsvm.select_gamma` (module ``ocsvm``): pseudo outliers
  and pseudo targets made from ID data only, and the RBF width they select (Wang et al. 2018);
* :class:`LAOOD`: per-layer OCSVM scores, standardised on held-out ID training rows, max over layers;
* :class:`LAOODEarlyExit`: the same scores visited in network order; a sample stops at the first
  decisive layer (ES-OOD).

The OCSVMs are scikit-learn's (CPU, float64); their decision function is evaluated in torch on the inputs'
device (:func:`~.ocsvm.rbf_decision`).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..api import InvalidInputError
from ..constraints import Interval, ListOf, L, N, Param
from .multilayer import LAYERS, LayerDetector, _pooled
from .ocsvm import GAMMA_GRID, MIN_ROWS, _svm_parts, rbf_decision, select_gamma, self_adaptive_shifting

__all__ = ["LAOOD", "LAOODEarlyExit", "self_adaptive_shifting", "select_gamma", "rbf_decision", "GAMMA_GRID"]

_POSITIVE = Interval(float, 0, None, closed="neither")
_THRESHOLD = Param(Interval(float), ListOf(Interval(float), length=L), None, structural=False,
                   doc="standardised threshold (one, or one per layer); None: from the quantile")


class LAOOD(LayerDetector):
    r"""Layer-adaptive OOD detection: one OCSVM per layer on pooled features, max of standardised scores.

    Per layer :math:`l`, the feature :math:`f_l(x)` is the spatial mean of the layer output (``(N, D_l)``
    columns as they are), standardised per dimension with the mean and standard deviation of the ID training
    rows: :math:`\tilde f_l = (f_l - m_l) / s_l`. An RBF one-class SVM (:math:`\nu` = ``nu`` = 0.001, as in the
    paper) is fitted on up to ``max_fit_samples`` ID rows (seeded subsample); its width :math:`\gamma_l` is
    chosen from ``gamma_grid / D_l`` with pseudo outliers and pseudo targets made from those ID rows only
    (:func:`self_adaptive_shifting`, :func:`select_gamma`), unless ``gamma`` fixes it. Score:

    .. math:: s(x) = \max_l z_l(x), \qquad z_l(x) = \frac{-g_l(\tilde f_l(x)) - \mu_l}{\sigma_l}

    with :math:`g_l` the OCSVM decision function (:math:`-g_l`: higher = more OOD) and :math:`\mu_l, \sigma_l`
    its mean and standard deviation on a held-out part of ID train (``holdout`` fraction, at most
    ``max_fit_samples`` rows, disjoint from the SVM's rows; the SVM's own rows when fewer than 2 are held
    out). The standardisation makes the layers comparable before the max; the authors' code takes the max of
    the raw :math:`-g_l`. :meth:`predict_per_layer` gives the ``(N, L)`` matrix :math:`z_l(x)`.

    Gamma selection minimises (accepted pseudo outliers / their count) + (rejected pseudo targets / their
    count) over the grid, ties to the smallest :math:`\gamma`; the grid is relative to :math:`1/D_l` because
    squared distances between standardised vectors grow with :math:`D_l`. The authors' code uses a fixed grid
    (0.001 ... 0.1), pseudo outliers from the same shifting, and held-out ID rows in place of pseudo targets.
    ``gammas_`` and ``selection_errors_`` record the choice per layer.

    Paper: H. Wang et al., "Layer Adaptive Deep Neural Networks for Out-of-distribution Detection", PAKDD 2022
    (arXiv:2203.00192; code: github.com/haoliangwang86/LA-OOD); gamma selection: S. Wang et al., Pattern
    Recognition 74 (2018).

    :param layers: column names of the layers (``(N, D)`` or ``(N, C, H, W)`` columns)
    :param nu: OCSVM :math:`\nu` (fraction of training outliers), 0.001 as in the paper
    :param gamma: fixed RBF :math:`\gamma` (a number, or one per layer); ``None`` selects it per layer
    :param gamma_grid: candidate widths as multiples of :math:`1/D_l` (default :math:`10^{-2}, \dots, 10^{2}`,
        9 log-spaced values)
    :param max_fit_samples: most ID rows per SVM fit (and per held-out set)
    :param holdout: fraction of ID rows held out to standardise the scores
    :param k: neighbours for the edge-pattern detection (default :math:`\lceil 5 \log_{10} n \rceil`; at most
        the SVM's rows - 1)
    :param edge_threshold: a point is an edge pattern when at least ``1 - edge_threshold`` of its neighbours
        lie behind it
    :param seed: seed of the subsample / hold-out split
    """

    needs_labels: ClassVar[bool] = False  # one-class detectors: the labels are never read
    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "layers": LAYERS,
        "nu": Param(Interval(float, 0, 1, closed="right"), doc="OCSVM nu"),
        "gamma": Param(_POSITIVE, ListOf(_POSITIVE, length=L), None, doc="fixed RBF width; None: selected"),
        "gamma_grid": Param(ListOf(_POSITIVE), doc="candidate widths, multiples of 1/D_l"),
        "max_fit_samples": Param(Interval(int, MIN_ROWS, None), doc="most ID rows per SVM fit"),
        "holdout": Param(Interval(float, 0, 1, closed="left"), doc="fraction of ID rows for the statistics"),
        "k": Param(Interval(int, 1, N - 1), None, doc="neighbours of the edge detection"),
        "edge_threshold": Param(Interval(float, 0, 1), doc="edge pattern: >= 1 - this of neighbours behind"),
        "seed": Param(Interval(int, 0, None), doc="seed of the subsample / hold-out split"),
    }

    def __init__(self, layers: Union[str, Sequence[str]], nu: float = 0.001,
                 gamma: Optional[Union[float, Sequence[float]]] = None, gamma_grid: Sequence[float] = GAMMA_GRID,
                 max_fit_samples: int = 2000, holdout: float = 0.2, k: Optional[int] = None,
                 edge_threshold: float = 0.1, seed: int = 0):
        super().__init__(None)
        self.layers = layers
        self.nu = nu
        self.gamma = gamma
        self.gamma_grid = gamma_grid
        self.max_fit_samples = max_fit_samples
        self.holdout = holdout
        self.k = k
        self.edge_threshold = edge_threshold
        self.seed = seed

    def _split(self, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Positions among the ID rows of the SVM's rows and of the held-out rows of the score statistics."""
        perm = np.random.default_rng(self.seed).permutation(n)
        n_hold = min(int(round(self.holdout * n)), self.max_fit_samples)
        if n_hold < 2 or n - n_hold < MIN_ROWS:
            fit = np.sort(perm[: self.max_fit_samples])
            return fit, fit
        return np.sort(perm[n_hold : n_hold + self.max_fit_samples]), np.sort(perm[:n_hold])

    def _svm(self, l: int, xs: np.ndarray):
        """``(gamma, OneClassSVM, err over the grid or None)`` of layer ``l`` on standardised rows ``xs``."""
        from sklearn.svm import OneClassSVM

        if self.gamma is not None:
            g = float(self.gamma[l] if isinstance(self.gamma, (list, tuple)) else self.gamma)
            return g, OneClassSVM(kernel="rbf", nu=self.nu, gamma=g).fit(xs), None
        outliers, targets, _ = self_adaptive_shifting(xs, self.k, self.edge_threshold)
        return select_gamma(xs, outliers, targets, [g / xs.shape[1] for g in self.gamma_grid], self.nu)

    def _raw_scores(self, l: int, col: Tensor) -> Tensor:
        """Raw OCSVM score :math:`-g_l` of a column's rows, float64 on the column's device."""
        z = (_pooled(col).double() - self.feature_mean_[l]) / self.feature_std_[l]
        return -rbf_decision(z, self.support_vectors_[l], self.dual_coef_[l], self.intercept_[l], self.gammas_[l])

    def _standardised(self, l: int, col: Tensor) -> Tensor:
        return (self._raw_scores(l, col) - self.score_mean_[l]) / self.score_std_[l]

    @torch.no_grad()
    def fit_structured(self, reps, y=None) -> "LAOOD":
        cols, _ = self._training_columns(self._layer_inputs(reps), y)
        n = next(iter(cols.values())).shape[0]
        if n < MIN_ROWS:
            raise InvalidInputError(f"{type(self).__name__}: needs at least {MIN_ROWS} ID training rows, got {n}")
        self.fit_index_, self.stats_index_ = self._split(n)
        self.feature_mean_, self.feature_std_, self.support_vectors_, self.dual_coef_ = [], [], [], []
        self.intercept_, self.gammas_, self.selection_errors_, self.svms_, stats = [], [], [], [], []
        for l, col in enumerate(cols.values()):
            x = _pooled(col).double()
            mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False)
            std = torch.where(std > 0, std, torch.ones_like(std))
            xs = ((x - mean) / std).cpu().numpy()
            g, svm, err = self._svm(l, xs[self.fit_index_])
            sv, dual, rho = _svm_parts(svm)
            self.feature_mean_.append(mean)
            self.feature_std_.append(std)
            self.support_vectors_.append(sv.to(x.device))
            self.dual_coef_.append(dual.to(x.device))
            self.intercept_.append(rho)
            self.gammas_.append(float(g))
            self.selection_errors_.append(err)
            self.svms_.append(svm)
            stats.append(-rbf_decision(torch.as_tensor(xs[self.stats_index_]), sv, dual, rho, float(g)))
        raw = torch.stack(stats, dim=1).to(x.device)
        sd = raw.std(dim=0, unbiased=False)
        self.score_mean_, self.score_std_ = raw.mean(dim=0), torch.where(sd > 0, sd, torch.ones_like(sd))
        self.holdout_scores_ = (raw - self.score_mean_) / self.score_std_  #: (n_stats, L) standardised
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_per_layer(self, reps) -> Tensor:
        """Standardised per-layer scores :math:`z_l(x)`, ``(N, L)``, in the inputs' dtype (float32 at least)."""
        self._require_fit()
        cols = list(self._checked(self._layer_inputs(reps)).values())
        z = torch.stack([self._standardised(l, c) for l, c in enumerate(cols)], dim=1)
        return z.to(torch.promote_types(cols[0].dtype, torch.float32))

    def predict_structured(self, reps) -> Tensor:
        return self.predict_per_layer(reps).max(dim=1).values


class LAOODEarlyExit(LAOOD):
    r"""ES-OOD: LA-OOD scores visited in network order, stopping at the first decisive layer.

    ``layers`` must be listed in network order. With :math:`z_l` the standardised layer scores of
    :class:`LAOOD`, sample :math:`x` exits at

    .. math:: e(x) = \min \{ l : z_l(x) > t^{high}_l \ \text{or}\ z_l(x) < t^{low}_l \} \cup \{L - 1\}

    (above ``t_high``: OOD; below ``t_low``: ID; undecided samples run to the last layer). Its score is the
    max over the layers it has seen, :math:`s(x) = \max_{l \le e(x)} z_l(x)`: without any early exit this is
    exactly the :class:`LAOOD` score. Layer :math:`l` is scored only for the samples still running.

    Thresholds, in standardised units: ``t_low`` / ``t_high`` (a number or one per layer) when given;
    otherwise per layer the ``q_low`` / ``q_high`` quantiles of the held-out ID scores :math:`z_l` (defaults
    0.1 and 0.99: about 10 % of ID samples stop at the first layer as ID, about 1 % of ID samples per layer
    stop as OOD). ``q_low = 0`` never exits as ID; ``q_high = 1`` never exits as OOD. None of these changes
    the fitted state. :meth:`predict_structured_details` gives the exit layers (``"exit_layer"``);
    :meth:`average_layers_used` gives :math:`\bar L = \text{mean}(e(x) + 1)`, and :meth:`compute_saved`
    :math:`1 - \bar L / L`. Validation AUROC alone favours fewer exits: read it with the layers used.

    Paper: H. Wang, C. Zhao, F. Chen, "Efficient out-of-distribution detection via layer-adaptive scoring
    and early stopping", Frontiers in Big Data 7 (2024), https://doi.org/10.3389/fdata.2024.1444634.

    :param q_low: ID-exit quantile of the held-out ID scores (0: never)
    :param q_high: OOD-exit quantile of the held-out ID scores (1: never)
    :param t_low: explicit ID-exit thresholds (override ``q_low``)
    :param t_high: explicit OOD-exit thresholds (override ``q_high``)

    The other parameters are those of :class:`LAOOD`.
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {
        **LAOOD.parameter_constraints,
        "q_low": Param(Interval(float, 0, 1), structural=False, doc="ID-exit quantile (0: never)"),
        "q_high": Param(Interval(float, 0, 1), structural=False, doc="OOD-exit quantile (1: never)"),
        "t_low": _THRESHOLD,
        "t_high": _THRESHOLD,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {
        "q_low": {"grid": [0.0, 0.1, 0.5]},
        "q_high": {"grid": [0.95, 0.99]},
    }

    def __init__(self, layers: Union[str, Sequence[str]], q_low: float = 0.1, q_high: float = 0.99,
                 t_low: Optional[Union[float, Sequence[float]]] = None,
                 t_high: Optional[Union[float, Sequence[float]]] = None, nu: float = 0.001,
                 gamma: Optional[Union[float, Sequence[float]]] = None, gamma_grid: Sequence[float] = GAMMA_GRID,
                 max_fit_samples: int = 2000, holdout: float = 0.2, k: Optional[int] = None,
                 edge_threshold: float = 0.1, seed: int = 0):
        super().__init__(layers, nu, gamma, gamma_grid, max_fit_samples, holdout, k, edge_threshold, seed)
        self.q_low, self.q_high = q_low, q_high
        self.t_low, self.t_high = t_low, t_high

    def thresholds(self) -> Tuple[Tensor, Tensor]:
        """Per-layer ``(t_low, t_high)`` in standardised units (``-inf`` / ``+inf``: never exits that way)."""
        self._require_fit()
        h = self.holdout_scores_

        def side(t, q, never):
            if t is not None:
                return torch.as_tensor(t, dtype=h.dtype, device=h.device).expand(h.shape[1])
            if q == never:
                return torch.full((h.shape[1],), -math.inf if never == 0 else math.inf, dtype=h.dtype, device=h.device)
            return torch.quantile(h, q, dim=0)

        return side(self.t_low, self.q_low, 0.0), side(self.t_high, self.q_high, 1.0)

    @torch.no_grad()
    def predict_structured_details(self, reps) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(scores (N,), {"exit_layer": (N,) int64})``; layer ``l`` is scored only for running samples."""
        self._require_fit()
        cols = list(self._checked(self._layer_inputs(reps)).values())
        lo, hi = self.thresholds()
        n, n_layers, device = cols[0].shape[0], len(cols), cols[0].device
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
                stop = (z > hi[l]) | (z < lo[l])
                exits[rows[stop]] = l
                running[rows[stop]] = False
        return best.to(torch.promote_types(cols[0].dtype, torch.float32)), {"exit_layer": exits}

    def predict_structured(self, reps) -> Tensor:
        return self.predict_structured_details(reps)[0]

    def average_layers_used(self, reps) -> float:
        """Mean number of layers scored per sample, :math:`\\text{mean}(e(x) + 1) \\in [1, L]`."""
        exits = self.predict_structured_details(reps)[1]["exit_layer"]
        return float((exits + 1).double().mean()) if exits.numel() else float("nan")

    def compute_saved(self, reps) -> float:
        """Fraction of per-layer detector work saved, :math:`1 - \\bar L / L`."""
        return 1.0 - self.average_layers_used(reps) / self.holdout_scores_.shape[1]
