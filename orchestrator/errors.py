"""Errors a user can cause: they end the program with one line and exit code 2.

:class:`UserError` is the orchestrator's own; :class:`ood_core.errors.UserCausedError` is the same
for errors raised in ``ood_core`` (often inside a Ray task). :func:`user_error_of` tells whether an
exception that reached the command line is one of them — unwrapping Ray's ``RayTaskError`` so that
an error raised in a task is reported exactly like the same error raised locally.
"""
from __future__ import annotations

import sys
from typing import Optional

from ood_core.errors import UserCausedError


class UserError(Exception):
    """A problem the user can fix (config, missing data, bad checkpoint); no traceback is shown."""

    exit_code = 2


class ConfigError(UserError):
    """The sweep file is invalid; the message starts with the field path."""


#: user-caused errors of modules that predate :class:`UserCausedError` (looked up in ``sys.modules``
#: only: an exception of a class whose module was never imported cannot exist, and the command line
#: must not import torch to report an error)
_KNOWN = (("ood_core.checkpoints", "CheckpointError"), ("ood_core.backbones.imagenet", "WeightsMissingError"),
          ("ood_core.datasets.base", "DataMissingError"), ("ood_core.constraints", "ParameterError"))


def _ray_task_error(exc: BaseException) -> bool:
    mod = sys.modules.get("ray.exceptions")
    return mod is not None and isinstance(exc, mod.RayTaskError)


def _known_types() -> tuple:
    found = [UserError, UserCausedError]
    for module, name in _KNOWN:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def user_error_of(exc: BaseException) -> Optional[BaseException]:
    """The user-caused error ``exc`` is or carries (a ``RayTaskError`` whose cause is one, at any depth of
    nested tasks), else None (an internal fault: it keeps its traceback)."""
    for _ in range(16):  # nested tasks; bounded in case a cause refers back to its wrapper
        if _ray_task_error(exc) and getattr(exc, "cause", None) is not None and exc.cause is not exc:
            exc = exc.cause
            continue
        break
    if _ray_task_error(exc):
        return None  # a RayTaskError without a usable cause
    return exc if isinstance(exc, _known_types()) else None


def one_line(exc: BaseException) -> str:
    """The message of a user-caused error on one line.

    A message is one line by contract; an error re-raised by a torch DataLoader worker carries the
    worker's traceback ("Caught X in DataLoader worker process 0. Original Traceback ..."): its last
    line is the original message.
    """
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Original Traceback") for line in lines):
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and " " not in head else last
    return " ".join(lines)
