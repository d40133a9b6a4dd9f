"""LoRA on a 4-bit base: the base dequantizes per call, A and B train in full precision.

Importing `lorakit.quant` registers this layer first in the LoRA layer registry, so
`get_peft_model` wraps `QuantLinear` modules (and "all-linear" counts them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MergeError
from ..layers.base import LoraLayer
from ..layers.linear import LoraLinear
from ..layers.registry import LAYER_REGISTRY, LayerEntry
from ..layers.routing import AdapterRouting
from .linear import QuantLinear


class LoraQuantLinear(LoraLinear):
    """y = dequant(Q) x + b + s · B(A(drop(x))); the packed codes never change."""

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting) -> None:
        assert isinstance(base_layer, QuantLinear)
        LoraLayer.__init__(self, base_layer, routing)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def base_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """The compute dtype of the 4-bit base and the device of its codes."""
        base = self.base_layer
        assert isinstance(base, QuantLinear)
        return base.config.compute_dtype, base.weight_packed.device

    def base_weight(self) -> torch.Tensor:
        raise MergeError(
            "Merging into a 4-bit base would re-quantize it and lose the adapter's precision; "
            "keep the adapter unmerged, or load the adapter onto the full-precision base and "
            "merge there."
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized base weight (a fresh tensor; the codes stay as they are)."""
        base = self.base_layer
        assert isinstance(base, QuantLinear)
        return base.dequantize_weight()


def register() -> None:
    """Put the 4-bit layer first in the registry (idempotent)."""
    if not any(entry.type_name == "lorakit.quant.QuantLinear" for entry in LAYER_REGISTRY):
        LAYER_REGISTRY.insert(
            0,
            LayerEntry(
                "lorakit.quant.QuantLinear",
                lambda module: isinstance(module, QuantLinear),
                LoraQuantLinear,
                True,
            ),
        )
