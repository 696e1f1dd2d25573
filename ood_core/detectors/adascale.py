r"""AdaSCALE: SCALE with a per-sample percentile set by how much the features move under a small input change
(representation ``"model"``: one input-gradient pass and a second forward per sample).

* :func:`perturb`: the input change (the entries with the *smallest* gradient magnitude, stepped by 0.5);
* :func:`adascale_ratio`: SCALE's :math:`r = \sum_j a_j / \sum_{j \in \text{top-}k} a_j` with a per-sample
  :math:`k`;
* :class:`AdaScaleA` (features scaled by :math:`e^r`) and :class:`AdaScaleL` (logits scaled by :math:`r^2`).
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..api import Detector, InvalidInputError
from ..constraints import Interval, ListOf, Param, ParameterError
from .model_in_loop import ModelInputs, _input_gradient

__all__ = ["AdaScaleA", "AdaScaleL", "perturb", "adascale_ratio"]

#: the input step of the official code, in the network's (normalised) input units
STEP = 0.5
#: OpenOOD's percentile grid (configs/postprocessors/adascale_a.yml): every pair 60 <= lo < hi <= 99
OPENOOD_PERCENTILES = [[lo, hi] for i, lo in enumerate([60, 65, 70, 75, 80, 85, 90, 95])
                       for hi in [65, 70, 75, 80, 85, 90, 95, 99][i:]]


def perturb(x: Tensor, grad: Tensor, o: float, step: float = STEP) -> Tensor:
    r""":math:`\tilde x = x + \text{step}\cdot m \odot \operatorname{sign}(g)`, :math:`m` the indicator of the
    :math:`\lfloor o \cdot CHW \rfloor` entries of the sample with the **smallest** :math:`|g|` (as the official
    code: ``topk(..., largest=False)``)."""
    flat = grad.reshape(grad.shape[0], -1)
    n = int(flat.shape[1] * o)
    mask = torch.zeros_like(flat)
    if n > 0:
        mask.scatter_(1, flat.abs().topk(n, dim=1, largest=False).indices, 1.0)
    return (x + step * mask.reshape(grad.shape) * grad.sign()).detach()


def adascale_ratio(a: Tensor, percentiles: Tensor) -> Tensor:
    r"""Per-sample :math:`r_i = \sum_j a_{ij} / \sum_{j \in \text{top-}k_i} a_{ij}`,
    :math:`k_i = D - \operatorname{round}(D p_i / 100)` (at least 1; :math:`r_i := 1` where the top-:math:`k`
    sum is 0). ``a`` ``(N, D)`` non-negative, ``percentiles`` ``(N,)``."""
    d = a.shape[1]
    ks = (d - torch.round(d * percentiles.to(a.dtype) / 100.0)).long().clamp(1, d)
    values = a.topk(int(ks.max()), dim=1).values
    kept = torch.arange(values.shape[1], device=a.device)[None, :] < ks[:, None]
    top = (values * kept).sum(dim=1)
    zero = top == 0
    return torch.where(zero, torch.ones_like(top), a.sum(dim=1) / torch.where(zero, torch.ones_like(top), top))


class _AdaScale(ModelInputs, Detector):
    r"""AdaSCALE (shared by the A and L variants): SCALE whose pruning percentile adapts to each sample.

    With :math:`f` the network (``model``: the classifier; ``model.features``: the penultimate features
    :math:`z`, ``model.head``: the linear classifier), per sample:

    1. :math:`g = \nabla_x f_{\hat y}(x)`, :math:`\hat y = \arg\max_c f_c(x)`; :math:`\tilde x` = :func:`perturb`
       (the fraction ``o`` of the entries with the smallest :math:`|g|`, stepped by 0.5 along
       :math:`\operatorname{sign} g`); :math:`\tilde z = z(\tilde x)`.
    2. :math:`Q'(x) = \sum_{j \in T_{k_1}(z)} \max(\tilde z_j, 0) + \lambda \sum_{j \in T_{k_2}(z)} |z_j - \tilde
       z_j|`, :math:`T_k(z)` the indices of the :math:`k` largest entries of :math:`z`,
       :math:`k_{1,2} = \lfloor D\,k_{1,2}/100 \rfloor` (``k1``, ``k2`` in percent of :math:`D`).
    3. :math:`p(x) = p_{\min} + (1 - F(Q'(x)))\,(p_{\max} - p_{\min})`, :math:`F` the empirical CDF
       (:math:`\#\{v \le t\}/n`) of :math:`Q'` on ID rows seen in ``fit``; ``percentile`` = :math:`[p_{\min},
       p_{\max}]`.
    4. :math:`r(x)` = :func:`adascale_ratio` of :math:`\max(z, 0)` at :math:`p(x)`; the score is the negative
       energy :math:`-\log\sum_c e^{\ell_c}` of :math:`\ell = W(z\,e^{r}) + b` (AdaSCALE-A) or
       :math:`\ell = (Wz + b)\,r^2` (AdaSCALE-L).

    ``fit(loader)`` keeps :math:`z, \tilde z` of up to ``max_fit_samples`` ID rows (seeded subsample), so
    ``percentile``, ``k1``, ``k2`` and ``lmbda`` act at scoring (a search over them needs one fit); ``o``
    changes :math:`\tilde x` and needs a refit.

    Official code (followed): OpenOOD ``openood/postprocessors/adascale_postprocessor.py`` and
    ``openood/networks/adascale_net.py`` (by the authors). Its quirks kept here: the perturbed entries are
    those of **smallest** gradient magnitude; the step is a fixed 0.5 in normalised input units; the
    correction term uses :math:`\max(\tilde z, 0)` but the ratio :math:`\max(z, 0)`, while AdaSCALE-A scales the
    raw :math:`z`; :math:`k_i` uses ``torch.round`` (half to even). Differences: OpenOOD fits the CDF on the
    ID **validation** split (5000 rows); fitting here sees ID training rows only (the sweep's rule); we keep
    :math:`k_1, k_2, k_i \ge 1` (OpenOOD's ``int(D k / 100)`` is 0 when :math:`D < 100/k`, which drops that
    term, and :math:`k_i = 0` divides by zero) and :math:`r := 1` where the top-:math:`k` sum is 0.
    Default search space: OpenOOD's grid (``configs/postprocessors/adascale_a.yml`` / ``adascale_l.yml``):
    ``percentile`` over the 36 pairs :math:`60 \le p_{\min} < p_{\max} \le 99`, ``k1`` = 5, ``k2`` = 1,
    ``lmbda`` = 10, ``o`` = 0.05.

    Paper: S. Regmi, "AdaSCALE: Adaptive Scaling for OOD Detection", 2025 (arXiv:2503.08023); code
    https://github.com/sudarshanregmi/AdaSCALE; SCALE: Xu et al., ICLR 2024 (arXiv:2310.00227).
    """

    representation: ClassVar[str] = "model"
    requires_fit: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    logit_scaling: ClassVar[bool] = False
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "percentile": Param(ListOf(Interval(float, 0, 100, closed="neither"), length=2), structural=False,
                            doc="[p_min, p_max] of the adaptive pruning percentile, in percent"),
        "k1": Param(Interval(float, 0, 100, closed="right"), structural=False,
                    doc="percent of D: top features whose perturbed activations form the correction term"),
        "k2": Param(Interval(float, 0, 100, closed="right"), structural=False,
                    doc="percent of D: top features whose shifts are summed"),
        "lmbda": Param(Interval(float, 0, None), structural=False, doc="weight of the feature shift"),
        "o": Param(Interval(float, 0, 1, closed="right"), doc="fraction of input entries perturbed"),
        "max_fit_samples": Param(Interval(int, 1, None), doc="most ID rows kept for the CDF of Q'"),
        "seed": Param(Interval(int, 0, None), doc="seed of the subsample of ID rows"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"percentile": {"grid": OPENOOD_PERCENTILES}}

    def __init__(self, model: Optional[nn.Module] = None, percentile: Sequence[float] = (75.0, 85.0),
                 k1: float = 5.0, k2: float = 1.0, lmbda: float = 10.0, o: float = 0.05,
                 max_fit_samples: int = 5000, seed: int = 0):
        super().__init__(model)
        self.percentile = list(percentile)
        self.k1 = k1
        self.k2 = k2
        self.lmbda = lmbda
        self.o = o
        self.max_fit_samples = max_fit_samples
        self.seed = seed

    @classmethod
    def check_params(cls, params, data=None) -> None:
        super().check_params(params, data)
        pct = params.get("percentile")
        if isinstance(pct, (list, tuple)) and len(pct) == 2 and pct[0] > pct[1]:
            raise ParameterError(cls.__name__, "percentile", f"{list(pct)!r} must be [p_min, p_max] with "
                                                             "p_min <= p_max")

    # -- the network ---------------------------------------------------------------------------------------
    def _parts(self):
        model = self._require_model()
        if not (hasattr(model, "features") and isinstance(getattr(model, "head", None), nn.Module)):
            raise InvalidInputError(f"{type(self).__name__}: needs a model with features(x) (penultimate "
                                    "features) and head (the linear classifier)")
        return model, model.features, model.head

    def _features_pair(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Features of the inputs and of the perturbed inputs, ``(N, D)`` each."""
        model, features, _ = self._parts()
        grad = _input_gradient(lambda xg: model(xg).amax(dim=1).sum(), x)  # per-sample: summed over the batch
        with torch.no_grad():
            return features(x).flatten(1), features(perturb(x, grad, self.o)).flatten(1)

    def _q(self, z: Tensor, zp: Tensor) -> Tensor:
        r""":math:`Q'` of features ``z`` and perturbed features ``zp``."""
        d = z.shape[1]
        k1, k2 = max(1, int(d * self.k1 / 100)), max(1, int(d * self.k2 / 100))
        c_o = torch.gather(torch.relu(zp), 1, z.topk(k1, dim=1).indices).sum(dim=1)
        shift = torch.gather((z - zp).abs(), 1, z.topk(k2, dim=1).indices).sum(dim=1)
        return c_o + self.lmbda * shift

    # -- fit / predict -----------------------------------------------------------------------------------
    def fit(self, data_loader) -> "_AdaScale":
        zs, zps = [], []
        for x, _ in self._batches(data_loader):
            z, zp = self._features_pair(x)
            zs.append(z)
            zps.append(zp)
        if not zs:
            raise InvalidInputError(f"{type(self).__name__}: the training loader is empty")
        z, zp = torch.cat(zs), torch.cat(zps)
        if z.shape[0] > self.max_fit_samples:
            keep = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(self.seed))
            keep = keep[: self.max_fit_samples].sort().values.to(z.device)
            z, zp = z[keep], zp[keep]
        self.fit_features_, self.fit_perturbed_ = z, zp
        self.n_features_in_ = z.shape[1]
        self._mark_fitted()
        return self

    def adaptive_percentiles(self, z: Tensor, zp: Tensor) -> Tensor:
        r"""Per-sample :math:`p(x)` ``(N,)`` from features and perturbed features."""
        self._require_fit()
        ref = torch.sort(self._q(self.fit_features_, self.fit_perturbed_).double()).values
        cdf = torch.searchsorted(ref, self._q(z, zp).double().contiguous(), side="right").double() / ref.numel()
        lo, hi = float(self.percentile[0]), float(self.percentile[1])
        return lo + (1.0 - cdf) * (hi - lo)

    def predict(self, x: Tensor) -> Tensor:
        self._require_fit()
        x = self._model_input(x)
        z, zp = self._features_pair(x)
        _, _, head = self._parts()
        with torch.no_grad():
            r = adascale_ratio(torch.relu(z), self.adaptive_percentiles(z, zp)).to(z.dtype)[:, None]
            logits = head(z) * r**2 if self.logit_scaling else head(z * torch.exp(r))
            return -torch.logsumexp(logits, dim=1)


class AdaScaleA(_AdaScale):
    __doc__ = _AdaScale.__doc__ + r"""
    This class: AdaSCALE-A, activation scaling :math:`\ell = W(z\,e^{r}) + b`.
    """


class AdaScaleL(_AdaScale):
    __doc__ = _AdaScale.__doc__ + r"""
    This class: AdaSCALE-L, logit scaling :math:`\ell = (Wz + b)\,r^2`.
    """

    logit_scaling: ClassVar[bool] = True
