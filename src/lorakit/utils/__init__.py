"""Helpers on top of `PeftModel` (PEFT's `peft.utils` names): hotswapping adapter weights,
and returning freed training memory to the system."""

from .hotswap import hotswap_adapter
from .memory import release_freed_blocks

__all__ = ["hotswap_adapter", "release_freed_blocks"]
