"""NAC-UE: neuron activation coverage (model in the loop: the neuron states need a backward pass)."""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..api import InvalidInputError, StructuredDetector
from ..constraints import Callable as CallableC
from ..constraints import Instance, Interval, L, ListOf, Param
from .model_in_loop import ModelInputs

PerLayer = Union[float, Sequence[float]]


def reduce_state(t: Tensor) -> Tensor:
    """Neurons of a layer: ``(N, D)`` as is, ``(N, C, H, W)`` averaged over space, else flattened."""
    if t.ndim == 2:
        return t
    return t.mean(dim=(2, 3)) if t.ndim == 4 else t.flatten(1)


def geometric_bins(p: Tensor, m: int, eps: float = 1e-6) -> Tensor:
    """Bin index in ``0..m-1`` of ``p`` in (0, 1): ``m // 2`` bins geometrically spaced on ``[eps, 0.5]``
    and the rest mirrored on ``[0.5, 1 - eps]``, dense near 0 and 1."""
    lo = torch.logspace(math.log10(eps), math.log10(0.5), m // 2 + 1, device=p.device, dtype=p.dtype)
    hi = 1.0 - torch.logspace(math.log10(0.5), math.log10(eps), m - m // 2 + 1, device=p.device, dtype=p.dtype)
    edges = torch.cat([lo, hi[1:]])
    return (torch.bucketize(p.clamp(eps, 1 - eps).contiguous(), edges) - 1).clamp_(0, m - 1)


def _each(value, n: int) -> list:
    """A per-layer value as one value per layer."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class NACUE(ModelInputs, StructuredDetector):
    r"""NAC-UE: how well each neuron's state on a test input is covered by ID training states.

    State of neuron :math:`i` of layer :math:`l` (module output :math:`z`, reduced per neuron by
    ``feature_reduce``, default the spatial mean), with :math:`u` the uniform distribution over classes:

    .. math:: \hat z_i = \operatorname{sigmoid}\Big(\alpha_l\, \overline{z \odot
              \tfrac{\partial\, \mathrm{KL}(u \,\Vert\, p(x))}{\partial z}}_{\,i}\Big), \qquad
              \mathrm{KL}(u \Vert p) = -\log C - \tfrac1C \textstyle\sum_c \log \operatorname{softmax}(f(x))_c

    Fit: per neuron an :math:`M_l`-bin histogram (:func:`geometric_bins`) of :math:`\hat z_i` over ID
    training inputs, counts :math:`O_{l,i}`. Score (higher = more OOD):

    .. math:: s(x) = -\sum_l \frac{1}{n_l} \sum_{i=1}^{n_l} \min\big(O_{l,i}[\mathrm{bin}(\hat z_i)] / O^*_l, 1\big)

    ``fit(loader)`` / ``predict(x)`` run ``model`` (the classifier, logits out, in its current mode: call
    ``model.eval()``) with hooks on ``layers``. The representation part is available too: :meth:`states`
    gives ``{layer: (N, n_l)}`` reduced products :math:`\overline{z \odot \partial \mathrm{KL}/\partial z}`,
    and ``fit_structured`` / ``predict_structured`` take such a dict. Labels < 0 are left out of the fit.

    Paper: Liu et al., "Neuron Activation Coverage: Rethinking Out-of-distribution Detection and
    Generalization", ICLR 2024 (arXiv:2306.02879); code https://github.com/BierOne/ood_coverage.

    pytorch-ood 0.4.0 ``NACUE(model, layers, m_bins=50, alpha=100.0, o_star=50, feature_reduce=None,
    device=None)``: same names and positional order up to ``feature_reduce``; ``layers`` may be modules
    (theirs) or dotted module paths (``model.get_submodule``; the only form a sweep can write). Same states,
    bins, coverage and layer sum. Differences: no ``device`` argument (the detector runs where the model
    and its inputs are; ``to(device)`` moves both); exact ``log_softmax`` where they take
    ``log(softmax + 1e-12)`` (differs only for probabilities below ~1e-10); labels < 0 are left out
    (theirs counts every row); a module run twice in one forward contributes its first output.
    """

    representation: ClassVar[str] = "model"
    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "layers": Param(ListOf(Instance((str, nn.Module)), scalar=True), doc="module paths (or modules)"),
        "m_bins": Param(ListOf(Interval(int, 2, None), length=L, scalar=True), doc="histogram bins M per layer"),
        "alpha": Param(ListOf(Interval(float, 0, math.inf, closed="neither"), length=L, scalar=True),
                       doc="sigmoid steepness per layer"),
        "o_star": Param(ListOf(Interval(float, 0, math.inf, closed="neither"), length=L, scalar=True),
                        structural=False, doc="count O* of full coverage per layer"),
        "feature_reduce": Param(CallableC(), None, doc="layer output -> (N, n_l); None: spatial mean"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"alpha": {"grid": [10, 100, 1000]},
                                                      "o_star": {"grid": [10, 50, 100]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None,
                 layers: Union[str, nn.Module, Sequence[Union[str, nn.Module]]] = (), m_bins: PerLayer = 50,
                 alpha: PerLayer = 100.0, o_star: PerLayer = 50,
                 feature_reduce: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)
        self.layers = layers
        self.m_bins = m_bins
        self.alpha = alpha
        self.o_star = o_star
        self.feature_reduce = feature_reduce
        self.counts: List[Tensor] = []  #: per layer (n_l, M_l) int64 histograms

    # -- neuron states (needs the model) ---------------------------------------------------------
    def _paths(self) -> List[str]:
        layers = self.layers if isinstance(self.layers, (list, tuple)) else [self.layers]
        if all(isinstance(l, str) for l in layers):
            return list(layers)
        names = {id(m): n for n, m in self._require_model().named_modules()}
        missing = [l for l in layers if not isinstance(l, str) and id(l) not in names]
        if missing:
            raise InvalidInputError(f"NACUE: layers {missing} are not modules of the model")
        return [l if isinstance(l, str) else names[id(l)] for l in layers]

    def states(self, x: Tensor) -> Dict[str, Tensor]:
        r"""``{layer: (N, n_l)}``: the reduced :math:`z \odot \partial \mathrm{KL}/\partial z` of each layer."""
        model = self._require_model()
        if not isinstance(model, nn.Module):
            raise InvalidInputError("NACUE: states need an nn.Module model (forward hooks)")
        x = self._model_input(x)
        paths, captured, handles = self._paths(), {}, []
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise InvalidInputError(f"NACUE: model has no module {path!r}") from None
            handles.append(module.register_forward_hook(
                lambda mod, args, out, path=path: captured.setdefault(path, out[0] if isinstance(out, (tuple, list))
                                                                      else out)))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                logits = model(x.detach().clone().requires_grad_(True))  # every layer output in the graph
                loss = -torch.log_softmax(logits, dim=1).mean(dim=1).sum()  # KL(u || p) + log C, summed over rows
                missing = [p for p in paths if p not in captured]
                if missing:
                    raise InvalidInputError(f"NACUE: modules {missing} did not run in forward()")
                grads = torch.autograd.grad(loss, [captured[p] for p in paths])
        finally:
            for h in handles:
                h.remove()
        reduce = self.feature_reduce or reduce_state
        return {p: reduce((captured[p] * g).detach()) for p, g in zip(paths, grads)}

    # -- the formula on states ------------------------------------------------------------------
    def _columns(self, reps: Mapping[str, Any]) -> List[Tensor]:
        if not isinstance(reps, Mapping):
            raise InvalidInputError(f"NACUE: states must be a dict layer -> (N, n_l), got {type(reps).__name__}")
        paths = self._paths()
        absent = [p for p in paths if p not in reps]
        if absent:
            raise InvalidInputError(f"NACUE: needs the state columns {absent}; available: {sorted(map(str, reps))}")
        cols = [self._input(reps[p], ndim=2, name=f"state column {p!r}") for p in paths]
        if len({c.shape[0] for c in cols}) != 1:
            raise InvalidInputError(f"NACUE: state columns {paths} have different row counts")
        return cols

    def _bins(self, cols: Sequence[Tensor]) -> List[Tensor]:
        n = len(cols)
        return [geometric_bins(torch.sigmoid(a * c), int(m)) for c, a, m in
                zip(cols, _each(self.alpha, n), _each(self.m_bins, n))]

    def _accumulate(self, cols: Sequence[Tensor]) -> None:
        if not self.counts:
            self.counts = [torch.zeros(c.shape[1], int(m), dtype=torch.long, device=c.device)
                           for c, m in zip(cols, _each(self.m_bins, len(cols)))]
        for idx, counts in zip(self._bins(self._fitted_width(cols)), self.counts):
            flat = idx + torch.arange(idx.shape[1], device=idx.device) * counts.shape[1]  # (neuron, bin) -> one index
            counts += torch.bincount(flat.flatten(), minlength=counts.numel()).reshape(counts.shape).to(counts.device)

    def _fitted_width(self, cols: Sequence[Tensor]) -> Sequence[Tensor]:
        for path, c, counts in zip(self._paths(), cols, self.counts):
            if c.shape[1] != counts.shape[0]:
                raise InvalidInputError(f"NACUE: layer {path!r} has {c.shape[1]} neurons, fitted for {counts.shape[0]}")
        return cols

    def _start_fit(self) -> None:
        self.check_data(L=len(self._paths()))
        self.counts = []

    @torch.no_grad()
    def fit_structured(self, reps: Mapping[str, Any], y=None) -> "NACUE":
        self._start_fit()
        cols = self._columns(reps)
        if y is not None:
            y = torch.as_tensor(y, device=cols[0].device)
            if y.shape != (cols[0].shape[0],):
                raise InvalidInputError(f"NACUE: labels must have shape ({cols[0].shape[0]},), got {tuple(y.shape)}")
            cols = [c[y >= 0] for c in cols]
        if cols[0].shape[0] == 0:
            raise InvalidInputError("NACUE: no in-distribution samples (labels >= 0) to fit on")
        self._accumulate(cols)
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_structured(self, reps: Mapping[str, Any]) -> Tensor:
        self._require_fit()
        cols = self._fitted_width(self._columns(reps))
        total = torch.zeros(cols[0].shape[0], device=cols[0].device)
        for idx, counts, o_star in zip(self._bins(cols), self.counts, _each(self.o_star, len(cols))):
            o = counts.to(idx.device).gather(1, idx.T).T.float()  # O_{l,i}[bin(z_i)], (N, n_l)
            total += (o / o_star).clamp(max=1.0).mean(dim=1)
        return -total

    # -- model in the loop ------------------------------------------------------------------------
    def fit(self, data_loader) -> "NACUE":
        """Accumulate the histograms over a loader of ``(x, y)`` (or ``x``) batches, batch by batch."""
        self._require_model()
        self._start_fit()
        paths = self._paths()
        for x, y in self._batches(data_loader):
            states = self.states(x)
            cols = [states[p] if y is None else states[p][y >= 0] for p in paths]
            if cols[0].shape[0]:
                self._accumulate(cols)
        if not self.counts:
            raise InvalidInputError("NACUE: no in-distribution samples (labels >= 0) to fit on")
        self._mark_fitted()
        return self

    def predict(self, x: Tensor) -> Tensor:
        self._require_model()
        self._require_fit()
        return self.predict_structured(self.states(x))
