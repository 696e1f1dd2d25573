"""Training objectives: the loss a backbone is trained with (plain functions + a small dispatcher).

Each objective is cross entropy on the in-distribution (ID) batch plus, for some, a term that shapes
what the network does on auxiliary outliers or on its intermediate layers. Notation: ``z`` logits of an
ID sample with label ``y``, ``z'`` logits of an auxiliary outlier, ``C`` classes, ``E(z) = -T log Σ_c exp(z_c / T)``
the free energy (Liu et al., NeurIPS 2020), ``CE`` the (optionally label-smoothed) cross entropy.

* ``cross_entropy``: ``CE(z, y)``.
* ``logitnorm`` (Wei, Xie, Cheng, Feng, An & Li, "Mitigating Neural Network Overconfidence with Logit
  Normalization", ICML 2022): ``CE(z / (τ ‖z‖₂), y)``; ``tau`` τ = 0.04 (their CIFAR-10 value).
* ``outlier_exposure`` (Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier Exposure",
  ICLR 2019): ``CE(z, y) + λ · mean_outliers[ -(1/C) Σ_c log softmax(z')_c ]`` (cross entropy from the
  outlier's posterior to the uniform one); ``lambda`` λ = 0.5.
* ``energy_regularised`` (Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020):
  ``CE(z, y) + λ · ( mean_ID relu(E(z) − m_in)² + mean_outliers relu(m_out − E(z'))² )``;
  ``m_in`` = −25, ``m_out`` = −7, ``lambda`` λ = 0.1, T = 1 (their CIFAR-10 fine-tuning values).
* ``intermediate_energy`` (R-EBO of Guglielmo & Masana, "Leveraging Intermediate Representations for Better
  Out-of-Distribution Detection", CVWW 2025): the energy-bounded loss above applied to the energy of each
  named intermediate layer ``l``, ``E_l(x) = −log Σ_i exp(a_l(x)_i)`` over the flattened raw output
  ``a_l`` of the layer (the per-layer energy that paper scores with), averaged over the ``L`` layers:
  ``CE(z, y) + λ · (1/L) Σ_l ( mean_ID relu(E_l − m_in)² + mean_outliers relu(m_out − E_l')² )``.
  ``layers`` (module names, required), ``m_in`` = −25, ``m_out`` = −7, ``lambda`` λ = 0.1 (the margins and
  weight of Liu et al., which the regulariser transfers to the hidden layers). What could be checked: the
  paper (arXiv:2502.12849) describes R-EBO as regularising intermediate layers "with an energy-based
  contrastive loss" on the per-layer energies ``E_l(x) = −T log Σ_i exp(a_l^i(x) / T)`` with auxiliary
  outliers (Liu et al.'s energy-bounded loss is that contrastive loss); its public code (github.com/gigug/LIR)
  holds only the per-layer scoring, no training code, so the margins and weight are Liu et al.'s, not values
  taken from the paper, and T = 1.

* ``la_ood_cotrain`` (LA-OOD co-training: H. Wang, C. Zhao, X. Zhao & F. Chen, "Layer Adaptive Deep Neural
  Networks for Out-of-distribution Detection", PAKDD 2022; code: github.com/haoliangwang86/LA-OOD,
  ``co_train.py``): ``epochs`` of plain ``CE(z, y)``, then ``cotrain_epochs`` of fine-tuning with
  ``CE(z, y) − λ/(2L) Σ_l Σ_i Σ_j α_lj exp(−γ_l ‖f̃_l(x_i) − s_lj‖²)`` against frozen per-layer RBF one-class
  SVMs (support vectors ``s``, dual coefficients ``α``, width ``γ``) on the standardised spatial means ``f̃_l``
  of the named ``layers`` (the phase, its formula and its details: :mod:`ood_core.cotraining`). Defaults
  from the official code: ``lambda`` λ = 0.001, ``nu`` = 0.001, ``cotrain_epochs`` = 5, SGD ``lr`` = 0.001,
  ``momentum`` = 0.9, ``weight_decay`` = 1e-4 (the co-training phase's optimizer; the main loop keeps the
  training config's); ``max_fit_samples`` = 50000 (rows per OCSVM fit: the official code fits on all 50000
  CIFAR training rows; the fit grows about quadratically, ~3 min per layer at 20000 rows on 2 CPU cores, so
  lower it for a quick study); ``layers`` required. No auxiliary outliers.

``outlier_exposure``, ``energy_regularised`` and ``intermediate_energy`` need auxiliary outliers: each ID
batch is paired with an outlier batch and both go through the network in one forward pass (as Hendrycks et
al. do). :func:`objective_loss` runs that pass and returns the loss and the ID logits.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: name -> default parameters (from each objective's paper; ``layers`` has no default)
OBJECTIVE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "cross_entropy": {},
    "logitnorm": {"tau": 0.04},
    "outlier_exposure": {"lambda": 0.5},
    "energy_regularised": {"lambda": 0.1, "m_in": -25.0, "m_out": -7.0},
    "intermediate_energy": {"lambda": 0.1, "m_in": -25.0, "m_out": -7.0, "layers": None},
    "la_ood_cotrain": {"lambda": 0.001, "nu": 0.001, "cotrain_epochs": 5, "lr": 0.001, "momentum": 0.9,
                       "weight_decay": 1e-4, "max_fit_samples": 50000, "layers": None},
}
#: the objectives that train on auxiliary outliers
NEEDS_OUTLIERS = frozenset({"outlier_exposure", "energy_regularised", "intermediate_energy"})
#: the objectives whose loss reads the activations of ``layers`` in every training step of the main loop
#: (``la_ood_cotrain`` reads them only in its co-training phase, :mod:`ood_core.cotraining`)
HOOKS_IN_LOSS = frozenset({"intermediate_energy"})
#: the objectives with a phase after the main loop (:func:`ood_core.training.train_classifier` runs it)
COTRAINING = frozenset({"la_ood_cotrain"})


# ----------------------------------------------------------------------------- formulas
def logitnorm_loss(logits: Tensor, y: Tensor, tau: float = 0.04, label_smoothing: float = 0.0) -> Tensor:
    """LogitNorm (Wei et al., ICML 2022): ``CE(z / (τ (‖z‖₂ + 1e-7)), y)`` (their 1e-7 guards ‖z‖ = 0)."""
    norms = torch.linalg.vector_norm(logits, dim=1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / (norms * tau), y, label_smoothing=label_smoothing)


def uniform_posterior_ce(logits: Tensor) -> Tensor:
    """Mean over rows of the cross entropy from softmax(z) to the uniform posterior:
    ``-(1/C) Σ_c log softmax(z)_c = logsumexp(z) − mean_c z_c`` (Hendrycks et al., ICLR 2019)."""
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()


def free_energy(values: Tensor, t: float = 1.0) -> Tensor:
    """``E = −T logsumexp(v / T)`` over all but the first dimension (flattened), one value per row."""
    return -t * torch.logsumexp(values.flatten(1) / t, dim=1)


def energy_margin_loss(e_in: Tensor, e_out: Tensor, m_in: float, m_out: float) -> Tensor:
    """Energy-bounded loss (Liu et al., NeurIPS 2020): ``mean relu(E_in − m_in)² + mean relu(m_out − E_out)²``."""
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


def _at_least_float32(t: Tensor) -> Tensor:
    """float16 / bfloat16 (under autocast) to float32 for the log-sum-exps; float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


# ----------------------------------------------------------------------------- dispatcher
@dataclass(frozen=True)
class Objective:
    """A named objective with its parameters (see the module docstring); build with :func:`make_objective`."""

    name: str = "cross_entropy"
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs_outliers(self) -> bool:
        return self.name in NEEDS_OUTLIERS

    @property
    def layers(self) -> Tuple[str, ...]:
        return tuple(self.params.get("layers") or ())

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params.items()}}

    def loss(self, logits: Tensor, y: Tensor, *, n_in: Optional[int] = None,
             activations: Optional[Mapping[str, Tensor]] = None, label_smoothing: float = 0.0) -> Tensor:
        """The objective on one forward pass: rows ``[:n_in]`` of ``logits`` (and of each activation) are the ID
        batch with labels ``y``, the rest the outliers (``n_in`` None: no outliers)."""
        n_in = len(logits) if n_in is None else int(n_in)
        logits = _at_least_float32(logits)
        z_in, z_out = logits[:n_in], logits[n_in:]
        p = self.params
        if self.name == "logitnorm":
            return logitnorm_loss(z_in, y, p["tau"], label_smoothing)
        ce = F.cross_entropy(z_in, y, label_smoothing=label_smoothing)
        if self.name in ("cross_entropy", "la_ood_cotrain"):  # la_ood_cotrain: its main loop is plain CE
            return ce
        if len(z_out) == 0:
            raise ValueError(f"objective {self.name!r} needs a batch of auxiliary outliers")
        if self.name == "outlier_exposure":
            return ce + p["lambda"] * uniform_posterior_ce(z_out)
        if self.name == "energy_regularised":
            e = free_energy(logits)
            return ce + p["lambda"] * energy_margin_loss(e[:n_in], e[n_in:], p["m_in"], p["m_out"])
        # intermediate_energy
        if activations is None or set(activations) != set(self.layers):
            raise ValueError(f"objective 'intermediate_energy' needs the activations of layers {list(self.layers)}")
        reg = torch.stack([energy_margin_loss(e[:n_in], e[n_in:], p["m_in"], p["m_out"])
                           for e in (free_energy(_at_least_float32(activations[name])) for name in self.layers)]).mean()
        return ce + p["lambda"] * reg


def make_objective(spec: Any = None) -> Objective:
    """:class:`Objective` from ``None`` (cross entropy), a name, a dict ``{name, **params}`` or an Objective;
    missing parameters take their paper's default. ``ValueError`` (naming the parameter) on a bad value."""
    if isinstance(spec, Objective):
        return spec
    if spec is None:
        spec = {"name": "cross_entropy"}
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", "cross_entropy")
    if name not in OBJECTIVE_DEFAULTS:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVE_DEFAULTS)}")
    defaults = OBJECTIVE_DEFAULTS[name]
    unknown = sorted(set(spec) - set(defaults))
    if unknown:
        raise ValueError(f"objective {name!r} takes {sorted(defaults) or 'no parameters'}, not {unknown}")
    params = {**defaults, **{k: v for k, v in spec.items() if v is not None}}
    for k in ("lambda", "tau", "m_in", "m_out"):
        if k in params:
            v = params[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                raise ValueError(f"objective {name!r}: {k} must be a finite number, got {v!r}")
            params[k] = float(v)
    if "lambda" in params and params["lambda"] < 0:
        raise ValueError(f"objective {name!r}: lambda must be >= 0, got {params['lambda']}")
    if "tau" in params and not params["tau"] > 0:
        raise ValueError(f"objective {name!r}: tau must be > 0, got {params['tau']}")
    if "m_in" in params and not params["m_in"] < params["m_out"]:
        raise ValueError(f"objective {name!r}: m_in must be below m_out (ID energy low, outlier energy high), "
                         f"got m_in={params['m_in']}, m_out={params['m_out']}")
    if name == "la_ood_cotrain":
        _check_cotrain(params)
    if "layers" in params:
        layers = params["layers"]
        if isinstance(layers, str):
            layers = [layers]
        if not layers or not all(isinstance(l, str) and l for l in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"objective {name!r}: layers must be a non-empty list of distinct module names, "
                             f"got {params['layers']!r}")
        params["layers"] = tuple(layers)
    return Objective(name, params)


def _check_cotrain(params: Dict[str, Any]) -> None:
    """The co-training parameters of ``la_ood_cotrain`` (``lambda`` is checked with the others), normalised
    in place (integers as ``int``, the rest as ``float``); ``ValueError`` naming the parameter."""
    from ood_core.detectors.ocsvm import MIN_ROWS  # the fewest rows LA-OOD's OCSVM fit takes

    def number(k: str) -> float:
        v = params[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
            raise ValueError(f"objective 'la_ood_cotrain': {k} must be a finite number, got {v!r}")
        return float(v)

    def integer(k: str, low: int) -> int:
        v = params[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or int(v) != v or v < low:
            raise ValueError(f"objective 'la_ood_cotrain': {k} must be an integer >= {low}, got {v!r}")
        return int(v)

    checks = {"nu": (lambda v: 0 < v <= 1, "in (0, 1]"), "lr": (lambda v: v > 0, "> 0"),
              "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"), "weight_decay": (lambda v: v >= 0, ">= 0")}
    for k, (ok, rule) in checks.items():
        v = number(k)
        if not ok(v):
            raise ValueError(f"objective 'la_ood_cotrain': {k} must be {rule}, got {v}")
        params[k] = v
    params["cotrain_epochs"] = integer("cotrain_epochs", 1)
    params["max_fit_samples"] = integer("max_fit_samples", MIN_ROWS)


@contextlib.contextmanager
def _capture(model: nn.Module, layers: Sequence[str]) -> Iterator[Dict[str, Tensor]]:
    """Forward hooks that keep each named module's output (with its graph, for the gradient)."""
    store: Dict[str, Tensor] = {}
    handles = []
    try:
        for name in layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                known = [n for n, _ in model.named_modules() if n][:40]
                raise ValueError(f"model {type(model).__name__} has no module {name!r}; modules include {known}") \
                    from None

            def hook(_m, _inputs, output, name=name):
                store[name] = output[0] if isinstance(output, (tuple, list)) else output
            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def check_layers(model: nn.Module, objective: Objective) -> None:
    """``ValueError`` when a layer the objective names is not a module of ``model``."""
    with _capture(model, objective.layers):
        pass


def objective_loss(model: nn.Module, objective: Objective, x: Tensor, y: Tensor,
                   x_out: Optional[Tensor] = None, *, label_smoothing: float = 0.0) -> Tuple[Tensor, Tensor]:
    """One forward pass of ``model`` on ``x`` (and the outliers ``x_out``, concatenated after it); returns
    ``(loss, logits of x)``."""
    n_in = len(x)
    inputs = x if x_out is None else torch.cat([x, x_out.to(dtype=x.dtype)])
    hooked = objective.layers if objective.name in HOOKS_IN_LOSS else ()
    with _capture(model, hooked) as acts:
        logits = model(inputs)
    loss = objective.loss(logits, y, n_in=n_in, activations=dict(acts) if hooked else None,
                          label_smoothing=label_smoothing)
    return loss, logits[:n_in]


__all__: List[str] = ["OBJECTIVE_DEFAULTS", "NEEDS_OUTLIERS", "HOOKS_IN_LOSS", "COTRAINING", "Objective",
                      "make_objective", "objective_loss", "check_layers", "logitnorm_loss", "uniform_posterior_ce",
                      "free_energy", "energy_margin_loss"]
