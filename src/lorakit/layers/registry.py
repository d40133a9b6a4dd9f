"""The ordered registry of LoRA layer types: the first entry that accepts a module wraps it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .base import LoraLayer
from .bnb import LoraBnbLinear4bit, is_bnb_linear4bit
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraLinear
from .routing import AdapterRouting


@dataclass(frozen=True)
class LayerEntry:
    """How to wrap one kind of module."""

    type_name: str
    accepts: Callable[[nn.Module], bool]
    wrap: Callable[[nn.Module, AdapterRouting], LoraLayer]
    is_linear: bool = False  # counted by target_modules="all-linear"


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` (a linear map, weight (in, out)); never imports transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def _is_plain_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1


LAYER_REGISTRY: list[LayerEntry] = [
    # before torch.nn.Linear, which it subclasses; bitsandbytes is never imported for it
    LayerEntry("bitsandbytes.nn.Linear4bit", is_bnb_linear4bit, LoraBnbLinear4bit, True),
    LayerEntry("torch.nn.Linear", lambda m: isinstance(m, nn.Linear), LoraLinear, True),
    LayerEntry(
        "transformers.pytorch_utils.Conv1D",
        is_transformers_conv1d,
        lambda module, routing: LoraLinear(module, routing, fan_in_fan_out=True),
        True,
    ),
    LayerEntry("torch.nn.Embedding", lambda m: isinstance(m, nn.Embedding), LoraEmbedding),
    LayerEntry("torch.nn.Conv1d/Conv2d/Conv3d (groups=1)", _is_plain_conv, LoraConv),
]


def lora_layer_class_for(module: nn.Module) -> LayerEntry | None:
    """Return the first registry entry that accepts `module`, or None."""
    for entry in LAYER_REGISTRY:
        if entry.accepts(module):
            return entry
    return None


def supported_type_names() -> list[str]:
    return [entry.type_name for entry in LAYER_REGISTRY]
