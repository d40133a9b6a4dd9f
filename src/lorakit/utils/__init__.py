"""Helpers on top of `PeftModel` (PEFT's `peft.utils` names): hotswapping adapter weights
(also under `torch.compile` across ranks), LoftQ factors for an adapter on a 4-bit base, and
returning freed training memory to the system."""

from .compiled_hotswap import prepare_model_for_compiled_hotswap
from .hotswap import hotswap_adapter
from .loftq import replace_lora_weights_loftq
from .memory import release_freed_blocks

__all__ = [
    "hotswap_adapter",
    "prepare_model_for_compiled_hotswap",
    "release_freed_blocks",
    "replace_lora_weights_loftq",
]
