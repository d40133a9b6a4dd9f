"""LoRA on a 4-bit base: the base dequantizes per call, A and B train in full precision.

Importing `lorakit.quant` registers this layer first in the LoRA layer registry, so
`get_peft_model` wraps `QuantLinear` modules (and "all-linear" counts them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.linear import NodeOperands
from ..layers.packed import LoraPackedLinear
from ..layers.registry import LAYER_REGISTRY, LayerEntry
from ..ops.lora_bases import Quant4bitBase
from .linear import QuantLinear


class LoraQuantLinear(LoraPackedLinear):
    """y = dequant(Q) x + b + s · B(A(drop(x))); the packed codes never change.

    `merge_adapter` is refused; `merge_and_unload` returns an `nn.Linear` holding
    dequant(Q) + s·BA (or a new `QuantLinear` with `requantize=True`), see `layers.packed`.
    """

    def _node_base(self, x: torch.Tensor) -> NodeOperands | None:
        """The 4-bit base for the fused node, or None where the node may not run.

        That needs a plain `QuantLinear` without hooks, x in its compute dtype and no autocast
        (which picks dtypes per op); the bias is cast to the compute dtype, as the base does.
        """
        base = self._modules["base_layer"]
        if type(base) is not QuantLinear or base._forward_hooks or base._forward_pre_hooks:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        dtype = base.config.compute_dtype
        if x.dtype != dtype:
            return None
        bias = None if base.bias is None else base.bias.to(dtype)  # as QuantLinear computes
        return Quant4bitBase(base.quantized), None, bias, dtype

    def _quant_base(self) -> QuantLinear:
        base = self.base_layer
        assert isinstance(base, QuantLinear)
        return base

    def base_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """The compute dtype of the 4-bit base and the device of its codes."""
        base = self._quant_base()
        return base.config.compute_dtype, base.weight_packed.device

    def dequantized_weight(self) -> torch.Tensor:
        return self._quant_base().dequantize_weight(torch.float32)

    def dense_dtype(self) -> torch.dtype:
        """The dtype the weight had before it was quantized (the model's dtype around it)."""
        return self._quant_base().weight_dtype

    def requantized_module(self, weight: torch.Tensor) -> nn.Module:
        """A `QuantLinear` with the base's config and bias, quantized from the fp32 `weight`."""
        base = self._quant_base()
        module = QuantLinear(
            self.in_features,
            self.out_features,
            bias=False,
            config=base.config,
            device="meta",  # set_weight replaces every buffer
        )
        module.set_weight(weight)
        module.weight_dtype = base.weight_dtype  # dequantizes to the model's dtype, as before
        module.bias = base.bias
        return module


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
