"""`PeftModel`'s PEFT methods that read or flip adapter state: gradients, configs, status.

A mixin so `model.py` keeps the adapter lifecycle; everything here reads the model's
`peft_config`, routing and wrappers and changes nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from .config import LoraConfig
from .status import (
    TunerLayerStatus,
    TunerModelStatus,
    get_layer_status,
    get_model_status,
    parameter_counts,
)

if TYPE_CHECKING:
    from .model import PeftModel


class AdapterControlsMixin:
    """`set_requires_grad`, `active_peft_config`, `modules_to_save`, counts and status."""

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """Return (trainable parameters, all parameters)."""
        return parameter_counts(cast("PeftModel", self).parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} "
            f"|| trainable%: {100 * trainable / total:.4f}"
        )

    def set_requires_grad(
        self, adapter_names: str | Sequence[str], requires_grad: bool = True
    ) -> None:
        """Turn gradients of these adapters' tensors (and head copies) on or off.

        Only the named adapters change, active or not; their configs stay as they are, so
        the next `set_adapter` decides trainability again, as in PEFT.

        Raises:
            AdapterNameError: An adapter does not exist (nothing is changed).
        """
        model = cast("PeftModel", self)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        model._check_exist(names)
        for _, wrapper in model._wrappers():
            for name in names:
                if name in wrapper.adapter_names:
                    wrapper.set_adapter_trainable(name, requires_grad)

    @property
    def active_peft_config(self) -> LoraConfig:
        """The config of the (first) active adapter."""
        model = cast("PeftModel", self)
        return model.peft_config[model.active_adapter]

    @property
    def modules_to_save(self) -> set[str] | None:
        """Every adapter's `modules_to_save` names together (task heads included); None if none."""
        model = cast("PeftModel", self)
        names = {
            name for config in model.peft_config.values() for name in config.modules_to_save or []
        }
        return names or None

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """`lorakit.get_layer_status(self)`."""
        return get_layer_status(cast("PeftModel", self))

    def get_model_status(self) -> TunerModelStatus:
        """`lorakit.get_model_status(self)`."""
        return get_model_status(cast("PeftModel", self))
