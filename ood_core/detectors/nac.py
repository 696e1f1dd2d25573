"""NAC-UE: neuron activation coverage (model in the loop: the neuron states need gradients)."""
from __future__ import annotations

import math

from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..api import InvalidInputError, StructuredDetector, check_input
from .multilayer import _layer_names, _per_layer, _same_rows, layer_column


def reduce_state(t: Tensor) -> Tensor:
    """Neurons of a layer: ``(N, D)`` as is, ``(N, C, H, W)`` averaged over space, else flattened."""
    if t.ndim == 2:
        return t
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    return t.reshape(t.shape[0], -1)


def geometric_bins(p: Tensor, m: int, eps: float = 1e-6) -> Tensor:
    """Bin index in ``0..m-1`` of ``p`` in (0, 1): ``m // 2`` bins geometrically spaced on ``[eps, 0.5]``
    (in ``p``) and the rest mirrored on ``[0.5, 1 - eps]`` (in ``1 - p``), dense near 0 and 1."""
    m_lo = m // 2
    m_hi = m - m_lo
    a, b = math.log10(eps), math.log10(0.5)
    lo = torch.logspace(a, b, m_lo + 1, device=p.device, dtype=p.dtype)
    hi = 1.0 - torch.logspace(b, a, m_hi + 1, device=p.device, dtype=p.dtype)
    edges = torch.cat([lo, hi[1:]])
    idx = torch.bucketize(p.clamp(eps, 1 - eps).contiguous(), edges, right=False) - 1
    return idx.clamp_(0, m - 1)


class NACUE(StructuredDetector):
    r"""NAC-UE: how well each neuron's state on a test input is covered by ID training states.

    Neuron state of layer :math:`l` (module output :math:`z`, reduced per neuron by spatial mean):

    .. math:: \hat z = \operatorname{sigmoid}\Big(\alpha\, \overline{z \odot
              \tfrac{\partial\, \mathrm{KL}(u \,\Vert\, p(x))}{\partial z}}\Big), \qquad
              \mathrm{KL}(u \Vert p) = -\log C - \tfrac1C \textstyle\sum_c \log \operatorname{softmax}(f(x))_c

    Fit: per neuron an :math:`M`-bin histogram (:func:`geometric_bins`) of :math:`\hat z` over ID training
    inputs, counts :math:`O`. Score (higher = more OOD):

    .. math:: s(x) = -\sum_l \frac{1}{n_l} \sum_{i=1}^{n_l} \min\big(O_{l,i}[\mathrm{bin}(\hat z_i)] / O^*, 1\big)

    The states need a backward pass, so the registry runs NAC-UE as a ``"model"`` detector:
    ``fit(loader)`` / ``predict(x)`` with ``model`` (the classifier, logits out, used in its current
    mode: call ``model.eval()``) and ``layers`` = dotted module paths. The representation part is
    available too: :meth:`states` gives ``{layer: (N, n_l)}`` reduced products
    :math:`\overline{z \odot \partial \mathrm{KL}/\partial z}`, and ``fit_structured`` / ``predict_structured``
    take such a dict. Labels < 0 are ignored when fitting; rows of one sample never affect another.

    Paper: Liu et al., "Neuron Activation Coverage: Rethinking Out-of-distribution Detection and
    Generalization", ICLR 2024 (arXiv:2306.02879). pytorch-ood 0.4.0 ``NACUE``: same states,
    geometric bins, coverage and layer sum; it takes ``log(softmax + 1e-12)`` where we use the exact
    ``log_softmax`` (differs only where a probability is below ~1e-10). All ID rows (label >= 0) are
    counted.

    :param model: the classifier (for ``states`` / ``fit`` / ``predict``)
    :param layers: module paths (``model.get_submodule``) whose outputs are the neurons
    :param m_bins: histogram bins :math:`M` (one value or one per layer)
    :param alpha: sigmoid steepness :math:`\alpha` (one value or one per layer)
    :param o_star: count :math:`O^*` for full coverage (one value or one per layer)
    """

    requires_fit: ClassVar[bool] = True
    representation: ClassVar[str] = "model"
    default_search_space: ClassVar[Dict[str, Any]] = {
        "alpha": {"grid": [10, 100, 1000]},
        "o_star": {"grid": [10, 50, 100]},
    }

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, layers: Union[str, Sequence[str]] = (),
                 m_bins: Union[int, Sequence[int]] = 50, alpha: Union[float, Sequence[float]] = 100.0,
                 o_star: Union[int, Sequence[int]] = 50):
        super().__init__(model)
        self.layers = _layer_names("NACUE", layers)
        n = len(self.layers)
        self.m_bins = _per_layer("NACUE", "m_bins", m_bins, n, int)
        self.alpha = _per_layer("NACUE", "alpha", alpha, n, float)
        self.o_star = _per_layer("NACUE", "o_star", o_star, n, float)
        if any(m < 2 for m in self.m_bins) or any(o <= 0 for o in self.o_star):
            raise ValueError("NACUE: m_bins must be >= 2 and o_star > 0")
        self.counts: List[Tensor] = []  #: per layer (n_l, M) int64 histograms

    # -- neuron states (needs the model) ------------------------------------------------------
    def states(self, x: Tensor) -> Dict[str, Tensor]:
        """``{layer: (N, n_l)}``: spatially averaged ``z * dKL/dz`` of each hooked module output ``z``."""
        model = self._require_model()
        if not isinstance(model, nn.Module):
            raise InvalidInputError("NACUE: states need an nn.Module model (forward hooks)")
        x = check_input(self, x, name="inputs")
        captured: Dict[str, Tensor] = {}
        handles = []
        for path in self.layers:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise InvalidInputError(f"NACUE: model has no module {path!r}") from None

            def hook(mod, args, out, path=path):
                if path not in captured:
                    captured[path] = out[0] if isinstance(out, (tuple, list)) else out
            handles.append(module.register_forward_hook(hook))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)  # so every layer output is in the graph
                logits = model(xg)
                loss = -torch.log_softmax(logits, dim=1).mean(dim=1).sum()
                missing = [p for p in self.layers if p not in captured]
                if missing:
                    raise InvalidInputError(f"NACUE: modules {missing} did not run in forward()")
                outs = [captured[p] for p in self.layers]
                grads = torch.autograd.grad(loss, outs)
        finally:
            for h in handles:
                h.remove()
        return {p: reduce_state((z * g).detach()) for p, z, g in zip(self.layers, outs, grads)}

    # -- representation part ---------------------------------------------------------------------
    def _cols(self, reps) -> List[Tensor]:
        cols = [layer_column(self, reps, k) for k in self.layers]
        for k, c in zip(self.layers, cols):
            if c.ndim != 2:
                raise InvalidInputError(f"NACUE: state column {k!r} must be (N, n_neurons), got {tuple(c.shape)}")
        _same_rows(self, cols, self.layers)
        return cols

    def _bins(self, cols: Sequence[Tensor]) -> List[Tensor]:
        return [geometric_bins(torch.sigmoid(a * c), m) for c, a, m in zip(cols, self.alpha, self.m_bins)]

    def _accumulate(self, cols: Sequence[Tensor]) -> None:
        if not self.counts:
            self.counts = [torch.zeros(c.shape[1], m, dtype=torch.long, device=c.device)
                           for c, m in zip(cols, self.m_bins)]
        for l, (idx, counts) in enumerate(zip(self._bins(cols), self.counts)):
            if idx.shape[1] != counts.shape[0]:
                raise InvalidInputError(f"NACUE: layer {self.layers[l]!r} has {idx.shape[1]} neurons, "
                                        f"fitted for {counts.shape[0]}")
            flat = (idx + torch.arange(idx.shape[1], device=idx.device) * counts.shape[1]).flatten()
            counts += torch.bincount(flat.to(counts.device), minlength=counts.numel()).reshape(counts.shape)

    @torch.no_grad()
    def fit_structured(self, reps: Mapping[str, Any], y=None) -> "NACUE":
        cols = self._cols(reps)
        if y is not None:
            y = torch.as_tensor(y, device=cols[0].device)
            if y.shape != (cols[0].shape[0],):
                raise InvalidInputError(f"NACUE: labels must have shape ({cols[0].shape[0]},), got {tuple(y.shape)}")
            cols = [c[y >= 0] for c in cols]
        if cols[0].shape[0] == 0:
            raise InvalidInputError("NACUE: no in-distribution samples (labels >= 0) to fit on")
        self.counts = []
        self._accumulate(cols)
        self._mark_fitted()
        return self

    @torch.no_grad()
    def predict_structured(self, reps: Mapping[str, Any]) -> Tensor:
        self._require_fit()
        cols = self._cols(reps)
        total = torch.zeros(cols[0].shape[0], dtype=torch.float32, device=cols[0].device)
        for l, (idx, counts) in enumerate(zip(self._bins(cols), self.counts)):
            if idx.shape[1] != counts.shape[0]:
                raise InvalidInputError(f"NACUE: layer {self.layers[l]!r} has {idx.shape[1]} neurons, "
                                        f"fitted for {counts.shape[0]}")
            counts = counts.to(idx.device)
            o = counts[torch.arange(idx.shape[1], device=idx.device)[None, :], idx].float()
            total += (o / self.o_star[l]).clamp(max=1.0).mean(dim=1)
        return -total

    # -- model in the loop -----------------------------------------------------------------------
    def fit(self, data_loader) -> "NACUE":
        """Accumulate the histograms over a loader of ``(x, y)`` (or ``x``) batches, batch by batch."""
        self._require_model()
        self.counts = []
        seen = 0
        for batch in data_loader:
            if isinstance(batch, (tuple, list)):
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                x, y = batch, None
            states = self.states(x)
            cols = [states[p] for p in self.layers]
            if y is not None:
                keep = torch.as_tensor(y, device=cols[0].device) >= 0
                cols = [c[keep] for c in cols]
            if cols[0].shape[0]:
                self._accumulate(cols)
                seen += cols[0].shape[0]
        if not seen:
            raise InvalidInputError("NACUE: no in-distribution samples (labels >= 0) to fit on")
        self._mark_fitted()
        return self

    def predict(self, x: Tensor) -> Tensor:
        self._require_model()
        self._require_fit()
        return self.predict_structured(self.states(x))

    def to(self, device) -> "NACUE":
        self.counts = [c.to(device) for c in self.counts]
        if isinstance(self.model, nn.Module):
            self.model.to(device)
        return self
