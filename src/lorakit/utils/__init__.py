"""Helpers on top of `PeftModel` (PEFT's `peft.utils` names): hotswapping adapter weights."""

from .hotswap import hotswap_adapter

__all__ = ["hotswap_adapter"]
