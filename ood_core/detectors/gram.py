"""Gram-matrix deviations over several layers (representation ``"layers"``)."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..api import InvalidInputError, ModelNotSetException
from ..constraints import Interval, ListOf, Options, Param
from .multilayer import ColumnNames, LayerDetector

#: most elements (rows x channels x positions) of one float64 block of :func:`gram_stats`
CHUNK_ELEMENTS = 1 << 22


def gram_stats(f: Tensor, powers: Sequence[int]) -> Tensor:
    r"""Row sums of the :math:`p`-th order Gram matrices of feature maps ``f`` ``(n, C, ...)``:
    ``(n, C, P)`` float64,

    .. math:: g_{p,i} = \operatorname{sgn}(r_i) |r_i|^{1/p}, \qquad
              r_i = \sum_j (F^p F^{p\top})_{ij} = \sum_k F_{ik}^p \sum_j F_{jk}^p

    with :math:`F \in R^{C \times S}` one sample's map (``S = H W``; ``(n, D)`` columns have ``S = 1``).
    The right-hand side costs :math:`O(CS)` instead of :math:`O(C^2 S)`; float64 because :math:`F^p` for
    :math:`p` up to 10 leaves float32's range. Rows are processed in blocks of :data:`CHUNK_ELEMENTS`.
    """
    f = f.reshape(f.shape[0], f.shape[1], -1)
    step = max(1, CHUNK_ELEMENTS // max(1, f.shape[1] * f.shape[2]))
    out = [f.new_zeros((0, f.shape[1], len(powers)), dtype=torch.float64)]
    for start in range(0, f.shape[0], step):
        block = f[start:start + step].double()
        per_power = []
        for p in powers:
            t = block**p
            r = (t * t.sum(dim=1, keepdim=True)).sum(dim=2)
            per_power.append(r.sign() * r.abs() ** (1.0 / p))
        out.append(torch.stack(per_power, dim=2))
    return torch.cat(out)


def deviation(g: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    r""":math:`\delta = \sum_{p,i} \frac{[lo - g]_+}{|lo + 10^{-6}|} + \frac{[g - hi]_+}{|hi + 10^{-6}|}`
    of statistics ``g`` ``(n, C, P)`` against the ranges ``lo``, ``hi`` (same shape): ``(n,)``."""
    return (torch.relu(lo - g) / (lo + 1e-6).abs() + torch.relu(g - hi) / (hi + 1e-6).abs()).sum(dim=(1, 2))


class Gram(LayerDetector):
    r"""Gram-matrix deviations from class-conditional ID ranges (Sastry & Oore), on several layers.

    Statistics :math:`g_p(x)` per layer and power :math:`p` (:func:`gram_stats`), :math:`\hat y(x)` the
    predicted class and :math:`\pi(x)` the max softmax probability of ``reps["logits"]``.

    Fit, ``variant="paper"`` (the authors' code): per *predicted* class :math:`c`, the element-wise min / max
    of :math:`g_p` over ID training rows predicted as :math:`c` (a ``holdout`` fraction of each class left
    out, seeded). Expected deviation of layer :math:`l`: :math:`E_l` = mean of :math:`\delta_l / \pi` over
    the held-out rows (1 when there are none or it is 0). Score:

    .. math:: s(x) = \sum_l \frac{\delta_l(x)}{\pi(x)\, E_l}, \qquad
              \delta_l(x) = \sum_p \text{deviation}(g_p(x), \min\nolimits_{\hat y(x)}, \max\nolimits_{\hat y(x)})

    (:func:`deviation`). Predicted classes with no training row use the range over all classes.

    What the authors' code does (github.com/VectorInstitute/gram-ood-detection, ``ResNet_Cifar10.ipynb``:
    ``G_p``, ``Detector.compute_minmaxs``, ``get_deviations``, ``detect``): min / max per class of
    ``train_preds`` (predicted labels) over every training image; per-layer deviations as
    :func:`deviation` summed over powers 1..10, divided by the max softmax (``test_confs``); each layer
    divided by the mean of those deviations on a random 10 % of the ID *test* set (``t95 = mean + 1e-7``)
    and summed. Ours takes :math:`E_l` from held-out ID *training* rows (test sets are never used to fit).

    ``variant="pytorch-ood"`` keeps pytorch-ood 0.4.0's reading: ranges per *true* label, no division by
    :math:`\pi`; otherwise identical (same 10 % hold-out drawn with ``torch.randperm`` per class: with
    ``torch.manual_seed(seed)`` before its ``fit`` the scores agree).

    Paper: Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020
    (arXiv:1912.12510).

    pytorch-ood 0.4.0 ``Gram(head, feature_layers, num_classes, num_poles_list=None)``: accepted in that
    order (``num_poles_list`` is ``powers``); ``fit(loader)`` / ``predict(x)`` run ``feature_layers`` one
    after the other and ``head`` on the last output, and ``predict_structured(logits, feature_list)`` works
    as theirs. Differences: the default variant is the paper's (above); the default powers are 1..10 (the
    paper's), theirs 1..L; a class with no ID rows falls back to the range over all classes (theirs raises).

    :param head: pytorch-ood's head (last feature map -> logits), for ``fit`` / ``predict``
    :param feature_layers: pytorch-ood's consecutive layers whose outputs are the maps
    :param num_classes: checked against the logits' width when given
    :param powers: ``P`` (powers 1..P) or the list of powers (pytorch-ood's ``num_poles_list``)
    :param layers: column names of the layer outputs in ``reps`` (feature maps, hooks reduction ``"none"``)
    :param holdout: fraction of each class held out to estimate :math:`E_l`
    :param seed: seed of the hold-out permutation
    :param variant: ``"paper"`` or ``"pytorch-ood"``
    """

    @property
    def needs_labels(self) -> bool:  # the paper's code groups by the predicted class; pytorch-ood's by the label
        return self.variant == "pytorch-ood"

    requires_fit: ClassVar[bool] = True
    aliases: ClassVar[Dict[str, str]] = {**LayerDetector.aliases, "num_poles_list": "powers"}
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "powers": Param(Interval(int, 1, None), ListOf(Interval(int, 1, None)), doc="P (powers 1..P) or a list"),
        "layers": Param(ColumnNames(), None, doc="names of the reps columns (None: pytorch-ood's list form)"),
        "holdout": Param(Interval(float, 0, 1, closed="left"), doc="fraction per class held out for E_l"),
        "seed": Param(Interval(int, 0, None), doc="seed of the hold-out permutation"),
        "variant": Param(Options("paper", "pytorch-ood"), doc="ranges per predicted class / 1/softmax, or not"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"powers": {"grid": [5, 10]}}

    def __init__(self, head: Optional[nn.Module] = None, feature_layers: Optional[Sequence[nn.Module]] = None,
                 num_classes: Optional[int] = None, powers: Union[int, Sequence[int]] = 10,
                 layers: Union[None, str, Sequence[str]] = None, holdout: float = 0.1, seed: int = 0,
                 variant: str = "paper"):
        super().__init__(None)
        self.head = head
        self.feature_layers = feature_layers
        self.num_classes = num_classes
        self.powers = powers
        self.layers = layers
        self.holdout = holdout
        self.seed = seed
        self.variant = variant

    # -- the method, on statistics ------------------------------------------------------------------------
    def _powers(self) -> List[int]:
        return list(range(1, int(self.powers) + 1)) if isinstance(self.powers, int) else [int(p) for p in self.powers]

    def _paper(self) -> bool:
        return self.variant.lower() == "paper"

    def _layer_deviation(self, g: Tensor, cls: Tensor, lo: Tensor, hi: Tensor, conf: Tensor) -> Tensor:
        dev = deviation(g, lo[cls], hi[cls])
        return dev / conf if self._paper() else dev

    def _split(self, group: Tensor) -> Tuple[Tensor, Tensor]:
        """Rows for the ranges and held-out rows: per group a seeded ``holdout`` fraction is held out."""
        gen = torch.Generator().manual_seed(int(self.seed))
        train, held = [], []
        for c in torch.unique(group).tolist():
            rows = torch.nonzero(group == c).flatten()
            perm = torch.randperm(rows.shape[0], generator=gen).to(rows.device)
            n_held = int(self.holdout * rows.shape[0])
            held.append(rows[perm[:n_held]])
            train.append(rows[perm[n_held:]])
        return torch.cat(train), torch.cat(held)

    def _fit_stats(self, logits: Tensor, stats: List[Tensor], y: Tensor) -> "Gram":
        k = logits.shape[1]
        if self.num_classes is not None and k != self.num_classes:
            raise InvalidInputError(f"Gram: num_classes={self.num_classes}, but the logits have {k} columns")
        conf, pred = torch.softmax(logits.double(), dim=1).max(dim=1)
        group = pred if self._paper() else y
        if int(group.max()) >= k:
            raise InvalidInputError(f"Gram: labels go up to {int(group.max())}, but the logits have {k} classes")
        train, held = self._split(group)
        self.mins_, self.maxs_, norms = [], [], []
        for g in stats:
            idx = group[train][:, None, None].expand(-1, *g.shape[1:])
            lo = g.new_full((k, *g.shape[1:]), float("inf")).scatter_reduce_(0, idx, g[train], "amin")
            hi = g.new_full((k, *g.shape[1:]), float("-inf")).scatter_reduce_(0, idx, g[train], "amax")
            seen = torch.isfinite(lo[:, 0, 0])
            lo[~seen], hi[~seen] = lo[seen].amin(dim=0), hi[seen].amax(dim=0)
            dev = self._layer_deviation(g[held], group[held], lo, hi, conf[held])
            mean = dev.mean() if dev.numel() else dev.new_zeros(())
            norms.append(torch.where(mean > 0, mean, torch.ones_like(mean)))
            self.mins_.append(lo)
            self.maxs_.append(hi)
        self.layer_norm_ = torch.stack(norms)
        self._mark_fitted()
        return self

    def _score_stats(self, logits: Tensor, stats: List[Tensor]) -> Tensor:
        conf, pred = torch.softmax(logits.double(), dim=1).max(dim=1)
        devs = [self._layer_deviation(g, pred, lo, hi, conf) for g, lo, hi in zip(stats, self.mins_, self.maxs_)]
        return torch.stack(devs, dim=1) / self.layer_norm_

    # -- inputs: reps dict, pytorch-ood's (logits, feature_list), or the model ------------------------------
    def _inputs(self, reps, feature_list=None) -> Dict[str, Any]:
        if feature_list is not None:
            return {"logits": reps, **self._layer_inputs(feature_list)}
        if not isinstance(reps, Mapping) or "logits" not in reps:
            raise InvalidInputError("Gram: needs the column 'logits' (reps = {'logits': ..., <layers>: ...}), "
                                    "or predict_structured(logits, feature_list)")
        return {"logits": reps["logits"], **self._layer_inputs(reps)}

    def _forward(self, x: Tensor) -> Dict[str, Any]:
        if self.head is None or self.feature_layers is None:
            raise ModelNotSetException("Gram: fit(loader) / predict(x) need head= and feature_layers=")
        stats = []
        for layer in self.feature_layers:
            x = layer(x)
            stats.append(gram_stats(x, self._powers()))
        return {"logits": self.head(x), **self._layer_inputs(stats)}

    @torch.no_grad()
    def fit_structured(self, reps, y=None) -> "Gram":
        columns = self._inputs(reps)
        cols, y = self._training_columns(columns, y, n_layers=len(columns) - 1)
        logits, *maps = cols.values()
        return self._fit_stats(logits, [gram_stats(f, self._powers()) for f in maps], y)

    @torch.no_grad()
    def fit(self, data_loader) -> "Gram":
        parts, ys = [], []
        for x, y in data_loader:
            parts.append(self._forward(x))
            ys.append(y)
        columns = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        cols, y = self._training_columns(columns, torch.cat(ys), n_layers=len(columns) - 1)
        logits, *stats = cols.values()
        return self._fit_stats(logits, stats, y)

    @torch.no_grad()
    def predict_per_layer(self, reps, feature_list=None) -> Tensor:
        r"""Normalised per-layer deviations :math:`\delta_l / (\pi E_l)` (paper) or :math:`\delta_l / E_l`,
        ``(N, L)`` float64."""
        self._require_fit()
        logits, *maps = self._checked(self._inputs(reps, feature_list)).values()
        return self._score_stats(logits, [gram_stats(f, self._powers()) for f in maps])

    def predict_structured(self, reps, feature_list=None) -> Tensor:
        return self.predict_per_layer(reps, feature_list).sum(dim=1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self._require_fit()
        logits, *stats = self._checked(self._forward(x)).values()
        return self._score_stats(logits, stats).sum(dim=1)
