"""The marker of problems a user can fix, for errors raised in ``ood_core`` (also inside Ray tasks).

``ood_core`` does not know the orchestrator; the orchestrator's command line reports any
:class:`UserCausedError` — raised locally, or raised in a Ray task and arriving wrapped in
``RayTaskError`` — as one line with exit code 2, like its own ``orchestrator.errors.UserError``, and
never retries it. Everything else is an internal fault and keeps its traceback.

Subclasses keep the plain-message constructor (``cls(message)``) or define ``__reduce__``: Ray pickles
an exception raised in a task and rebuilds it in the driver.
"""
from __future__ import annotations


class UserCausedError(Exception):
    """A problem the user can fix (data, a checkpoint, a setting that cannot work); ``str(exc)`` is one
    line that names what is wrong (the file, the data set, the field)."""


class TrainingDivergedError(UserCausedError, FloatingPointError):
    """The training loss became NaN or infinite (a learning rate too high for the model and data)."""
