"""A plain `transformers.Trainer` (or `trl.SFTTrainer`) with a lorakit model: refused when built.

transformers 5.25's `Trainer` writes a model as adapter files only for peft's own classes
(`isinstance` against `peft.PeftModel` / `PeftMixedModel` in `_save`, `_load_from_checkpoint`
and `_load_best_model`) and calls `save_pretrained` only on those and `PreTrainedModel`s. Any
other `nn.Module` is saved whole, `model.state_dict()` (frozen base included) into
`model.safetensors`, and resumed from there. Nothing of a lorakit model takes part in that
choice: no hook, callback or attribute of the model is consulted, and the classes it tests
are its own. So lorakit does not let that happen silently: `PeftModel.accepts_loss_kwargs`,
which `Trainer.__init__` reads from the model it is given (and nothing else in transformers,
TRL, accelerate or peft reads), raises `UnsupportedOptionError` naming the trainers that save
lorakit models as PEFT adapter folders, unless one of them is being built
(`lorakit_trainer_building`, entered by `LorakitTrainerMixin.__init__`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from ..errors import UnsupportedOptionError

# The attribute `transformers.Trainer.__init__` reads from the model (via `hasattr`).
GUARDED_ATTRIBUTE = "accepts_loss_kwargs"

_BUILDING: ContextVar[bool] = ContextVar("lorakit_trainer_building", default=False)

PLAIN_TRAINER_MESSAGE = (
    "transformers.Trainer (and subclasses such as trl.SFTTrainer) got a lorakit PeftModel: "
    "it saves adapter files only for peft's own classes, so it would write this model's "
    "whole state dict (the frozen base included) as model.safetensors at every checkpoint "
    "and resume from that, not from PEFT adapter folders. Fix: use "
    "lorakit.integrations.transformers.LorakitTrainer in place of transformers.Trainer, "
    "lorakit.integrations.trl.LorakitSFTTrainer in place of trl.SFTTrainer, or "
    "lorakit.integrations.transformers.lorakit_trainer_class(YourTrainer) for another "
    "Trainer subclass (same arguments; checkpoints are adapter folders, resumes exact)."
)


@contextlib.contextmanager
def lorakit_trainer_building() -> Iterator[None]:
    """While a lorakit `Trainer` class is being built: the model may be read as by `Trainer`."""
    token = _BUILDING.set(True)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def accepts_loss_kwargs(base_model: Any) -> bool:
    """`PeftModel.accepts_loss_kwargs`: the inner model's value inside a lorakit trainer.

    Args:
        base_model: The `PeftModel`'s `base_model` (its `LoraModel`).

    Returns:
        The inner model's `accepts_loss_kwargs`.

    Raises:
        UnsupportedOptionError: Read outside a lorakit trainer's construction (see the module
            docstring): a plain `transformers.Trainer` is being built with a lorakit model.
        AttributeError: The inner model has no such attribute (so `Trainer` falls back to the
            signature of `PeftModel.forward`, as before).
    """
    if not _BUILDING.get():
        raise UnsupportedOptionError(PLAIN_TRAINER_MESSAGE)
    value: bool = getattr(base_model, GUARDED_ATTRIBUTE)
    return value
