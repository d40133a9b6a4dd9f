"""LoRA layers: wrappers that keep the original module as `base_layer` and hold named adapters."""

from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraLinear
from .modules_to_save import ModulesToSaveWrapper
from .registry import LAYER_REGISTRY, lora_layer_class_for
from .routing import AdapterRouting

__all__ = [
    "LAYER_REGISTRY",
    "AdapterRouting",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSaveWrapper",
    "lora_layer_class_for",
]
