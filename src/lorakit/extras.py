"""Optional dependencies: imported where they are used, with an error naming the extra.

lorakit's core needs torch, safetensors and numpy only. transformers, matplotlib, tqdm,
huggingface_hub and the like are imported inside the functions that use them, through
`import_optional`, so that a plain install imports every module and a missing package is one
clear message (the CLI prints it and exits with status 2), not a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import LorakitError


class MissingDependencyError(LorakitError, ImportError):
    """An optional package a call needs is not installed."""


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise `MissingDependencyError` naming the extra that installs it.

    Args:
        module: The dotted module to import, e.g. ``"transformers"``.
        extra: The lorakit extra that brings the package, e.g. ``"transformers"``.
        purpose: What needs it, for the message, e.g. ``"lorakit train"``.

    Raises:
        MissingDependencyError: The package (or a module of it) cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise MissingDependencyError(
            f"{purpose} needs the package {package!r}, which is not installed ({error}). "
            f'Install it with: pip install "lorakit[{extra}]"'
        ) from error
