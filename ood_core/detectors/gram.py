"""Gram-matrix deviations over several layers (registry representation ``"layers"``)."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..api import InvalidInputError, StructuredDetector
from .multilayer import _id_rows, _layer_names, _same_rows, layer_column

#: elements of the largest float64 temporary of :class:`Gram` (rows are processed in chunks)
CHUNK_ELEMENTS = 1 << 22


class Gram(StructuredDetector):
    r"""Gram-matrix deviations from class-conditional ID ranges (several layers, powers :math:`p`).

    For a layer output :math:`F \in R^{C \times S}` (``S = H*W``; ``(N, D)`` columns count as
    :math:`S = 1`) and power :math:`p`, the statistic is the row sum of the :math:`p`-th order Gram matrix

    .. math:: g_{p,i} = \operatorname{sgn}(r_i) |r_i|^{1/p}, \qquad r_i = \sum_j (F^p F^{p\top})_{ij}
              = \sum_k F_{ik}^p \sum_j F_{jk}^p

    (computed as the right-hand side in float64, in chunks of rows). Fit: per class :math:`c`
    (true labels) the element-wise min / max of :math:`g_p` over a training part; a held-out fraction
    ``holdout`` of each class (seeded permutation) gives the expected deviation :math:`E_l`. Score,
    with :math:`\hat y` the argmax of ``reps["logits"]``:

    .. math:: s(x) = \sum_l \frac{\delta_l(x)}{E_l}, \quad \delta_l = \sum_p \sum_i
              \frac{[\min_{\hat y} - g_{p,i}]_+}{|\min_{\hat y} + 10^{-6}|} +
              \frac{[g_{p,i} - \max_{\hat y}]_+}{|\max_{\hat y} + 10^{-6}|}

    Classes with no training rows use the range over all classes. Columns are feature maps (hooks
    reduction ``"none"``); ``reps`` must also hold ``"logits"`` (fit and predict).

    Paper: Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020
    (arXiv:1912.12510). pytorch-ood 0.4.0: same statistics, bounds, normalisation and 10 % hold-out
    (``torch.randperm`` per class): with ``powers=[1..P]`` and ``torch.manual_seed(seed)`` before its
    ``fit`` the scores agree.

    :param layers: column names of the layer outputs
    :param powers: ``P`` (powers 1..P) or an explicit list of powers
    :param holdout: fraction of each class held out to estimate :math:`E_l`
    :param seed: seed of the hold-out permutation
    """

    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {"powers": {"grid": [5, 10]}}

    def __init__(self, layers: Union[str, Sequence[str]] = (), powers: Union[int, Sequence[int]] = 10,
                 holdout: float = 0.1, seed: int = 0):
        super().__init__(None)
        self.layers = _layer_names("Gram", layers)
        plist = list(range(1, int(powers) + 1)) if isinstance(powers, (int, float)) else [int(p) for p in powers]
        if not plist or any(p < 1 for p in plist):
            raise ValueError(f"Gram: powers must be a positive integer or a list of them, got {powers!r}")
        if not 0 <= float(holdout) < 1:
            raise ValueError(f"Gram: holdout must be in [0, 1), got {holdout!r}")
        self.powers = plist
        self.holdout = float(holdout)
        self.seed = int(seed)
        self.mins: List[Tensor] = []  #: per layer (K, C_l, P) float64
        self.maxs: List[Tensor] = []
        self.layer_norm: Optional[Tensor] = None  #: (L,) float64

    def _maps(self, reps) -> List[Tensor]:
        cols = []
        for key in self.layers:
            x = layer_column(self, reps, key)
            if x.ndim < 2:
                raise InvalidInputError(f"Gram: column {key!r} must be (N, C, ...) or (N, D), got {tuple(x.shape)}")
            cols.append(x.reshape(x.shape[0], x.shape[1], -1))
        return cols

    def stats(self, f: Tensor) -> Tensor:
        """Gram statistics of ``f (n, C, S)``: ``(n, C, P)`` float64 (whole batch; see :meth:`_chunks`)."""
        f = f.double()
        out = []
        for p in self.powers:
            t = f**p
            r = (t * t.sum(dim=1, keepdim=True)).sum(dim=2)
            out.append(r.sign() * r.abs() ** (1.0 / p))
        return torch.stack(out, dim=2)

    @staticmethod
    def _chunks(f: Tensor):
        step = max(1, CHUNK_ELEMENTS // max(1, f.shape[1] * f.shape[2]))
        for start in range(0, f.shape[0], step):
            yield start, slice(start, start + step)

    @staticmethod
    def _deviation(g: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        def denom(b):
            d = (b + 1e-6).abs()
            return torch.where(d == 0, torch.full_like(d, 1e-12), d)

        dev = torch.relu(lo - g) / denom(lo) + torch.relu(g - hi) / denom(hi)
        return dev.sum(dim=(1, 2))

    @torch.no_grad()
    def fit_structured(self, reps: Mapping[str, Any], y) -> "Gram":
        logits = layer_column(self, reps, "logits")
        maps = self._maps(reps)
        n = _same_rows(self, [logits, *maps], ["logits", *self.layers])
        device = maps[0].device
        y = torch.as_tensor(y, device=device)
        known = _id_rows(self, y, n, device)
        y = y.long()
        k = int(logits.shape[1])
        if int(y[known].max()) >= k:
            raise InvalidInputError(f"Gram: labels go up to {int(y[known].max())}, but the logits have {k} classes")
        gen = torch.Generator().manual_seed(self.seed)
        train_idx, val_idx = [], []
        for c in torch.unique(y[known]).tolist():
            rows = torch.nonzero(y == c).flatten()
            perm = torch.randperm(rows.shape[0], generator=gen).to(device)
            n_val = int(self.holdout * rows.shape[0])
            val_idx.append(rows[perm[:n_val]])
            train_idx.append(rows[perm[n_val:]])
        train_idx, val_idx = torch.cat(train_idx), torch.cat(val_idx)
        mins, maxs, norms = [], [], []
        for f in maps:
            shape = (k, f.shape[1], len(self.powers))
            lo = torch.full(shape, float("inf"), dtype=torch.float64, device=device)
            hi = torch.full(shape, float("-inf"), dtype=torch.float64, device=device)
            ft, yt = f[train_idx], y[train_idx]
            for _, sl in self._chunks(ft):
                g = self.stats(ft[sl])
                idx = yt[sl][:, None, None].expand_as(g)
                lo.scatter_reduce_(0, idx, g, reduce="amin")
                hi.scatter_reduce_(0, idx, g, reduce="amax")
            seen = torch.isfinite(lo[:, 0, 0])
            lo[~seen] = lo[seen].amin(dim=0)
            hi[~seen] = hi[seen].amax(dim=0)
            devs = [self._deviation(self.stats(f[val_idx][sl]), lo[y[val_idx][sl]], hi[y[val_idx][sl]])
                    for _, sl in self._chunks(f[val_idx])]
            mean_dev = torch.cat(devs).mean() if devs else torch.zeros((), dtype=torch.float64, device=device)
            norms.append(mean_dev if float(mean_dev) > 0 else torch.ones((), dtype=torch.float64, device=device))
            mins.append(lo)
            maxs.append(hi)
        self.mins, self.maxs, self.layer_norm = mins, maxs, torch.stack(norms)
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_per_layer(self, reps: Mapping[str, Any]) -> Tensor:
        """Normalised per-layer deviations :math:`\\delta_l / E_l`, ``(N, L)`` float64."""
        self._require_fit()
        logits = layer_column(self, reps, "logits")
        maps = self._maps(reps)
        _same_rows(self, [logits, *maps], ["logits", *self.layers])
        if logits.shape[1] != self.mins[0].shape[0]:
            raise InvalidInputError(f"Gram: logits have {logits.shape[1]} classes, fitted for {self.mins[0].shape[0]}")
        pred = logits.argmax(dim=1)
        out = []
        for f, lo, hi, norm in zip(maps, self.mins, self.maxs, self.layer_norm):
            if f.shape[1] != lo.shape[1]:
                raise InvalidInputError(f"Gram: a layer has {f.shape[1]} channels, fitted for {lo.shape[1]}")
            lo, hi = lo.to(f.device), hi.to(f.device)
            p = pred.to(f.device)
            dev = torch.cat([self._deviation(self.stats(f[sl]), lo[p[sl]], hi[p[sl]]) for _, sl in self._chunks(f)])
            out.append(dev / norm.to(f.device))
        return torch.stack(out, dim=1)

    def predict_structured(self, reps: Mapping[str, Any]) -> Tensor:
        return self.predict_per_layer(reps).sum(dim=1)
