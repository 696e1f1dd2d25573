"""Detectors that need the network itself (registry representation ``"model"``): ODIN, GradNorm,
GradNormKL, MCD, and Mahalanobis with input preprocessing.

They score raw inputs with ``predict(x)`` (``(N, ...)``, moved to the model's device -> ``(N,)``), run as
model-in-the-loop GPU tasks, and use ``model`` (the classifier, logits out) in the mode it is in, so
call ``model.eval()`` first (MCD switches dropout on by itself). Per-sample results do not depend on
the rest of the batch in eval mode (MCD: given its random masks).
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import Detector, DetectorError, InvalidInputError, check_input
from .logits import MaxSoftmax
from .mahalanobis import Mahalanobis


def _inputs(detector, x) -> Tensor:
    """Validated input batch, moved to the device of the detector's model (if it has parameters)."""
    x = check_input(detector, x, name="inputs")
    if x.ndim < 2:
        raise InvalidInputError(f"{type(detector).__name__}: inputs must be a batch (N, ...), got {tuple(x.shape)}")
    model = getattr(detector, "model", None)
    owner = getattr(model, "__self__", model)  # a bound method such as model.features
    if isinstance(owner, nn.Module):
        param = next(owner.parameters(), None)
        if param is not None and param.device != x.device:
            x = x.to(param.device)
    return x


def _std_view(norm_std, like: Tensor) -> Optional[Tensor]:
    if norm_std is None:
        return None
    std = torch.as_tensor(norm_std, dtype=like.dtype, device=like.device).reshape(1, -1, *([1] * (like.ndim - 2)))
    return std


def _check_std(name: str, norm_std) -> Optional[List[float]]:
    if norm_std is None:
        return None
    std = [float(s) for s in (norm_std if isinstance(norm_std, (list, tuple)) else [norm_std])]
    if not std or any(not s > 0 for s in std):
        raise ValueError(f"{name}: norm_std must be positive numbers, got {norm_std!r}")
    return std


class ODIN(Detector):
    r"""ODIN: temperature scaling and input perturbation, then negative max softmax.

    .. math::
        \tilde x = x - \varepsilon\, \operatorname{sign}\big(\nabla_x\, [-\log S_{\hat y}(x; T)]\big) / \sigma,
        \qquad s(x) = -\max_c S_c(\tilde x; T), \quad S(x; T) = \operatorname{softmax}(f(x) / T)

    with :math:`\hat y = \arg\max_c f_c(x)` and :math:`\sigma` the per-channel ``norm_std`` of the input
    normalisation (so :math:`\varepsilon` is a step in unnormalised pixel units, as in the paper's code;
    pass the data set's std; ``None`` = 1). ``eps = 0`` is plain temperature-scaled MSP.

    Paper: Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in
    Neural Networks", ICLR 2018 (arXiv:1706.02690). pytorch-ood 0.4.0 ``ODIN``: same (``temperature``
    there is ``t`` here).

    :param model: the classifier (logits out)
    :param t: temperature :math:`T > 0`
    :param eps: perturbation size :math:`\varepsilon \ge 0`
    :param norm_std: per-channel std of the input normalisation
    """

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {"t": {"grid": [1, 10, 100, 1000]},
                                                      "eps": {"grid": [0.0014, 0.0028]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, t: float = 1000.0, eps: float = 0.0014,
                 norm_std: Optional[Sequence[float]] = None):
        super().__init__(model)
        self.t = float(t)
        if not (self.t > 0 and self.t != float("inf")):
            raise ValueError(f"ODIN: t must be a positive finite number, got {t!r}")
        self.eps = float(eps)
        if not self.eps >= 0:
            raise ValueError(f"ODIN: eps must be >= 0, got {eps!r}")
        self.norm_std = _check_std("ODIN", norm_std)

    def preprocess(self, x: Tensor) -> Tensor:
        """The perturbed inputs :math:`\\tilde x` (gradients per sample through a summed loss)."""
        model = self._require_model()
        x = _inputs(self, x)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            logits = model(xg) / self.t
            loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xg)
        step = grad.sign()
        std = _std_view(self.norm_std, step)
        if std is not None:
            step = step / std
        return (xg - self.eps * step).detach()

    def predict(self, x: Tensor) -> Tensor:
        model = self._require_model()
        x = self.preprocess(x) if self.eps > 0 else _inputs(self, x)
        with torch.no_grad():
            return MaxSoftmax.score(model(x), self.t)


def _uniform_ce(logits: Tensor, t: float = 1.0) -> Tensor:
    """Sum over rows of the cross-entropy to the uniform distribution, :math:`-\\frac1C\\sum_c \\log S_c(f/T)`
    (= KL(u || S) - log C)."""
    return -torch.log_softmax(logits / t, dim=1).mean(dim=1).sum()


def _uniform_bce(logits: Tensor) -> Tensor:
    """Sum over rows of ``BCE(softmax(f), 1/C)`` summed over classes (pytorch-ood's GradNormKL loss)."""
    p = torch.softmax(logits, dim=1)
    return F.binary_cross_entropy(p, torch.full_like(p, 1.0 / p.shape[1]), reduction="sum")


class _GradientNorm(Detector):
    """Per-sample L1 norm of the gradient of ``self.loss`` w.r.t. selected parameters; score = -norm."""

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {}

    def __init__(self, model=None, parameters: str = "head.weight", micro_batch_size: int = 64):
        super().__init__(model)
        pats = [p.strip() for p in str(parameters).split(",") if p.strip()]
        if not pats:
            raise ValueError(f"{type(self).__name__}: parameters must name at least one parameter pattern")
        if int(micro_batch_size) < 1:
            raise ValueError(f"{type(self).__name__}: micro_batch_size must be >= 1")
        self.parameters = ",".join(pats)
        self.micro_batch_size = int(micro_batch_size)

    def loss(self, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def selected(self, model: nn.Module) -> List[str]:
        pats = self.parameters.split(",")
        names = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        if not names:
            known = [n for n, _ in model.named_parameters()][:20]
            raise DetectorError(f"{type(self).__name__}: parameters {self.parameters!r} match none of {known}")
        return names

    def _closed_form(self, model: nn.Module, x: Tensor, names: List[str]) -> Tensor:
        """Linear head: the per-sample weight gradient is ``outer(delta, z)`` with ``delta = dL/dlogits``,
        so its L1 norm is ``|delta|_1 |z|_1`` (plus ``|delta|_1`` for the bias)."""
        with torch.no_grad():
            z = model.features(x)
        with torch.inference_mode(False), torch.enable_grad():
            logits = model.head(z.clone()).detach().requires_grad_(True)
            (delta,) = torch.autograd.grad(self.loss(logits), logits)
        d1 = delta.abs().sum(dim=1)
        norm = torch.zeros_like(d1)
        if "head.weight" in names:
            norm = norm + d1 * z.reshape(z.shape[0], -1).abs().sum(dim=1)
        if "head.bias" in names:
            norm = norm + d1
        return norm

    def _per_sample(self, model: nn.Module, x: Tensor, names: List[str]) -> Tensor:
        from torch.func import functional_call, grad, vmap

        params = dict(model.named_parameters())
        chosen = {n: params[n].detach() for n in names}
        fixed = {n: p.detach() for n, p in params.items() if n not in chosen}
        fixed.update(dict(model.named_buffers()))

        def one(sel, xi):
            return self.loss(functional_call(model, {**fixed, **sel}, (xi.unsqueeze(0),)))

        per_sample = vmap(grad(one), in_dims=(None, 0))
        out = []
        with torch.inference_mode(False), torch.enable_grad():
            for start in range(0, x.shape[0], self.micro_batch_size):
                grads = per_sample(chosen, x[start:start + self.micro_batch_size].clone())
                out.append(sum(g.reshape(g.shape[0], -1).abs().sum(dim=1) for g in grads.values()))
        return torch.cat(out).detach()

    def gradient_norm(self, x: Tensor) -> Tensor:
        """:math:`\\lVert \\partial L / \\partial w \\rVert_1` per sample, ``(N,)``."""
        model = self._require_model()
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"{type(self).__name__}: needs an nn.Module model")
        x = _inputs(self, x)
        names = self.selected(model)
        head = getattr(model, "head", None)
        if (set(names) <= {"head.weight", "head.bias"} and isinstance(head, nn.Linear)
                and callable(getattr(model, "features", None))):
            return self._closed_form(model, x, names)
        return self._per_sample(model, x, names)

    def predict(self, x: Tensor) -> Tensor:
        return -self.gradient_norm(x)


class GradNorm(_GradientNorm):
    r"""GradNorm: L1 norm of the gradient of the KL divergence to the uniform distribution.

    .. math:: s(x) = -\Big\lVert \frac{\partial}{\partial w}\,
              \Big(-\frac1C \sum_{c=1}^C \log \operatorname{softmax}(f(x)/T)_c\Big) \Big\rVert_1

    (the loss is :math:`\mathrm{KL}(u \Vert \operatorname{softmax}) - \log C`). :math:`w` = the parameters
    whose names match ``parameters`` (comma-separated ``fnmatch`` patterns; default ``head.weight``,
    the last layer's weights as in the paper). For ``head.weight`` / ``head.bias`` of an ``ood_core``
    model (``features`` + linear ``head``) the per-sample gradient is :math:`(p - u)/T \otimes z`, so the
    norm is :math:`\lVert p - u \rVert_1 \lVert z \rVert_1 / T` (+ :math:`\lVert p - u\rVert_1/T` for the
    bias), computed in closed form; other selections use ``torch.func`` per-sample gradients, in
    chunks of ``micro_batch_size``. Higher norm = more ID, hence the minus sign.

    Paper: Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in
    the Wild", NeurIPS 2021 (arXiv:2110.00218); the official code sums over classes instead of
    averaging (all scores times :math:`C`, same ranking). pytorch-ood 0.4.0 ``GradNorm``: equal (its
    ``param_filter`` is our ``parameters``; the 004 docs call this variant ``GradNormKL``).

    :param model: the classifier (logits out)
    :param t: temperature :math:`T > 0`
    :param parameters: comma-separated patterns of parameter names, e.g. ``"head.weight"``, ``"*"``
    :param micro_batch_size: samples per ``torch.func`` chunk
    """

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, t: float = 1.0,
                 parameters: str = "head.weight", micro_batch_size: int = 64):
        super().__init__(model, parameters, micro_batch_size)
        self.t = float(t)
        if not (self.t > 0 and self.t != float("inf")):
            raise ValueError(f"GradNorm: t must be a positive finite number, got {t!r}")

    def loss(self, logits: Tensor) -> Tensor:
        return _uniform_ce(logits, self.t)


class GradNormKL(_GradientNorm):
    r"""GradNormKL: L1 gradient norm of a binary cross-entropy to the uniform label (pytorch-ood variant).

    .. math:: s(x) = -\Big\lVert \frac{\partial}{\partial w} \sum_{c=1}^C
              \operatorname{BCE}\big(\operatorname{softmax}(f(x))_c,\, 1/C\big) \Big\rVert_1

    as documented for pytorch-ood's ``GradNormKL`` (``../shared/seeds/004_*``; that class is not in
    pytorch-ood 0.4.0, whose ``GradNorm`` is :class:`GradNorm` here). Parameter selection, closed form
    for a linear head (:math:`\lVert \delta \rVert_1 \lVert z \rVert_1` with
    :math:`\delta = \partial L / \partial f`) and chunking as in :class:`GradNorm`.

    Paper (motivation): Huang, Geng & Li, NeurIPS 2021 (arXiv:2110.00218).

    :param model: the classifier (logits out)
    :param parameters: comma-separated patterns of parameter names
    :param micro_batch_size: samples per ``torch.func`` chunk
    """

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, parameters: str = "head.weight",
                 micro_batch_size: int = 64):
        super().__init__(model, parameters, micro_batch_size)

    def loss(self, logits: Tensor) -> Tensor:
        return _uniform_bce(logits)


class MCD(Detector):
    r"""Monte-Carlo dropout: :math:`S` stochastic forward passes with dropout on, batch norm in eval mode.

    With :math:`p^{(s)} = \operatorname{softmax}(f_s(x))`, :math:`\bar p = \frac1S \sum_s p^{(s)}`:

    * ``mode="mean"``: :math:`s(x) = -\max_c \bar p_c`
    * ``mode="var"``: :math:`s(x) = \frac1C \sum_c \frac{1}{S-1} \sum_s (p^{(s)}_c - \bar p_c)^2`

    During ``predict`` every module is put in training mode except batch-norm layers (with
    ``batch_norm=True``); each module's mode is restored afterwards. ``seed`` (if given) seeds the
    dropout masks (``torch.random.fork_rng``, the global RNG is left untouched). Accumulated in float64.

    Paper: Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in
    Deep Learning", ICML 2016 (arXiv:1506.02142). pytorch-ood 0.4.0 ``MCD``: equal given the same
    masks (``torch.manual_seed(seed)`` before its ``predict``).

    :param model: the classifier (logits out), with dropout layers
    :param samples: number of passes :math:`S` (>= 2 for ``var``)
    :param mode: ``"var"`` or ``"mean"``
    :param batch_norm: keep batch-norm layers in eval mode
    :param seed: seed of the dropout masks (``None``: the global RNG)
    """

    requires_fit: ClassVar[bool] = False
    default_search_space: ClassVar[Dict[str, Any]] = {"mode": {"grid": ["var", "mean"]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, samples: int = 30, mode: str = "var",
                 batch_norm: bool = True, seed: Optional[int] = None):
        super().__init__(model)
        if mode not in ("var", "mean"):
            raise ValueError(f"MCD: mode must be 'var' or 'mean', got {mode!r}")
        if int(samples) < (2 if mode == "var" else 1):
            raise ValueError(f"MCD: samples must be >= {2 if mode == 'var' else 1} for mode {mode!r}, got {samples!r}")
        self.samples = int(samples)
        self.mode = mode
        self.batch_norm = bool(batch_norm)
        self.seed = None if seed is None else int(seed)

    def _passes(self, model, x: Tensor) -> Tensor:
        total = sq = None
        for _ in range(self.samples):
            p = torch.softmax(model(x), dim=1).double()
            total = p if total is None else total + p
            sq = p * p if sq is None else sq + p * p
        mean = total / self.samples
        if self.mode == "mean":
            return -mean.max(dim=1).values.to(x.dtype)
        var = (sq - self.samples * mean * mean).clamp_min(0) / (self.samples - 1)
        return var.mean(dim=1).to(x.dtype)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        model = self._require_model()
        x = _inputs(self, x)
        modules = list(model.modules()) if isinstance(model, nn.Module) else []
        flags = [m.training for m in modules]
        try:
            for m in modules:
                m.train(not (self.batch_norm and isinstance(m, nn.modules.batchnorm._BatchNorm)))
            if self.seed is None:
                return self._passes(model, x)
            devices = [x.device.index or 0] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                return self._passes(model, x)
        finally:
            for m, flag in zip(modules, flags):
                m.training = flag


class MahalanobisPreprocessed(Mahalanobis):
    r"""Mahalanobis with the paper's input preprocessing, on a classifier (model in the loop).

    :class:`~.mahalanobis.Mahalanobis` (class means, shared covariance, float64) on penultimate
    features :math:`z = \phi(x)` (``model.features``), scored on

    .. math:: \tilde x = x - \varepsilon\, \operatorname{sign}\big(\nabla_x \min_c d_c(\phi(x))\big) / \sigma

    (:math:`\sigma` = ``norm_std``, as in ODIN). Fit: ``fit(loader)`` runs ``model.features`` on ID
    batches, or ``fit_features`` on cached penultimate features (the same thing, cheaper).

    Paper: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018 (arXiv:1807.03888); its search grid for :math:`\varepsilon` is
    the default search space here.

    :param model: the classifier (with ``features``), or a callable returning features
    :param eps: perturbation size :math:`\varepsilon \ge 0`
    :param norm_std: per-channel std of the input normalisation
    """

    representation: ClassVar[str] = "model"
    requires_fit: ClassVar[bool] = True
    default_search_space: ClassVar[Dict[str, Any]] = {
        "eps": {"grid": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, eps: float = 0.0014,
                 norm_std: Optional[Sequence[float]] = None):
        super().__init__(model, eps=eps)
        self.norm_std = _check_std("MahalanobisPreprocessed", norm_std)

    def _require_model(self) -> Callable[[Tensor], Tensor]:
        """The feature extractor: ``model.features`` when the model has one, else ``model`` itself
        (so ``det.model = classifier`` after :func:`~.registry.build_detector` works)."""
        model = super()._require_model()
        return getattr(model, "features", model)

    def _preprocess(self, model, x: Tensor) -> Tensor:
        x = _inputs(self, x)
        x_hat = super()._preprocess(model, x)
        std = _std_view(self.norm_std, x)
        return x_hat if std is None else (x - (x - x_hat) / std).detach()
