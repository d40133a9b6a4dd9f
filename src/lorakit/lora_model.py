"""`LoraModel`: `PeftModel.base_model`, holding the user's model as `.model`, as in PEFT.

Code written for peft reaches through `model.base_model` (`merge_and_unload`,
`targeted_module_names`, `set_adapter`, `delete_adapter`, `peft_config`, ...). The adapter
lifecycle itself lives in `PeftModel`; a `LoraModel` knows the `PeftModel` that holds it and
passes these calls on, so both objects always say the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from .inject import iter_wrappers
from .layers.base import LoraLayer
from .layers.routing import AdapterRouting

if TYPE_CHECKING:
    from .config import LoraConfig
    from .model import PeftModel

logger = logging.getLogger(__name__)

OWNER_ATTRIBUTE = "_peft_model"


class LoraModel(nn.Module):
    """Holds the user's model as `.model`; every lorakit layer in it reads `routing`."""

    def __init__(self, model: nn.Module, routing: AdapterRouting) -> None:
        super().__init__()
        self.model = model
        self.routing = routing

    def attach(self, peft_model: PeftModel) -> None:
        """Remember the `PeftModel` holding this one (not as a submodule: no cycle in the tree).

        A plain attribute, so `copy.deepcopy` and pickling of the `PeftModel` keep the pair.
        """
        object.__setattr__(self, OWNER_ATTRIBUTE, peft_model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- PEFT's LoraModel surface ----------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Adapter name -> config: the very dict of the `PeftModel`."""
        return self._owner().peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.routing.active_adapters)

    @property
    def active_adapter(self) -> list[str]:
        """PEFT's `LoraModel.active_adapter`: the list of active adapters."""
        return self.active_adapters

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths (in `.model`) of the modules holding LoRA adapters now, in module order."""
        return [key for key, wrapper in iter_wrappers(self.model) if isinstance(wrapper, LoraLayer)]

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """`PeftModel.set_adapter`."""
        self._owner().set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """`PeftModel.delete_adapter`."""
        self._owner().delete_adapter(adapter_name)

    def merge_adapter(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
    ) -> None:
        """`PeftModel.merge_adapter`."""
        self._owner().merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        """`PeftModel.unmerge_adapter`."""
        self._owner().unmerge_adapter()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        requantize: bool = False,
    ) -> nn.Module:
        """`PeftModel.merge_and_unload`: the plain user's model with the adapters merged in."""
        return self._owner().merge_and_unload(
            progressbar, safe_merge, adapter_names, requantize=requantize
        )

    def unload(self) -> nn.Module:
        """`PeftModel.unload`: the user's model with its original modules back."""
        return self._owner().unload()

    def enable_adapter_layers(self) -> None:
        """Let the adapters act again after `disable_adapter_layers`.

        As in PEFT, the active adapters become trainable (their configs leave inference
        mode) and the others stay frozen.
        """
        owner = self._owner()
        for name in self.routing.active_adapters:
            owner.peft_config[name].inference_mode = False
        self.routing.is_disabled = False
        owner._refresh_trainable()

    def disable_adapter_layers(self) -> None:
        """Stop every adapter from acting until `enable_adapter_layers`; the base model runs.

        As in PEFT, every adapter tensor is frozen meanwhile. Merged adapters are unmerged
        now (PEFT unmerges them at the next forward); they do not merge back on enabling.
        The `disable_adapter()` context manager is the form that restores everything.
        """
        owner = self._owner()
        if any(layer.merged_adapters for _, layer in owner._lora_layers()):
            logger.warning("Unmerging merged adapters before disabling the adapter layers.")
            owner.unmerge_adapter()
        for _, wrapper in owner._wrappers():
            for name in wrapper.adapter_names:
                wrapper.set_adapter_trainable(name, False)
        self.routing.is_disabled = True

    def _owner(self) -> PeftModel:
        owner = self.__dict__.get(OWNER_ATTRIBUTE)
        assert owner is not None, "a LoraModel is created by PeftModel, which attaches itself"
        return owner
