r"""Layer fusion: per-layer OOD scores turned into p-values against ID validation scores, then combined.

Intermediate layers carry OOD signal, but their scores live on different scales and are correlated. A
p-value puts every layer on the same scale (the fraction of ID samples that look at least as OOD), and the
classical meta-analysis combinations then apply:

* :func:`conformal_pvalues`: :math:`p_l(x) = (1 + \#\{i: v_{il} \ge s_l(x)\}) / (n + 1)`, the conformal
  p-value of score :math:`s_l(x)` against ID calibration scores :math:`v_{1l}, \dots, v_{nl}` (higher score =
  more OOD; valid, i.e. :math:`P(p \le \alpha) \le \alpha` for an exchangeable ID sample);
* :func:`brown_parameters`: Brown's scale :math:`c` and degrees of freedom :math:`f` from the covariance of
  :math:`-2 \log p_l` across layers on the calibration set;
* :func:`fuse_pvalues`: Fisher (with or without Brown's correction), min, max, mean of the p-values;
* :class:`LayerFusion`: the detector: a per-layer base score (energy, or any features detector fitted per
  layer), calibrated on ID validation data, fused.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..api import InvalidInputError
from ..constraints import Constraint, Instance, ListOf, Options, Param
from .multilayer import LAYERS, LayerDetector, _pooled, layer_energy, signs_from_validation

__all__ = ["LayerFusion", "conformal_pvalues", "loo_pvalues", "brown_parameters", "fuse_pvalues", "FUSIONS"]

FUSIONS = ("fisher_brown", "fisher", "min", "max", "mean")


# -- the statistics, as plain functions ------------------------------------------------------------------
def conformal_pvalues(scores: Tensor, calibration: Tensor) -> Tensor:
    r"""p-values ``(N, L)`` of ``scores`` ``(N, L)`` against ID ``calibration`` scores ``(n, L)``, per column:
    :math:`p = (1 + \#\{i: v_i \ge s\}) / (n + 1)` (higher score = more OOD). float64."""
    cal = calibration.double()
    n = cal.shape[0]
    sorted_cal = torch.sort(cal, dim=0).values.T.contiguous()  # (L, n)
    s = scores.double().T.contiguous()  # (L, N)
    below = torch.searchsorted(sorted_cal, s, side="left")  # #{v < s}
    return ((1 + n - below).double() / (n + 1)).T


def loo_pvalues(calibration: Tensor) -> Tensor:
    r"""Leave-one-out p-values ``(n, L)`` of the calibration scores themselves:
    :math:`p_j = (1 + \#\{i \ne j: v_i \ge v_j\}) / n = \#\{i: v_i \ge v_j\} / n`, the distribution a new ID
    sample's :func:`conformal_pvalues` has (so Brown's moments are those of the p-values actually fused)."""
    cal = calibration.double()
    n = cal.shape[0]
    sorted_cal = torch.sort(cal, dim=0).values.T.contiguous()
    below = torch.searchsorted(sorted_cal, cal.T.contiguous(), side="left")
    return ((n - below).double() / n).T


def brown_parameters(calibration_pvalues: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Per-layer means ``(L,)`` and covariance ``(L, L)`` of :math:`T_l = -2 \log p_l` on ID calibration
    p-values ``(n, L)`` (float64, population covariance). Brown's :math:`c, f` for any subset of layers
    follow from them (:func:`brown_scale_dof`)."""
    t = -2.0 * torch.log(calibration_pvalues.double())
    mean = t.mean(dim=0)
    centred = t - mean
    return mean, centred.T @ centred / t.shape[0]


def brown_scale_dof(mean: Tensor, cov: Tensor) -> Tuple[float, float]:
    r"""Brown's (1975) moment match of :math:`X = \sum_l T_l` to :math:`c\,\chi^2_f`:
    :math:`\mu = \sum_l E[T_l]`, :math:`\sigma^2 = \mathbf 1^\top \Sigma \mathbf 1`, :math:`c = \sigma^2 / (2\mu)`,
    :math:`f = 2\mu^2 / \sigma^2`. Degenerate moments (:math:`\mu \le 0` or :math:`\sigma^2 \le 0`: every
    calibration p-value 1) fall back to Fisher's :math:`c = 1, f = 2L`."""
    mu, var = float(mean.sum()), float(cov.sum())
    if not (mu > 0 and var > 0 and math.isfinite(mu) and math.isfinite(var)):
        return 1.0, 2.0 * mean.numel()
    return var / (2.0 * mu), 2.0 * mu * mu / var


def _chi2_logsf(x: Tensor, dof: float) -> Tensor:
    """:math:`\\log P(\\chi^2_{dof} > x)` in float64 (clamped at the smallest positive double)."""
    sf = torch.special.gammaincc(torch.full_like(x, dof / 2.0), x / 2.0)
    return torch.log(sf.clamp_min(torch.finfo(torch.float64).tiny))


def fuse_pvalues(p: Tensor, fusion: str, scale: float = 1.0, dof: Optional[float] = None) -> Tensor:
    r"""Combined log p-value ``(N,)`` of per-layer p-values ``p`` ``(N, L)``:

    * ``fisher``: :math:`X = -2\sum_l \log p_l`, :math:`\log P(\chi^2_{2L} > X)` (Fisher 1925);
    * ``fisher_brown``: :math:`\log P(\chi^2_f > X / c)` with Brown's ``scale`` :math:`c` and ``dof`` :math:`f`;
    * ``min`` / ``max`` / ``mean``: :math:`\log` of the min / max / mean of the :math:`p_l` (plain baselines,
      not themselves calibrated p-values: min is LA-OOD's max-combination on the p-value scale)."""
    p = p.double()
    if fusion in ("fisher", "fisher_brown"):
        x = -2.0 * torch.log(p).sum(dim=1)
        if fusion == "fisher":
            return _chi2_logsf(x, 2.0 * p.shape[1])
        return _chi2_logsf(x / scale, 2.0 * p.shape[1] if dof is None else dof)
    if fusion == "min":
        return torch.log(p.min(dim=1).values)
    if fusion == "max":
        return torch.log(p.max(dim=1).values)
    if fusion == "mean":
        return torch.log(p.mean(dim=1))
    raise ValueError(f"fuse_pvalues: fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")


# -- the detector ----------------------------------------------------------------------------------------
class _BaseScore(Constraint):
    """``"energy"``, or the name of a registered features detector that needs no head, no outliers and no
    validation choice of its own (it is fitted once per layer)."""

    def accepts_type(self, value):
        return isinstance(value, str)

    def problem(self, value, data=None):
        if not isinstance(value, str):
            return "must be a string"
        if value.lower() == "energy":
            return None
        from .registry import REGISTRY

        ok = [n for n, s in REGISTRY.items() if s.representation == "features" and not s.needs_head
              and not s.needs_outliers and not s.cls.uses_validation]
        if value.lower() in {n.lower() for n in ok}:
            return None
        return f"must be 'energy' or a features detector without head / outliers: {', '.join(sorted(ok))}"

    def __eq__(self, other):
        return type(other) is _BaseScore

    def __hash__(self):
        return hash(_BaseScore)


class LayerFusion(LayerDetector):
    r"""Per-layer scores turned into conformal p-values against ID validation scores and fused.

    Per layer :math:`l` of ``layers``, a base score :math:`s_l(x)` (higher = more OOD):

    * ``base="energy"``: :math:`s_l = \sigma_l E_l(x)`, :math:`E_l = -\log\sum_j e^{a_j(x)}` the layer's energy
      (a scalar column, e.g. ``"bn1.energy"``, is taken as it is: any per-layer score can be fed this way),
      with the sign :math:`\sigma_l \in \{\pm1\}` chosen on validation data (AUROC of ID val vs OOD val
      :math:`\ge 0.5`, as :class:`~.multilayer.LayerEnergyAggregate`; +1 until then);
    * ``base=<features detector>`` (e.g. ``"Mahalanobis"``, ``"KNN"``, ``"RMD"``): that detector, built with
      ``base_params``, fitted on each layer's spatially pooled ID training rows.

    Calibration (:meth:`select_on_validation`, on the **ID validation** rows :math:`v_{1l} \dots v_{nl}`):

    .. math:: p_l(x) = \frac{1 + \#\{i: v_{il} \ge s_l(x)\}}{n + 1}

    Fusion (``fusion``; the score is :math:`-\log p(x)`, higher = more OOD):

    .. math:: X = -2 \sum_{l \in S} \log p_l, \qquad
              p_{\text{fisher}} = P(\chi^2_{2|S|} > X), \qquad
              p_{\text{fisher\_brown}} = P(\chi^2_f > X / c),

    with :math:`c = \sigma^2 / (2\mu)`, :math:`f = 2\mu^2/\sigma^2`, :math:`\mu = \sum_{l\in S} E[T_l]`,
    :math:`\sigma^2 = \sum_{l,k \in S} \mathrm{Cov}(T_l, T_k)`, :math:`T_l = -2\log p_l`, the moments taken
    on the ID validation rows' leave-one-out p-values (:func:`loo_pvalues`); ``min`` / ``max`` / ``mean``
    fuse :math:`\min_l p_l` / :math:`\max_l p_l` / the mean (baselines). :math:`S` = ``select`` (a subset of
    ``layers``; all by default): fusion and subset act at scoring only, so a search over them reuses one fit.

    Fisher's statistic is :math:`\chi^2_{2L}` only for independent layers; adjacent layers are positively
    correlated, which makes Fisher over-confident (duplicating a layer doubles its evidence). Brown's
    correction matches the first two moments of :math:`X` to a scaled :math:`\chi^2`. We estimate the
    covariance **empirically** from the ID validation p-values rather than with Kost & McDermott's
    polynomial in the correlation of the underlying statistics: that polynomial assumes Gaussian per-test
    statistics, which per-layer OOD scores are not, while the p-values' own covariance is directly
    observable here (and it is what oodeel does). Degenerate moments fall back to Fisher.

    Before :meth:`select_on_validation` (a plain ``fit`` / ``predict``), the p-values are calibrated against
    the ID **training** scores; these are biased for bases fitted to those rows (a training row is close to
    itself), so the sweep's protocol always recalibrates on ID validation (``uses_validation``).

    Official implementation compared: oodeel's ``FisherAggregator`` (deel-ai/oodeel,
    ``oodeel/aggregator/fisher.py``), which computes Brown's :math:`c, f` from the mean and variance of the ID
    Fisher statistic (the same moments as ours: :math:`\mathrm{Var}\,X = \mathbf 1^\top\Sigma\mathbf 1`).
    Differences: oodeel's p-values interpolate the ID empirical CDF linearly (with extrapolated end points)
    and are computed in-sample on the ID rows; ours are conformal and leave-one-out. oodeel returns
    :math:`1 - p` (which saturates at 1 for clear outliers); we return :math:`-\log p`, a monotone map with
    the same ranking except where :math:`1-p` rounds to 1.

    Papers: R. A. Fisher, "Statistical Methods for Research Workers", 1925; M. B. Brown, "A method for
    combining non-independent, one-sided tests of significance", Biometrics 31 (1975); J. T. Kost &
    M. P. McDermott, "Combining dependent P-values", Statistics & Probability Letters 60 (2002); for OOD:
    Haroush, Frostig, Heller & Soudry, "A Statistical Framework for Efficient Out of Distribution Detection in
    Deep Neural Networks", ICLR 2022 (arXiv:2102.12967); Dadalto, Alberge, Duhamel & Piantanida, "Combine and
    Conquer: A Meta-Analysis on Data Shift and Out-of-Distribution Detection" (arXiv:2406.16045); oodeel docs:
    https://deel-ai.github.io/oodeel/.

    :param layers: column names of the layers
    :param base: ``"energy"`` or a features detector's name, scored per layer
    :param base_params: hyperparameters of the base detector (e.g. ``{"k": 10}`` for KNN)
    :param fusion: one of ``fisher_brown``, ``fisher``, ``min``, ``max``, ``mean``
    :param select: the layers fused (a subset of ``layers``); None: all
    """

    needs_labels: ClassVar[bool] = False  # energy reads none; a class-conditional base gets y when given
    requires_fit: ClassVar[bool] = True
    uses_validation: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "layers": LAYERS,
        "base": Param(_BaseScore(), doc="per-layer score: 'energy' or a features detector's name"),
        "base_params": Param(Instance((dict,)), None, doc="hyperparameters of the base detector"),
        "fusion": Param(Options(*FUSIONS), structural=False, doc="how the per-layer p-values are combined"),
        "select": Param(ListOf(Instance((str,))), None, structural=False,
                        doc="the layers fused, a subset of layers (None: all)"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"fusion": {"grid": list(FUSIONS)}}

    def __init__(self, layers: Union[str, Sequence[str]], base: str = "energy",
                 base_params: Optional[Dict[str, Any]] = None, fusion: str = "fisher_brown",
                 select: Optional[Sequence[str]] = None):
        super().__init__(None)
        self.layers = layers
        self.base = base
        self.base_params = base_params
        self.fusion = fusion
        self.select = select

    @classmethod
    def check_params(cls, params: Mapping[str, Any], data: Optional[Mapping[str, int]] = None) -> None:
        super().check_params(params, data)
        layers, select = params.get("layers"), params.get("select")
        if select is not None and isinstance(layers, (str, list, tuple)):
            names = [layers] if isinstance(layers, str) else list(layers)
            unknown = [s for s in select if s not in names]
            if unknown:
                from ..constraints import ParameterError

                raise ParameterError(cls.__name__, "select", f"{list(select)!r} names {unknown[0]!r}, "
                                                             f"which is not in layers {names}")

    # -- per-layer scores --------------------------------------------------------------------------------
    def _raw(self, cols: Mapping[str, Tensor]) -> Tensor:
        """Unsigned per-layer base scores ``(N, L)``."""
        if self.base.lower() == "energy":
            return torch.stack([layer_energy(x) for x in cols.values()], dim=1)
        return torch.stack([d.predict_features(_pooled(x)) for d, x in zip(self.detectors_, cols.values())], dim=1)

    def predict_per_layer(self, reps) -> Tensor:
        """Signed per-layer base scores :math:`s_l(x)`, ``(N, L)`` (higher = more OOD)."""
        self._require_fit()
        s = self._raw(self._checked(self._layer_inputs(reps))).double()
        return s * torch.tensor(self.signs_, dtype=s.dtype, device=s.device)

    def _calibrate(self, scores: Tensor) -> None:
        if scores.shape[0] < 2:
            raise InvalidInputError(f"{type(self).__name__}: needs at least 2 ID calibration rows, "
                                    f"got {scores.shape[0]}")
        self.calibration_ = scores.double()
        self.t_mean_, self.t_cov_ = brown_parameters(loo_pvalues(self.calibration_))

    @torch.no_grad()
    def fit_structured(self, reps, y=None) -> "LayerFusion":
        cols, y_id = self._training_columns(self._layer_inputs(reps), y)
        self.detectors_ = []
        if self.base.lower() != "energy":
            from .registry import build_detector

            for x in cols.values():
                self.detectors_.append(build_detector(self.base, self.base_params or {}).fit_features(_pooled(x),
                                                                                                         y_id))
        self.signs_ = [1.0] * len(cols)
        self._mark_fitted()
        self._calibrate(self.predict_per_layer(cols))  # provisional: ID train, until select_on_validation
        return self

    @torch.no_grad()
    def select_on_validation(self, id_val, ood_val) -> None:
        """Energy signs from ID and OOD validation rows; then the calibration on the ID validation rows."""
        self._require_fit()
        if self.base.lower() == "energy":
            a = self._raw(self._checked(self._layer_inputs(id_val)))
            b = self._raw(self._checked(self._layer_inputs(ood_val)))
            self.signs_ = [float(s) for s in signs_from_validation(a, b)]
        self._calibrate(self.predict_per_layer(id_val))

    def _subset(self) -> List[int]:
        names = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        return list(range(len(names))) if self.select is None else [names.index(s) for s in self.select]

    @torch.no_grad()
    def pvalues(self, reps) -> Tensor:
        """Per-layer conformal p-values ``(N, L)`` of the selected layers (float64)."""
        idx = self._subset()
        s = self.predict_per_layer(reps)[:, idx]
        return conformal_pvalues(s, self.calibration_.to(s.device)[:, idx])

    @torch.no_grad()
    def predict_structured(self, reps) -> Tensor:
        p = self.pvalues(reps)
        fusion, scale, dof = self.fusion.lower(), 1.0, None
        if fusion == "fisher_brown":
            idx = self._subset()
            scale, dof = brown_scale_dof(self.t_mean_[idx], self.t_cov_[idx][:, idx])
        return (0.0 - fuse_pvalues(p, fusion, scale, dof)).float()
