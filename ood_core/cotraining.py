r"""LA-OOD co-training: fine-tune a trained backbone together with its frozen per-layer one-class SVMs.

After the ordinary training (the objective ``la_ood_cotrain``, :mod:`ood_core.objectives`), the network is
fine-tuned for a few epochs with

.. math:: \mathcal L = \mathrm{CE}(z, y) - \frac{\lambda}{2|S|} \sum_{l \in S} \sum_{i} \sum_{j}
          \alpha_{lj} \exp\!\left(-\gamma_l \lVert \tilde f_l(x_i) - s_{lj} \rVert^2\right)

over the batch ``i`` (a sum, not a mean) and the named layers ``S``: :math:`\tilde f_l(x) = (f_l(x) - m_l) /
\sigma_l` is the spatial mean :math:`f_l` of layer ``l``'s output, standardised per dimension, and
:math:`s_{lj}, \alpha_{lj}, \gamma_l` are the support vectors, dual coefficients and RBF width of layer ``l``'s
one-class SVM. The second term is the OCSVM decision function without its offset, summed over the batch:
raising it moves the ID features into the region the detector accepts.

What the official code does (``co_train.py``, ``train_ood_detectors.py``), and what we do:

* the OCSVMs are fitted once, on the trained network's features of the ID training set (eval mode, no
  augmentation), with :math:`\nu` = 0.001, and kept frozen; we fit them with :class:`~.detectors.la_ood.LAOOD`
  (its standardisation and its gamma selection by self-adaptive shifting; every training row up to
  ``max_fit_samples``, the official code fitting on all 50000 CIFAR rows). The official selection differs in
  its details: a fixed grid 0.001 ... 0.1, pseudo outliers from a 30 % hold-out, and held-out ID rows in place
  of pseudo targets (see :class:`~.detectors.la_ood.LAOOD`);
* the standardisation statistics :math:`m_l, \sigma_l` (population std, 1 where it is 0) are recomputed at the
  start of every co-training epoch over the training set, in eval mode, on the training augmentation's
  batches (the official code's pass over its augmenting training loader);
* fine-tuning: ``cotrain_epochs`` = 5 epochs of SGD, ``lr`` = 0.001 (constant), ``momentum`` = 0.9,
  ``weight_decay`` = 1e-4, :math:`\lambda` = 0.001, a fresh optimizer, the network in train mode, the batches
  augmented as in the main training; CE takes the backbone's label smoothing (none by default, as there);
* it starts from the main loop's best weights and keeps the last co-training epoch's (the released
  ``co_train.py`` builds a fresh network and never loads the trained one: its ``--resume`` and ``--pretrained``
  flags are unused; it saves a snapshot after epochs 1, 2, 3 and 5);
* every named layer enters every step (the official code does so for VGG16's 13 layers and draws 10 random
  layers per step for ResNet34 / DenseNet100; we keep the user's list, deterministically).

:math:`\sum_j \alpha_{lj} = \nu n_{fit}` (libsvm's one-class dual), so the term's size grows with the number of
fitting rows and with the batch size (the official run: :math:`\nu n_{fit}` = 50, batch 128).

Paper: H. Wang, C. Zhao, X. Zhao & F. Chen, "Layer Adaptive Deep Neural Networks for Out-of-distribution
Detection", PAKDD 2022 (arXiv:2203.00192); code: github.com/haoliangwang86/LA-OOD (``co_train.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ood_core.detectors.la_ood import LAOOD
from ood_core.detectors.multilayer import _pooled
from ood_core.objectives import Objective, _capture

#: ``(mean, std)`` of one layer's pooled features, float64
Moments = Tuple[Tensor, Tensor]


@dataclass(frozen=True)
class LayerSVM:
    """The frozen kernel expansion of one layer's OCSVM: support vectors ``(m, D)``, dual coefficients ``(m,)``
    (float64) and the RBF width."""

    support_vectors: Tensor
    dual_coef: Tensor
    gamma: float

    def to_dict(self) -> Dict[str, Any]:
        return {"support_vectors": self.support_vectors, "dual_coef": self.dual_coef, "gamma": float(self.gamma)}


# ----------------------------------------------------------------------------- formulas
def standardised(activation: Tensor, moments: Moments) -> Tensor:
    r""":math:`\tilde f = (f - m) / \sigma` with :math:`f` the spatial mean of ``activation`` (``(N, C, ...)``
    -> ``(N, C)``; ``(N, D)`` as is), in ``activation``'s dtype (float32 at least)."""
    f = _pooled(activation if activation.dtype == torch.float64 else activation.float())
    mean, std = moments
    return (f - mean.to(f.device, f.dtype)) / std.to(f.device, f.dtype)


def ocsvm_kernel_sum(f: Tensor, svm: LayerSVM) -> Tensor:
    r""":math:`\sum_i \sum_j \alpha_j \exp(-\gamma \lVert f_i - s_j \rVert^2)` over the rows ``f_i`` of ``f``
    (differentiable in ``f``; squared distances as :math:`\lVert f\rVert^2 + \lVert s\rVert^2 - 2 f^\top s`,
    an ``(N, m)`` block)."""
    sv = svm.support_vectors.to(f.device, f.dtype)
    alpha = svm.dual_coef.to(f.device, f.dtype)
    d2 = ((f * f).sum(dim=1, keepdim=True) + (sv * sv).sum(dim=1)[None, :] - 2.0 * f @ sv.T).clamp(min=0.0)
    return (torch.exp(-svm.gamma * d2) @ alpha).sum()


def detector_term(activations: Sequence[Tensor], moments: Sequence[Moments], svms: Sequence[LayerSVM]) -> Tensor:
    r""":math:`\frac{1}{2|S|} \sum_l \sum_i \sum_j \alpha_{lj} \exp(-\gamma_l \lVert \tilde f_l(x_i) - s_{lj}
    \rVert^2)` over the layers' activations (the official code's ``detector_loss / (2 len(layers))``)."""
    total = sum(ocsvm_kernel_sum(standardised(a, m), s) for a, m, s in zip(activations, moments, svms))
    return total / (2 * len(svms))


def cotrain_loss(logits: Tensor, y: Tensor, activations: Sequence[Tensor], moments: Sequence[Moments],
                 svms: Sequence[LayerSVM], lam: float, label_smoothing: float = 0.0) -> Tuple[Tensor, Tensor]:
    r"""``(loss, term)``: :math:`\mathrm{CE}(z, y) - \lambda \cdot` :func:`detector_term` and the term."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    term = detector_term(activations, moments, svms)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing) - lam * term, term


# ----------------------------------------------------------------------------- passes over the data
@torch.no_grad()
def pooled_features(model: nn.Module, batches: Iterable[Tensor], layers: Sequence[str],
                    amp: bool = False) -> Dict[str, Tensor]:
    """Spatial means of the named layers' outputs over ``batches`` (eval mode), ``{layer: (N, D)}`` on the CPU
    (float32, float64 for a float64 model); the model's train / eval mode is restored after."""
    was_training = model.training
    model.eval()
    out: Dict[str, List[Tensor]] = {name: [] for name in layers}
    try:
        with _capture(model, layers) as acts:
            for x in batches:
                with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=amp):
                    model(x)
                for name in layers:
                    a = acts[name]
                    out[name].append(_pooled(a if a.dtype == torch.float64 else a.float()).cpu())
    finally:
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in out.items()}


@torch.no_grad()
def feature_moments(model: nn.Module, batches: Iterable[Tensor], layers: Sequence[str],
                    amp: bool = False) -> List[Moments]:
    """Per-layer mean and population standard deviation (1 where it is 0) of the pooled features over
    ``batches`` (eval mode), streamed: batch means and sums of squared deviations merged in float64
    (Chan, Golub & LeVeque 1979), so memory does not grow with the data."""
    was_training = model.training
    model.eval()
    n, mean, m2 = 0, [None] * len(layers), [None] * len(layers)
    try:
        with _capture(model, layers) as acts:
            for x in batches:
                with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=amp):
                    model(x)
                for l, name in enumerate(layers):
                    f = _pooled(acts[name].double())
                    b, bm = f.shape[0], f.mean(dim=0)
                    bm2 = ((f - bm) ** 2).sum(dim=0)
                    if mean[l] is None:
                        mean[l], m2[l] = bm, bm2
                    else:
                        delta = bm - mean[l]
                        mean[l] = mean[l] + delta * (b / (n + b))
                        m2[l] = m2[l] + bm2 + delta * delta * (n * b / (n + b))
                n += int(x.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("feature_moments: no batches")
    out = []
    for mu, s2 in zip(mean, m2):
        std = (s2 / n).sqrt()
        out.append((mu, torch.where(std > 0, std, torch.ones_like(std))))
    return out


def fit_layer_svms(features: Mapping[str, Tensor], nu: float, max_fit_samples: int, seed: int) -> List[LayerSVM]:
    """One RBF OCSVM per layer on pooled ID training features ``{layer: (N, D)}``, fitted as
    :class:`~.detectors.la_ood.LAOOD` fits them (standardised on all ``N`` rows; up to ``max_fit_samples`` rows,
    a seeded subsample; gamma selected by self-adaptive shifting), with no held-out rows (the official code fits
    its detectors on every training row)."""
    det = LAOOD(list(features), nu=nu, max_fit_samples=max_fit_samples, holdout=0.0, seed=seed)
    det.fit_structured(dict(features))
    return [LayerSVM(sv.cpu(), dual.cpu(), float(g))
            for sv, dual, g in zip(det.support_vectors_, det.dual_coef_, det.gammas_)]


# ----------------------------------------------------------------------------- the phase's state
class CoTrainer:
    """The state of the co-training phase of ``objective`` (``la_ood_cotrain``) on ``model``: the frozen
    OCSVMs, the current epoch's standardisation, its own SGD optimizer (``fused`` on CUDA) and AMP scaler.
    :func:`ood_core.training.train_classifier` drives it: :meth:`fit` once, then per epoch :meth:`standardise`
    and :meth:`step` per batch; :meth:`state_dict` goes into the resume checkpoint."""

    def __init__(self, model: nn.Module, objective: Objective, *, amp: bool = False, fused: bool = False):
        if objective.name != "la_ood_cotrain":
            raise ValueError(f"CoTrainer: needs the objective 'la_ood_cotrain', got {objective.name!r}")
        p = objective.params
        self.model, self.layers, self.amp = model, list(objective.layers), bool(amp)
        self.lam, self.nu, self.max_fit_samples = float(p["lambda"]), float(p["nu"]), int(p["max_fit_samples"])
        self.optimizer = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"],
                                         weight_decay=p["weight_decay"], **({"fused": True} if fused else {}))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.svms: Optional[List[LayerSVM]] = None
        self.moments: Optional[List[Moments]] = None
        self._cached: Optional[Tuple[Any, List[LayerSVM]]] = None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def fit(self, batches: Iterable[Tensor], seed: int) -> None:
        """Fit the per-layer OCSVMs on the model's features of ``batches`` (the ID training set, unaugmented)."""
        feats = pooled_features(self.model, batches, self.layers, self.amp)
        self.svms, self._cached = fit_layer_svms(feats, self.nu, self.max_fit_samples, seed), None

    def standardise(self, batches: Iterable[Tensor]) -> None:
        """This epoch's :math:`m_l, \\sigma_l` from the model's features of ``batches`` (the augmented ID
        training set)."""
        self.moments = feature_moments(self.model, batches, self.layers, self.amp)

    def step(self, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
        """One SGD step on the batch; returns ``(loss, logits, term)`` (detached)."""
        if self.svms is None or self.moments is None:
            raise RuntimeError("CoTrainer.step: call fit() and standardise() first")
        with _capture(self.model, self.layers) as acts:
            with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.model(x)
        loss, term = cotrain_loss(logits, y, [acts[n] for n in self.layers], self.moments,
                                  self._svms_on(x.device, logits.dtype), self.lam, label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach(), term.detach()

    def _svms_on(self, device: torch.device, dtype: torch.dtype) -> List[LayerSVM]:
        """The OCSVMs on ``device`` in the loss's dtype (float64 for a float64 model, else float32), copied once."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if self._cached is None or self._cached[0] != (device, dtype):
            self._cached = ((device, dtype), [LayerSVM(s.support_vectors.to(device, dtype),
                                                       s.dual_coef.to(device, dtype), s.gamma) for s in self.svms])
        return self._cached[1]

    def state_dict(self) -> Dict[str, Any]:
        """The OCSVMs, the optimizer and the scaler (tensors and plain values: ``torch.load(weights_only=True)``
        reads it)."""
        return {"svms": [s.to_dict() for s in self.svms or []], "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.svms = [LayerSVM(s["support_vectors"], s["dual_coef"], float(s["gamma"])) for s in state["svms"]]
        self._cached = None
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


__all__ = ["LayerSVM", "standardised", "ocsvm_kernel_sum", "detector_term", "cotrain_loss", "pooled_features",
           "feature_moments", "fit_layer_svms", "CoTrainer"]
