"""Errors raised while configuring and running training.

Each names the value received, what is allowed, and the fix. They subclass the built-in
exception a caller would expect, so generic handlers keep working.
"""

from __future__ import annotations

from ..errors import LorakitError


class TrainConfigError(LorakitError, ValueError):
    """A ``TrainConfig`` field (or config file) holds a value training cannot use."""


class NonFiniteLossError(LorakitError, RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stopped."""


class CheckpointError(LorakitError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the run resuming from it."""


class DistributedSetupError(LorakitError, RuntimeError):
    """A ``torchrun`` launch whose environment or process group training cannot use."""


class UnsavableModelError(LorakitError, TypeError):
    """The model given to the trainer cannot be saved at the end of the run."""
