"""The classifier head ``(w (C, D), b (C,))`` that head-based detectors take as ``head=`` (or ``w=``, ``b=``).

:func:`parse_head` accepts, and refuses anything else with a message naming the detector and what it got:

* an ``nn.Linear``;
* a ``(w, b)`` pair (tuple or list) of tensors or arrays, ``w`` of shape ``(C, D)``, ``b`` of shape ``(C,)``
  or ``None`` (zeros);
* an ``nn.Sequential`` (nested ones are read through) whose last module is an ``nn.Linear`` and whose other
  modules have no parameters and are the identity on ``(N, D)`` features: ``nn.Identity``, ``nn.Flatten()``,
  dropout (the head is used as in eval mode, where dropout is the identity). The linear layer is taken.
  Detectors that average-pool feature maps before the head themselves (``pooling=True``: ASH, SCALE, VRA,
  RankFeat) also accept global average pooling there, ``nn.AdaptiveAvgPool2d(1)``: pytorch-ood's ``head``
  for feature maps, ``nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)``.

An arbitrary callable (pytorch-ood's ``head=model.forward_feature_maps``) cannot be read as ``(w, b)`` and is
refused: pass the final linear layer (``model.fc``) instead. The head is stored detached, in float32; logits are
computed in the dtype and on the device of the features.

The scoring of the head's logits (:data:`LOGIT_SCORE`, ``detector=`` of ReAct, ASH, SCALE, VRA, RankFeat) is a
name (``"energy"``, ``"msp"``, ``"maxlogit"``), a function of logits ``(N, C) -> (N,)`` returning outlier scores
(higher = more OOD; pytorch-ood's ``EnergyBased.score``, ``MaxSoftmax.score``, ``MaxLogit.score`` and ours are
such functions) or a :class:`~ood_core.api.LogitsDetector` (its ``predict_logits``, e.g. ``EnergyBased(t=2)``).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..api import DetectorError, InvalidInputError, LogitsDetector
from ..constraints import Callable as CallableConstraint
from ..constraints import Options, Param
from .logits import LOGIT_SCORES

Head = Union[nn.Linear, nn.Sequential, Tuple[Any, Any], None]

#: ``detector=``: how the head's logits are scored (only the scoring: not structural)
LOGIT_SCORE = Param(Options(*LOGIT_SCORES), CallableConstraint(), None, structural=False,
                    doc="scoring of the logits: 'energy', 'msp', 'maxlogit' or a function logits -> outlier "
                        "scores (e.g. EnergyBased.score); None = energy (pytorch-ood's default)")

_ACCEPTED = "an nn.Linear, a (w, b) pair of tensors, or an nn.Sequential ending in nn.Linear"


def _describe(obj: Any) -> str:
    if isinstance(obj, nn.Sequential):
        return f"nn.Sequential({', '.join(type(m).__name__ for m in obj)})"
    if isinstance(obj, nn.Module):
        return type(obj).__name__
    if callable(obj):
        return f"the callable {getattr(obj, '__qualname__', type(obj).__name__)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    return f"a {type(obj).__name__}"


def _identity_on_features(module: nn.Module, pooling: bool) -> bool:
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return True
    if isinstance(module, nn.Flatten):
        return module.start_dim in (1, -1) and module.end_dim in (1, -1)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return pooling and module.output_size in (1, (1, 1))
    return False


def _flat_modules(seq: nn.Sequential) -> List[nn.Module]:
    out: List[nn.Module] = []
    for m in seq:
        out.extend(_flat_modules(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _linear_of_sequential(detector: str, seq: nn.Sequential, pooling: bool) -> nn.Linear:
    modules = _flat_modules(seq)
    if not modules or not isinstance(modules[-1], nn.Linear):
        last = type(modules[-1]).__name__ if modules else "nothing"
        raise ValueError(f"{detector}: head {_describe(seq)} must end in nn.Linear, it ends in {last}; "
                         f"pass the final linear layer")
    for i, m in enumerate(modules[:-1]):
        if isinstance(m, nn.AdaptiveAvgPool2d) and not pooling:
            raise ValueError(f"{detector}: head {_describe(seq)}: module {i} pools feature maps, but {detector} "
                             f"reads pooled (N, D) features: pool in the model and pass the final linear layer")
        if any(True for _ in m.parameters()) or not _identity_on_features(m, pooling):
            allowed = "nn.Identity, nn.Flatten(), dropout" + (", nn.AdaptiveAvgPool2d(1)" if pooling else "")
            raise ValueError(f"{detector}: head {_describe(seq)}: module {i} ({type(m).__name__}) is not a "
                             f"parameter-free identity on features (allowed before the linear layer: {allowed}); "
                             f"pass the final linear layer, or (w, b)")
    return modules[-1]


def parse_head(detector: str, head: Head, pooling: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(w (C, D), b (C,))`` as detached float32 tensors from one of the accepted forms (module docstring);
    ``None`` gives ``(None, None)``, a missing bias zeros. ``ValueError`` naming ``detector`` otherwise."""
    if head is None:
        return None, None
    if isinstance(head, nn.Sequential):
        head = _linear_of_sequential(detector, head, pooling)
    if isinstance(head, nn.Linear):
        w, b = head.weight, head.bias
    elif isinstance(head, (tuple, list)) and len(head) == 2 and not any(isinstance(v, nn.Module) for v in head):
        w, b = head
        if w is None:
            raise ValueError(f"{detector}: head weights w are None")
    else:
        hint = "; pass the final linear layer (e.g. model.fc) or its (weight, bias)" if callable(head) else ""
        raise ValueError(f"{detector}: head must be {_ACCEPTED}, got {_describe(head)}{hint}")
    try:
        w = torch.as_tensor(w).detach().float()
        b = None if b is None else torch.as_tensor(b).detach().float()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{detector}: head (w, b) must be tensors or arrays: {exc}") from None
    if w.ndim != 2:
        raise ValueError(f"{detector}: head weights must have shape (C, D), got {tuple(w.shape)}")
    b = torch.zeros(w.shape[0], device=w.device) if b is None else b.to(w.device)
    if b.shape != (w.shape[0],):
        raise ValueError(f"{detector}: head bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    return w, b


def logit_score(detector: Any) -> Callable[[Tensor], Tensor]:
    """The scoring function ``logits (N, C) -> outlier scores (N,)`` that ``detector`` (see :data:`LOGIT_SCORE`)
    names."""
    if detector is None:
        return LOGIT_SCORES["energy"]
    if isinstance(detector, str):
        return LOGIT_SCORES[detector.lower()]
    if isinstance(detector, LogitsDetector):
        return detector.predict_logits
    return detector


class HeadMixin:
    """Holds the classifier head ``w (C, D)``, ``b (C,)`` and computes logits in the input's dtype.

    ``head_pooling``: the detector average-pools feature maps before the head itself, so a head that starts
    with global average pooling is accepted (:func:`parse_head`)."""

    needs_head: ClassVar[bool] = True
    head_pooling: ClassVar[bool] = False
    w: Optional[Tensor]
    b: Optional[Tensor]

    def _set_head(self, head: Head = None, w: Any = None, b: Any = None) -> None:
        """Store the head given as ``head=`` or as pytorch-ood's ``w=`` / ``b=`` keywords (not both)."""
        name = type(self).__name__
        if w is not None or b is not None:
            if head is not None:
                raise ValueError(f"{name}: give head= or w= / b=, not both")
            if w is None:
                raise ValueError(f"{name}: b given without w")
            head = (w, b)
        self.w, self.b = parse_head(name, head, pooling=self.head_pooling)

    def _require_head(self) -> None:
        if self.w is None:
            raise DetectorError(f"{type(self).__name__}: needs the classifier head; pass head=nn.Linear or (w, b)")

    def _head_input(self, x: Tensor, name: str = "features") -> Tensor:
        """``x`` after checking that the head is set and that ``x``'s width (dim 1) is the head's ``D``."""
        self._require_head()
        if x.ndim >= 2 and x.shape[1] != self.w.shape[1]:
            raise InvalidInputError(f"{type(self).__name__}: {name} have width {x.shape[1]}, but the head expects "
                                    f"width {self.w.shape[1]}")
        return x

    def logits(self, z: Tensor) -> Tensor:
        """``z @ w.T + b`` in the dtype and on the device of ``z``."""
        self._require_head()
        return z @ self.w.to(device=z.device, dtype=z.dtype).T + self.b.to(device=z.device, dtype=z.dtype)

    def _score_logits(self, logits: Tensor, detector: Any) -> Tensor:
        """Outlier scores ``(N,)`` of ``logits`` by ``detector`` (:func:`logit_score`); checks the shape."""
        scores = logit_score(detector)(logits)
        if not isinstance(scores, Tensor) or scores.shape != logits.shape[:1]:
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise InvalidInputError(f"{type(self).__name__}: detector={detector!r} must map logits "
                                    f"{tuple(logits.shape)} to scores ({logits.shape[0]},), got {got}")
        return scores

    def _head_features(self, z: Tensor, y: Tensor, finite: bool = True) -> Tuple[Tensor, Tensor]:
        """Validated ID training features for a detector with a head (the width must be the head's ``D``)."""
        self._require_head()
        return self._training_input(z, y, name="features", finite=finite)
