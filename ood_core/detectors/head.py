"""The classifier head ``(w (C, D), b (C,))`` that head-based detectors take as ``head=``.

A head is given as an ``nn.Linear`` or a ``(w, b)`` tuple (``b`` may be None: zeros); it is stored
detached, in float32, and logits are computed in the dtype and on the device of the features.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..api import DetectorError, InvalidInputError
from .mahalanobis import id_training_set

Head = Union[nn.Linear, Tuple[Tensor, Optional[Tensor]], None]


def parse_head(detector: str, head: Head) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(w (C, D), b (C,))`` as detached float32 tensors from an ``nn.Linear`` or a ``(w, b)`` tuple;
    ``None`` gives ``(None, None)``, a missing bias zeros. ``ValueError`` naming ``detector`` otherwise."""
    if head is None:
        return None, None
    if isinstance(head, nn.Linear):
        w, b = head.weight, head.bias
    else:
        try:
            w, b = head
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{detector}: head must be an nn.Linear or a (w, b) tuple") from exc
    w = torch.as_tensor(w).detach().float()
    if w.ndim != 2:
        raise ValueError(f"{detector}: head weights must have shape (C, D), got {tuple(w.shape)}")
    b = torch.zeros(w.shape[0], device=w.device) if b is None else torch.as_tensor(b).detach().float()
    if b.shape != (w.shape[0],):
        raise ValueError(f"{detector}: head bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    return w, b.to(w.device)


class HeadMixin:
    """Holds the classifier head ``w (C, D)``, ``b (C,)`` and computes logits in the input's dtype."""

    needs_head: ClassVar[bool] = True
    w: Optional[Tensor]
    b: Optional[Tensor]

    def _set_head(self, head: Head) -> None:
        self.w, self.b = parse_head(type(self).__name__, head)

    def _require_head(self) -> None:
        if self.w is None:
            raise DetectorError(f"{type(self).__name__}: needs the classifier head; pass head=nn.Linear or (w, b)")

    def logits(self, z: Tensor) -> Tensor:
        """``z @ w.T + b`` in the dtype and on the device of ``z``."""
        self._require_head()
        return z @ self.w.to(device=z.device, dtype=z.dtype).T + self.b.to(device=z.device, dtype=z.dtype)

    def _head_features(self, z: Tensor, y: Tensor, finite: bool = True) -> Tuple[Tensor, Tensor]:
        """Validated ID training features for a detector with a head (dimension must match; ``finite``
        as in :func:`~.mahalanobis.check_features`)."""
        self._require_head()
        z, y = id_training_set(self, z, y, finite=finite)
        if z.shape[1] != self.w.shape[1]:
            raise InvalidInputError(
                f"{type(self).__name__}: features have dimension {z.shape[1]}, head weights expect {self.w.shape[1]}"
            )
        return z, y
