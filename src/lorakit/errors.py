"""Errors lorakit raises for bad input: each names the value received, what exists, and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose.

    Every lorakit error derives from it (`lorakit.io.errors`, `lorakit.train.train_errors`
    and `lorakit.train.data_errors` included), so the CLI prints any of them as one message
    and exits with status 2.
    """


class ConfigError(LorakitError, ValueError):
    """A `LoraConfig` field holds a value lorakit cannot use."""


class TargetModuleError(LorakitError, ValueError):
    """The configured targets do not select modules lorakit can adapt."""


class UnsupportedModuleError(TargetModuleError):
    """A selected module has a type no LoRA layer is registered for."""


class AdapterNameError(LorakitError, KeyError):
    """An adapter name that does not exist (or already exists) was given."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class MergeError(LorakitError, RuntimeError):
    """Merging would write wrong numbers (NaN/inf) or the state does not allow it."""


class HotswapError(LorakitError, ValueError):
    """An adapter file cannot replace an existing adapter's weights in place."""


class UnsupportedOptionError(LorakitError, TypeError):
    """A keyword argument (of PEFT's API) that lorakit does not implement was given a value."""


class AdapterStateError(LorakitError, ValueError):
    """The model's adapters are not in the state a call needs (none there, or not loaded yet)."""


def closest_names(name: str, candidates: Iterable[str], limit: int = 5) -> list[str]:
    """Return the candidates that look most like `name`, best first, for 'did you mean' hints."""
    unique = sorted(set(candidates))
    close = difflib.get_close_matches(name, unique, n=limit, cutoff=0.4)
    if close:
        return close
    return [c for c in unique if name.lower() in c.lower() or c.lower() in name.lower()][:limit]


class ServeError(LorakitError):
    """The serving engine (`lorakit.serve`) cannot do what a request or call asks."""


class UnknownAdapterError(ServeError, KeyError):
    """A request or call names an adapter the engine has not loaded (the message lists those)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class QueueFullError(ServeError, RuntimeError):
    """The engine's waiting queue holds `max_queue` requests already; retry later (HTTP 429)."""


class RequestTooLargeError(ServeError, ValueError):
    """A prompt or `max_tokens` exceeds the engine's configured limits (HTTP 400)."""


class AdapterInUseError(ServeError, RuntimeError):
    """An adapter still used by running or waiting requests was asked to unload without waiting."""


class LoadSpecError(ServeError, ValueError):
    """A load test's request mix or options cannot be run (`lorakit.serve.loadgen`)."""


class LoadTestError(ServeError, RuntimeError):
    """A load test lost requests or got answers unlike their references (the message lists them)."""


class ExportError(LorakitError, ValueError):
    """An adapter cannot be exported for another runtime (`lorakit.export`).

    The message names the feature that runtime would not run (or the path that cannot be
    written) and the fix.
    """
