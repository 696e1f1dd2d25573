"""Declared hyperparameter constraints, checked in one place (after scikit-learn's ``_parameter_constraints``).

A detector class declares each hyperparameter once, in ``parameter_constraints``::

    parameter_constraints = {
        "k": Param(Interval(int, 1, N), doc="neighbour rank"),
        "d": Param(Interval(int, 1, D - 1), None, doc="principal dimension; None = the paper's rule"),
        "detector": Param(Options("energy", "msp", "maxlogit"), Callable, structural=False),
    }

A :class:`Param` accepts a value when **any** of its constraints does (``None`` in the list accepts
``None``). Bounds may be written relative to the data a detector is fitted on:

=====  ====================================================================
``D``  feature dimension of the column the detector reads (C for logits)
``C``  number of ID classes
``N``  number of ID training rows
``L``  number of layers a multi-layer detector combines
=====  ====================================================================

:func:`check_params` checks values without data (the data-relative bounds are skipped: ``validate``
checks every value a sweep can reach that way) or with ``data = {"D": .., "C": .., "N": .., "L": ..}``
(the sweep's plan does, before any training; a detector's ``fit`` does, on what it is given).
``structural=False`` marks a hyperparameter that only changes scoring, not the fitted state.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .errors import UserCausedError

#: what each data-relative name stands for (used in messages)
DATA_NAMES = {"D": "the feature dimension", "C": "the number of classes", "N": "the number of ID training rows",
              "L": "the number of layers"}


class ParameterError(UserCausedError, ValueError):
    """A hyperparameter value outside its declared constraint; ``param`` names it."""

    def __init__(self, detector: str, param: str, message: str):
        super().__init__(f"{detector}: {param}={message}")
        self.detector, self.param, self.reason = detector, param, message


@dataclass(frozen=True)
class DataSize:
    """A bound relative to the data: ``scale * data[name] + offset`` (``D - 1``, ``N``, ``C``)."""

    name: str
    scale: float = 1
    offset: float = 0

    def __add__(self, other: float) -> "DataSize":
        return DataSize(self.name, self.scale, self.offset + other)

    def __sub__(self, other: float) -> "DataSize":
        return DataSize(self.name, self.scale, self.offset - other)

    def __mul__(self, other: float) -> "DataSize":
        return DataSize(self.name, self.scale * other, self.offset * other)

    __rmul__ = __mul__

    def resolve(self, data: Optional[Mapping[str, int]]) -> Optional[float]:
        if not data or data.get(self.name) is None:
            return None
        value = self.scale * data[self.name] + self.offset
        return int(value) if float(value).is_integer() else value

    def __str__(self) -> str:
        text = self.name if self.scale == 1 else f"{self.scale:g}*{self.name}"
        if self.offset:
            text += f" {'+' if self.offset > 0 else '-'} {abs(self.offset):g}"
        return text


D, C, N, L = DataSize("D"), DataSize("C"), DataSize("N"), DataSize("L")
Bound = Union[None, float, DataSize]


class Constraint:
    """One accepted kind of value. :meth:`problem` returns ``None`` or what is wrong (a phrase)."""

    def problem(self, value: Any, data: Optional[Mapping[str, int]] = None) -> Optional[str]:  # pragma: no cover
        raise NotImplementedError

    def accepts_type(self, value: Any) -> bool:
        """Whether ``value`` is of the kind this constraint speaks of (for choosing the message)."""
        return True


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Interval(Constraint):
    """A number of ``type`` (``int`` or ``float``) in ``[low, high]`` (``closed``: both, left, right, neither).

    ``hint`` is added to the message when the value is refused (e.g. how to write a percent)."""

    type: type
    low: Bound = None
    high: Bound = None
    closed: str = "both"
    hint: str = ""

    def accepts_type(self, value: Any) -> bool:
        if self.type is int:
            return _is_number(value) and float(value).is_integer()
        return _is_number(value)

    def problem(self, value, data=None):
        if not self.accepts_type(value):
            return "must be an integer" if self.type is int else "must be a number"
        if isinstance(value, float) and math.isnan(value):
            return "must be a number, got NaN"
        lo = self.low.resolve(data) if isinstance(self.low, DataSize) else self.low
        hi = self.high.resolve(data) if isinstance(self.high, DataSize) else self.high
        bad_lo = lo is not None and (value < lo if self.closed in ("both", "left") else value <= lo)
        bad_hi = hi is not None and (value > hi if self.closed in ("both", "right") else value >= hi)
        if bad_lo or bad_hi:
            text = f"must be in {self.describe(data)}"
            return f"{text}; {self.hint}" if self.hint else text
        return None

    def describe(self, data=None) -> str:
        def show(bound, inf):
            if bound is None:
                return inf
            if isinstance(bound, DataSize):
                value = bound.resolve(data)
                return f"{bound}={value:g}" if value is not None else str(bound)
            return f"{bound:g}"

        left = "[" if self.closed in ("both", "left") and self.low is not None else "("
        right = "]" if self.closed in ("both", "right") and self.high is not None else ")"
        return f"{left}{show(self.low, '-inf')}, {show(self.high, 'inf')}{right}"

    def data_names(self) -> Tuple[str, ...]:
        return tuple(b.name for b in (self.low, self.high) if isinstance(b, DataSize))


def Percent(hint_name: str) -> Interval:  # noqa: N802 - reads as a constraint type
    """A percentage in (1, 100]. Values in (0, 1] are refused: they are pytorch-ood's fractions
    (``percentile=0.9``), which would silently mean the 0.9th percentile here."""
    return Interval(float, 1, 100, closed="right",
                    hint=f"it is in percent: write {hint_name}=90 for the 90th percentile "
                         f"(pytorch-ood's {hint_name}=0.9)")


@dataclass(frozen=True)
class Options(Constraint):
    """One of the given strings (compared case-insensitively)."""

    values: Tuple[str, ...]

    def __init__(self, *values: str):
        object.__setattr__(self, "values", tuple(values))

    def accepts_type(self, value):
        return isinstance(value, str)

    def problem(self, value, data=None):
        if not isinstance(value, str) or value.lower() not in {v.lower() for v in self.values}:
            return f"must be one of {', '.join(map(repr, self.values))}"
        return None


@dataclass(frozen=True)
class Boolean(Constraint):
    def accepts_type(self, value):
        return isinstance(value, bool) or (_is_number(value) and value in (0, 1))

    def problem(self, value, data=None):
        return None if self.accepts_type(value) else "must be true or false"


@dataclass(frozen=True)
class Callable(Constraint):
    """Any callable (a function, a module)."""

    def accepts_type(self, value):
        return callable(value)

    def problem(self, value, data=None):
        return None if callable(value) else "must be callable"


@dataclass(frozen=True)
class Instance(Constraint):
    """An instance of ``types`` (e.g. a tensor, a module)."""

    types: Tuple[type, ...]

    def accepts_type(self, value):
        return isinstance(value, self.types)

    def problem(self, value, data=None):
        return None if isinstance(value, self.types) else f"must be a {' or '.join(t.__name__ for t in self.types)}"


@dataclass(frozen=True)
class ListOf(Constraint):
    """A list (or tuple) whose every item meets ``item``; ``length`` may be a number or data-relative (``L``).
    ``scalar=True`` also accepts one item (used for ``layers: conv2``)."""

    item: Constraint
    length: Union[None, int, DataSize] = None
    min_length: int = 1
    scalar: bool = False

    def accepts_type(self, value):
        return isinstance(value, (list, tuple)) or (self.scalar and self.item.accepts_type(value))

    def problem(self, value, data=None):
        if self.scalar and not isinstance(value, (list, tuple)):
            return self.item.problem(value, data)
        if not isinstance(value, (list, tuple)):
            return "must be a list"
        want = self.length.resolve(data) if isinstance(self.length, DataSize) else self.length
        if want is not None and len(value) != want:
            named = f" ({self.length}: {DATA_NAMES.get(self.length.name, '')})" if isinstance(self.length, DataSize) else ""
            return f"must have {want} items{named}, got {len(value)}"
        if len(value) < self.min_length:
            return f"must have at least {self.min_length} item(s)"
        for i, item in enumerate(value):
            msg = self.item.problem(item, data)
            if msg:
                return f"item {i} ({item!r}) {msg}"
        return None


@dataclass(frozen=True)
class Param:
    """A hyperparameter's declaration: accepted when any constraint accepts (``None`` accepts ``None``).

    ``structural``: whether the value changes the fitted state (False: only the scoring).
    """

    constraints: Tuple[Any, ...]
    structural: bool = True
    doc: str = ""

    def __init__(self, *constraints: Any, structural: bool = True, doc: str = ""):
        object.__setattr__(self, "constraints", tuple(Boolean() if c is bool else c for c in constraints))
        object.__setattr__(self, "structural", structural)
        object.__setattr__(self, "doc", doc)

    def problem(self, value: Any, data: Optional[Mapping[str, int]] = None) -> Optional[str]:
        """``None`` when ``value`` is accepted, else the reason (the most specific constraint's)."""
        if value is None:
            return None if None in self.constraints else "must not be None"
        active = [c for c in self.constraints if c is not None]
        typed = [c for c in active if c.accepts_type(value)]
        problems = [c.problem(value, data) for c in (typed or active)]
        if any(p is None for p in problems):
            return None
        return problems[0]

    def describe(self) -> str:
        parts = []
        for c in self.constraints:
            if c is None:
                parts.append("None")
            elif isinstance(c, Interval):
                parts.append(f"{c.type.__name__} in {c.describe()}")
            elif isinstance(c, Options):
                parts.append(" | ".join(map(repr, c.values)))
            else:
                parts.append(type(c).__name__.lower())
        return " or ".join(parts)


def check_params(detector: str, constraints: Mapping[str, Param], params: Mapping[str, Any],
                 data: Optional[Mapping[str, int]] = None) -> None:
    """Raise :class:`ParameterError` for the first value in ``params`` that its declaration refuses.

    Names without a declaration are left alone (wiring such as ``model`` or ``head``). With ``data``
    the data-relative bounds are checked too; without, only the static ones."""
    for name, value in params.items():
        decl = constraints.get(name)
        if decl is None:
            continue
        msg = decl.problem(value, data)
        if msg:
            raise ParameterError(detector, name, f"{value!r} {msg}")


def data_description(data: Mapping[str, int]) -> str:
    """``D=128, C=10, N=650`` for messages."""
    return ", ".join(f"{k}={v}" for k, v in data.items() if v is not None)


Data = Dict[str, int]
__all__ = ["Param", "Interval", "Percent", "Options", "Boolean", "Callable", "Instance", "ListOf", "DataSize",
           "D", "C", "N", "L", "ParameterError", "check_params", "DATA_NAMES"]
