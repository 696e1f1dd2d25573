"""Detectors that need the network itself (representation ``"model"``): ODIN, GradNorm, GradNormKL, MCD,
and Mahalanobis with input preprocessing.

They take raw input batches ``(N, ...)`` in ``predict(x)`` (moved to the model's device) and use ``model``
(the classifier, logits out) in the mode it is in, so call ``model.eval()`` first (MCD switches dropout on
by itself). Gradients are taken per sample (through a loss summed over the batch), so a sample's score does
not depend on the rest of its batch.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import Detector, DetectorError, InvalidInputError, check_input
from ..constraints import Boolean, Instance, Interval, ListOf, Options, Param, ParameterError
from ..constraints import Callable as CallableC
from .mahalanobis import Mahalanobis

POSITIVE = Interval(float, 0, math.inf, closed="neither")
#: per-channel std of the input normalisation (one number, or one per channel)
NORM_STD = Param(ListOf(POSITIVE, scalar=True), None, structural=False,
                 doc="per-channel std of the input normalisation: eps is a step in unnormalised pixel units")


class ModelInputs:
    """Mixin of the detectors that run the network on raw inputs."""

    def _model_input(self, x) -> Tensor:
        """``x`` validated (floating, finite, a batch ``(N, ...)``) and moved to the device of the model's
        parameters. Raw inputs have no fitted width to compare (MahalanobisPreprocessed's
        ``n_features_in_`` is its features'), hence :func:`check_input` rather than ``_input``."""
        x = check_input(self, x, ndim=None, name="inputs")
        if x.ndim < 2:
            raise InvalidInputError(f"{type(self).__name__}: inputs must be a batch (N, ...), got {tuple(x.shape)}")
        owner = getattr(self.model, "__self__", self.model)  # a bound method such as model.features
        param = next(owner.parameters(), None) if isinstance(owner, nn.Module) else None
        return x if param is None else x.to(param.device)

    def _batches(self, data_loader):
        """``(x, y)`` of each batch of a loader (``y`` None when a batch is only ``x``); ``x`` validated."""
        for batch in data_loader:
            x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) \
                else (batch, None)
            x = self._model_input(x)
            yield x, (None if y is None else torch.as_tensor(y, device=x.device))


def _per_channel(step: Tensor, norm_std) -> Tensor:
    """``step / sigma`` with ``sigma`` = ``norm_std`` broadcast over channels (dimension 1)."""
    if norm_std is None:
        return step
    std = torch.as_tensor(norm_std, dtype=step.dtype, device=step.device)
    return step / std.reshape(1, -1, *([1] * (step.ndim - 2)))


def _input_gradient(loss_of: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``d loss_of(x) / dx`` (also inside ``torch.no_grad`` / ``torch.inference_mode``)."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(xg), xg)
    return grad


class ODIN(ModelInputs, Detector):
    r"""ODIN: a small input step that raises the temperature-scaled max softmax, then its negative.

    .. math::
        \tilde x = x - \varepsilon\, \operatorname{sign}\big(\nabla_x\, \mathcal L(f(x) / T, \hat y)\big) / \sigma,
        \qquad s(x) = -\max_c S_c(\tilde x; T), \quad S(x; T) = \operatorname{softmax}(f(x) / T)

    with :math:`\hat y = \arg\max_c f_c(x)`, :math:`\mathcal L` = ``criterion`` (default the cross-entropy
    :math:`-\log S_{\hat y}(x; T) = -\log \max_c S_c(x; T)`) and :math:`\sigma` the per-channel ``norm_std``
    of the input normalisation (so :math:`\varepsilon` is a step in unnormalised pixel units, as in the
    paper's code; ``None`` = 1). ``eps = 0`` is temperature-scaled MSP (no backward pass).

    Paper: Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in Neural
    Networks", ICLR 2018 (arXiv:1706.02690); code https://github.com/facebookresearch/odin. Default search
    space: OpenOOD's grid ``T`` in {1, 10, 100, 1000} x ``eps`` in {0.0014, 0.0028}.

    pytorch-ood 0.4.0 ``ODIN(model, criterion=None, eps=0.0014, temperature=1000.0, norm_std=None)``: same
    signature and positional order (``temperature`` is our ``t``; both names are accepted). Difference: the
    default criterion's loss is summed over the batch (pytorch-ood averages), which scales the gradient by
    the batch size, not its sign; a given ``criterion(logits / T, y_hat)`` is used as it is.
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "criterion": Param(CallableC(), None, structural=False, doc="loss L(logits / T, y_hat); None: cross-entropy"),
        "eps": Param(Interval(float, 0, math.inf, closed="left"), structural=False, doc="input step size"),
        "t": Param(POSITIVE, structural=False, doc="temperature T"),
        "norm_std": NORM_STD,
    }
    aliases: ClassVar[Dict[str, str]] = {**Detector.aliases, "temperature": "t"}
    default_search_space: ClassVar[Dict[str, Any]] = {"t": {"grid": [1, 10, 100, 1000]},
                                                      "eps": {"grid": [0.0014, 0.0028]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None,
                 criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None, eps: float = 0.0014,
                 t: float = 1000.0, norm_std: Optional[Sequence[float]] = None):
        super().__init__(model)
        self.criterion = criterion
        self.eps = eps
        self.t = t
        self.norm_std = norm_std

    def _loss(self, x: Tensor) -> Tensor:
        logits = self._require_model()(x) / self.t
        if self.criterion is None:  # -log max_c S_c(x; T), summed over the batch: per-sample gradients
            return -torch.log_softmax(logits, dim=1).amax(dim=1).sum()
        return self.criterion(logits, logits.argmax(dim=1))

    def preprocess(self, x: Tensor) -> Tensor:
        r"""The perturbed inputs :math:`\tilde x`."""
        x = self._model_input(x)
        return (x - self.eps * _per_channel(_input_gradient(self._loss, x).sign(), self.norm_std)).detach()

    def predict(self, x: Tensor) -> Tensor:
        model = self._require_model()
        x = self.preprocess(x) if self.eps > 0 else self._model_input(x)
        with torch.no_grad():
            return -torch.softmax(model(x) / self.t, dim=1).amax(dim=1)


class IODIN(ODIN):
    r"""i-ODIN: ODIN whose input step changes only the one input entry with the largest gradient.

    .. math::
        g = \nabla_x\, \mathcal L(f(x) / T, \hat y), \qquad
        \tilde x = x - \varepsilon\, m \odot \operatorname{sgn}_+(g) / \sigma, \qquad
        s(x) = -\max_c S_c(\tilde x; T)

    with :math:`m` the indicator of :math:`\arg\max |g|` over all entries of the sample (one channel of one pixel;
    the first on ties), :math:`\operatorname{sgn}_+(g) = +1` for :math:`g \ge 0` and :math:`-1` otherwise, and
    :math:`\hat y`, :math:`\mathcal L`, :math:`\sigma`, :math:`S` as in :class:`ODIN` (same parameters). ODIN moves
    every entry; the paper's observation is that one entry keeps the gain on ID confidence with far less damage.

    Official code: OpenOOD's ``openood/postprocessors/iodin_postprocessor.py`` (by the author; the same file in
    https://github.com/sudarshanregmi/ASCOOD), followed: :math:`\operatorname{sgn}_+` maps a zero gradient to +1
    (``torch.ge(grad, 0)``), where :class:`ODIN` here uses the sign (0 at 0); its cross-entropy is averaged over the
    batch (here summed: per-sample gradients, same argmax and signs). Default search space: OpenOOD's grid
    (``configs/postprocessors/iodin.yml``) ``T`` in {1, 10, 100, 1000} x ``eps`` in {0.0014, 0.0028} (the author's
    repository also sweeps ``eps`` up to 0.0098).

    Paper: Regmi, "Image-based Outlier Synthesis With Training Data" (ASCOOD and i-ODIN; earlier title "Going Beyond
    Conventional OOD Detection"), arXiv:2411.10794 (2024; the repository's README lists CVPR 2026).
    """

    def preprocess(self, x: Tensor) -> Tensor:
        r"""The inputs :math:`\tilde x`, changed in one entry each."""
        x = self._model_input(x)
        grad = _input_gradient(self._loss, x)
        flat = grad.reshape(grad.shape[0], -1)
        mask = torch.zeros_like(flat).scatter_(1, flat.abs().argmax(dim=1, keepdim=True), 1.0).reshape(grad.shape)
        sign = torch.where(grad >= 0, 1.0, -1.0).to(grad.dtype)
        return (x - self.eps * _per_channel(sign * mask, self.norm_std)).detach()


class _GradientNorm(ModelInputs, Detector):
    """Per-sample L1 norm of the gradient of :meth:`loss` w.r.t. the selected parameters; score = -norm."""

    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "parameters": Param(Instance((str,)), CallableC(), None, structural=False,
                            doc="comma-separated fnmatch patterns of parameter names, or pytorch-ood's "
                                "param_filter(name) -> bool; None: all parameters"),
        "micro_batch_size": Param(Interval(int, 1, None), structural=False,
                                  doc="samples per torch.func chunk (peak memory; not the scores)"),
    }
    aliases: ClassVar[Dict[str, str]] = {**Detector.aliases, "param_filter": "parameters"}

    def loss(self, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The loss summed over the rows of ``logits``."""
        raise NotImplementedError

    def selected(self, model: nn.Module) -> List[str]:
        """Names of the parameters :math:`w` whose gradient is taken."""
        sel = self.parameters
        if isinstance(sel, str):
            patterns = [p.strip() for p in sel.split(",") if p.strip()]
            sel = lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)  # noqa: E731
        names = [n for n, _ in model.named_parameters() if sel is None or sel(n)]
        if not names:
            known = [n for n, _ in model.named_parameters()][:20]
            raise DetectorError(f"{type(self).__name__}: parameters {self.parameters!r} match none of {known}")
        return names

    def _closed_form(self, model: nn.Module, x: Tensor, names: List[str]) -> Tensor:
        """Linear head ``logits = W z + b``: the per-sample gradient of ``W`` is ``outer(delta, z)`` with
        ``delta = dL/dlogits``, so its L1 norm is ``|delta|_1 |z|_1`` (and ``|delta|_1`` for ``b``)."""
        with torch.no_grad():
            z = model.features(x).flatten(1)
        with torch.inference_mode(False), torch.enable_grad():
            logits = model.head(z.clone()).detach().requires_grad_(True)
            (delta,) = torch.autograd.grad(self.loss(logits), logits)
        d1 = delta.abs().sum(dim=1)
        return d1 * z.abs().sum(dim=1) * ("head.weight" in names) + d1 * ("head.bias" in names)

    def _per_sample(self, model: nn.Module, x: Tensor, names: List[str]) -> Tensor:
        """Any parameters: ``torch.func`` per-sample gradients, ``micro_batch_size`` samples at a time (the
        activations of every sample in a chunk are held at once)."""
        from torch.func import functional_call, grad, vmap

        params = dict(model.named_parameters())
        chosen = {n: params[n].detach() for n in names}
        fixed = {**{n: p.detach() for n, p in params.items() if n not in chosen}, **dict(model.named_buffers())}
        per_sample = vmap(grad(lambda sel, xi: self.loss(functional_call(model, {**fixed, **sel}, (xi[None],)))),
                          in_dims=(None, 0))
        out = []
        with torch.inference_mode(False), torch.enable_grad():
            for chunk in x.split(int(self.micro_batch_size)):
                grads = per_sample(chosen, chunk.clone())
                out.append(sum(g.flatten(1).abs().sum(dim=1) for g in grads.values()))
        return torch.cat(out).detach()

    def gradient_norm(self, x: Tensor) -> Tensor:
        r""":math:`\lVert \partial \mathcal L(x) / \partial w \rVert_1` per sample, ``(N,)``."""
        model = self._require_model()
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"{type(self).__name__}: needs an nn.Module model")
        x = self._model_input(x)
        names = self.selected(model)
        if (set(names) <= {"head.weight", "head.bias"} and isinstance(getattr(model, "head", None), nn.Linear)
                and callable(getattr(model, "features", None))):
            return self._closed_form(model, x, names)
        return self._per_sample(model, x, names)

    def predict(self, x: Tensor) -> Tensor:
        return -self.gradient_norm(x)


class GradNorm(_GradientNorm):
    r"""GradNorm: L1 norm of the gradient of the KL divergence to the uniform distribution.

    .. math:: s(x) = -\Big\lVert \frac{\partial}{\partial w}\,
              \Big(-\frac1C \sum_{c=1}^C \log \operatorname{softmax}(f(x)/T)_c\Big) \Big\rVert_1

    (the loss is :math:`\mathrm{KL}(u \Vert \operatorname{softmax}) - \log C`; higher norm = more ID, hence
    the minus sign). :math:`w` = the parameters selected by ``parameters`` (default ``head.weight``, the last
    layer's weights, as in the paper). For the linear ``head`` of an ``ood_core`` model (``features`` +
    ``head``) the gradient is :math:`(p - u)/T \otimes z`, so the norm is
    :math:`\lVert p - u \rVert_1 \lVert z \rVert_1 / T` in closed form; other selections use ``torch.func``
    per-sample gradients in chunks of ``micro_batch_size``.

    Paper: Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the
    Wild", NeurIPS 2021 (arXiv:2110.00218); code https://github.com/deeplearning-wisc/gradnorm_ood (it sums
    over classes instead of averaging: all scores times :math:`C`, same ranking).

    pytorch-ood 0.4.0 ``GradNorm(model, param_filter=None, micro_batch_size=32, temperature=1.0)``: same
    positional order; ``param_filter`` (a callable on names) is accepted for ``parameters``, ``temperature``
    for ``t``. Differences: our default selection is ``head.weight`` (theirs: all parameters, ours with
    ``parameters=None``); default ``micro_batch_size`` 64.
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {
        **_GradientNorm.parameter_constraints,
        "t": Param(POSITIVE, structural=False, doc="temperature T"),
    }
    aliases: ClassVar[Dict[str, str]] = {**_GradientNorm.aliases, "temperature": "t"}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None,
                 parameters: Union[str, Callable[[str], bool], None] = "head.weight", micro_batch_size: int = 64,
                 t: float = 1.0):
        super().__init__(model)
        self.parameters = parameters
        self.micro_batch_size = micro_batch_size
        self.t = t

    def loss(self, logits: Tensor) -> Tensor:
        return -torch.log_softmax(logits / self.t, dim=1).mean(dim=1).sum()


class GradNormKL(_GradientNorm):
    r"""GradNormKL: L1 gradient norm of a binary cross-entropy to the uniform label (pytorch-ood's variant).

    .. math:: s(x) = -\Big\lVert \frac{\partial}{\partial w} \sum_{c=1}^C
              \operatorname{BCE}\big(\operatorname{softmax}(f(x))_c,\, 1/C\big) \Big\rVert_1

    as documented for pytorch-ood's ``GradNormKL`` (its documentation; the class is not in
    pytorch-ood 0.4.0). Selection, closed form for a linear head and chunking as in :class:`GradNorm`.

    Paper (the method it varies): Huang, Geng & Li, NeurIPS 2021 (arXiv:2110.00218).
    """

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None,
                 parameters: Union[str, Callable[[str], bool], None] = "head.weight", micro_batch_size: int = 64):
        super().__init__(model)
        self.parameters = parameters
        self.micro_batch_size = micro_batch_size

    def loss(self, logits: Tensor) -> Tensor:
        p = torch.softmax(logits, dim=1)
        return F.binary_cross_entropy(p, torch.full_like(p, 1.0 / p.shape[1]), reduction="sum")


class MCD(ModelInputs, Detector):
    r"""Monte-Carlo dropout: :math:`S` stochastic forward passes with dropout on (batch norm in eval mode).

    With :math:`p^{(s)} = \operatorname{softmax}(f_s(x))` and :math:`\bar p = \frac1S \sum_s p^{(s)}`:

    * ``mode="mean"``: :math:`s(x) = -\max_c \bar p_c`
    * ``mode="var"``: :math:`s(x) = \frac1C \sum_c \frac{1}{S-1} \sum_s (p^{(s)}_c - \bar p_c)^2`
      (needs :math:`S \ge 2`)

    in float64. During ``predict`` every module is in training mode except batch-norm layers (with
    ``batch_norm=True``); each module's mode is restored afterwards. ``seed`` seeds the dropout masks
    (``torch.random.fork_rng``: the global RNG is left untouched); ``None`` draws from the global RNG.

    Paper: Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep
    Learning", ICML 2016 (arXiv:1506.02142); code https://github.com/yaringal/DropoutUncertaintyExps.

    pytorch-ood 0.4.0 ``MCD(model, samples=30, mode="var", batch_norm=True)``: same signature; ``seed`` is
    ours. Equal scores given the same masks (``torch.manual_seed(seed)`` before its ``predict``). Difference:
    a model already in training mode is switched like one in eval mode (theirs leaves it, batch norm too).
    """

    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "samples": Param(Interval(int, 1, None), structural=False, doc="forward passes S (>= 2 for var)"),
        "mode": Param(Options("var", "mean"), structural=False),
        "batch_norm": Param(Boolean(), structural=False, doc="keep batch-norm layers in eval mode"),
        "seed": Param(Interval(int, 0, None), None, structural=False, doc="seed of the dropout masks"),
    }
    default_search_space: ClassVar[Dict[str, Any]] = {"mode": {"grid": ["var", "mean"]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, samples: int = 30, mode: str = "var",
                 batch_norm: bool = True, seed: Optional[int] = None):
        super().__init__(model)
        self.samples = samples
        self.mode = mode
        self.batch_norm = batch_norm
        self.seed = seed

    @classmethod
    def check_params(cls, params, data=None) -> None:
        """The declared constraints, and ``samples >= 2`` with ``mode="var"`` (when both are given)."""
        super().check_params(params, data)
        if str(params.get("mode", "")).lower() == "var" and params.get("samples", 2) < 2:
            raise ParameterError(cls.__name__, "samples", f"{params['samples']!r} must be >= 2 with mode='var' "
                                                          "(a sample variance)")

    def _score(self, model, x: Tensor) -> Tensor:
        p = torch.stack([torch.softmax(model(x), dim=1) for _ in range(int(self.samples))]).double()  # (S, N, C)
        if self.mode.lower() == "mean":
            return -p.mean(dim=0).amax(dim=1).to(x.dtype)
        return p.var(dim=0).mean(dim=1).to(x.dtype)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        model = self._require_model()
        x = self._model_input(x)
        modules = list(model.modules()) if isinstance(model, nn.Module) else []
        flags = [m.training for m in modules]
        try:
            for m in modules:
                m.train(not (self.batch_norm and isinstance(m, nn.modules.batchnorm._BatchNorm)))
            if self.seed is None:
                return self._score(model, x)
            with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
                torch.manual_seed(int(self.seed))
                return self._score(model, x)
        finally:
            for m, flag in zip(modules, flags):
                m.training = flag


class MahalanobisPreprocessed(ModelInputs, Mahalanobis):
    r"""Mahalanobis with the paper's input preprocessing: a small input step towards the closest class.

    :class:`~.mahalanobis.Mahalanobis` (class means :math:`\mu_c`, shared covariance :math:`\Sigma`) on
    penultimate features :math:`z = \phi(x)` (``model.features``, or ``model`` itself when it has none),
    scored on the stepped input:

    .. math::
        \tilde x = x - \varepsilon\, \operatorname{sign}\big(\nabla_x \min_c d_c(\phi(x))\big) / \sigma,
        \qquad d_c(z) = (z - \mu_c)^\top \Sigma^{-1} (z - \mu_c), \qquad s(x) = \min_c d_c(\phi(\tilde x))

    (:math:`\sigma` = ``norm_std``, as in :class:`ODIN`). ``fit(loader)`` runs ``model.features`` on ID
    batches; ``fit_features`` on cached penultimate features does the same, cheaper.

    Paper: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018 (arXiv:1807.03888); code https://github.com/pokaxpoka/deep_Mahalanobis_detector.
    Its grid for :math:`\varepsilon` is the default search space.

    pytorch-ood 0.4.0 ``MahalanobisODIN(encoder, eps=0.002, norm_std=None)``: same positional order
    (``encoder=`` is accepted for ``model``: a features callable). Differences: default ``eps`` 0.0014;
    scores are :math:`2N` times theirs (their covariance is the scatter, not divided by :math:`N`, and
    they halve the distance), up to the ridge.
    """

    representation: ClassVar[str] = "model"
    requires_fit: ClassVar[bool] = True
    parameter_constraints: ClassVar[Dict[str, Param]] = {
        "eps": Param(Interval(float, 0, math.inf, closed="left"), structural=False, doc="input step size"),
        "norm_std": NORM_STD,
    }
    default_search_space: ClassVar[Dict[str, Any]] = {
        "eps": {"grid": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01]}}

    def __init__(self, model: Optional[Callable[[Tensor], Tensor]] = None, eps: float = 0.0014,
                 norm_std: Optional[Sequence[float]] = None):
        super().__init__(model)
        self.eps = eps
        self.norm_std = norm_std

    def _require_model(self) -> Callable[[Tensor], Tensor]:
        """The feature extractor: ``model.features`` when the model has one, else ``model`` itself."""
        model = super()._require_model()
        return getattr(model, "features", model)

    def fit(self, data_loader) -> "MahalanobisPreprocessed":
        """Fit the Gaussians on ``model.features`` of a loader of ``(x, y)`` ID batches."""
        encoder = self._require_model()
        zs, ys = [], []
        with torch.no_grad():
            for x, y in self._batches(data_loader):
                zs.append(encoder(x).flatten(1))
                ys.append(torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if y is None else y)
        if not zs:
            raise InvalidInputError(f"{type(self).__name__}: the training loader is empty")
        return self.fit_features(torch.cat(zs), torch.cat(ys))

    def _distance_loss(self, x: Tensor) -> Tensor:
        r""":math:`\sum_i \min_c d_c(\phi(x_i))`, in float64 (the score of the features, differentiable)."""
        return self._score(self._require_model()(x).flatten(1).double()).sum()

    def preprocess(self, x: Tensor) -> Tensor:
        r"""The stepped inputs :math:`\tilde x`."""
        self._require_fit()
        x = self._model_input(x)
        step = _input_gradient(self._distance_loss, x).sign()
        return (x - self.eps * _per_channel(step, self.norm_std)).detach()

    def predict(self, x: Tensor) -> Tensor:
        self._require_fit()
        x = self.preprocess(x) if self.eps > 0 else self._model_input(x)
        with torch.no_grad():
            return self.predict_features(self._require_model()(x).flatten(1))
