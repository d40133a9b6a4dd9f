"""Errors raised when reading, writing or fitting adapter files.

All are `LorakitError`s (one hierarchy: the CLI prints them as messages), and each also
subclasses the built-in exception a caller would catch for that kind of problem
(`FileNotFoundError` for a missing adapter, `ValueError` for bad content), so code written for
plain Python exceptions keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.errors import LorakitError


class AdapterFileError(LorakitError):
    """Base class of every adapter-file error in `lorakit.io`."""


class AdapterNotFoundError(AdapterFileError, FileNotFoundError):
    """The adapter folder, its `adapter_config.json` or its weights file does not exist."""


class CorruptAdapterFileError(AdapterFileError, ValueError):
    """An adapter file exists but cannot be parsed (truncated, corrupt or invalid JSON)."""


class PickleAdapterRefusedError(AdapterFileError, ValueError):
    """Only a pickle weights file (`adapter_model.bin`) exists and pickles were not allowed."""


class AdapterDeviceError(AdapterFileError, ValueError):
    """The device to read an adapter onto is not one torch knows or this machine has."""


class AdapterConfigError(AdapterFileError, ValueError):
    """An adapter config cannot be written or is not a LoRA config."""


@dataclass(frozen=True)
class ShapeMismatch:
    """One tensor whose shape in the file differs from the model's.

    Attributes:
        name: The tensor as users know it, e.g. `model.layers.0.self_attn.q_proj.lora_A`.
        file_shape: Shape of the tensor in the adapter file.
        model_shape: Shape the model expects.
    """

    name: str
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]

    def describe(self) -> str:
        """Returns `name: adapter [a, b] vs base expects [c, d]`."""
        return (
            f"{self.name}: adapter {list(self.file_shape)} vs base expects {list(self.model_shape)}"
        )


@dataclass
class AdapterMismatch:
    """Everything in an adapter file that does not fit a model, found before anything is loaded.

    Attributes:
        unexpected: File keys that match no tensor of the model.
        missing: Adapter tensors of the model (shown like file keys) with no weights in the file.
        shapes: Tensors whose shapes differ between the file and the model.
    """

    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shapes: list[ShapeMismatch] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unexpected or self.missing or self.shapes)


class AdapterMismatchError(AdapterFileError, ValueError):
    """The adapter's tensors do not fit the model (unknown modules, missing weights or shapes).

    Attributes:
        mismatch: The full lists of problems; the message shows only the first few of each.
    """

    def __init__(self, message: str, mismatch: AdapterMismatch) -> None:
        super().__init__(message)
        self.mismatch = mismatch
