"""LoRA on a 4-bit base: the base dequantizes per call, A and B train in full precision.

Importing `lorakit.quant` registers this layer first in the LoRA layer registry, so
`get_peft_model` wraps `QuantLinear` modules (and "all-linear" counts them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers.linear import branch_dtype_fits
from ..layers.packed import LoraPackedLinear
from ..layers.registry import LAYER_REGISTRY, LayerEntry
from ..ops.lora_4bit import lora_linear_4bit
from .linear import QuantLinear


class LoraQuantLinear(LoraPackedLinear):
    """y = dequant(Q) x + b + s · B(A(drop(x))); the packed codes never change.

    `merge_adapter` is refused; `merge_and_unload` returns an `nn.Linear` holding
    dequant(Q) + s·BA (or a new `QuantLinear` with `requantize=True`), see `layers.packed`.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fusable = self._fusable_adapter(x, args, kwargs)
        if fusable is None:
            return super().forward(x, *args, **kwargs)
        adapter_name, A, B = fusable
        base = self._quant_base()
        p = self.lora_dropout_p[adapter_name] if self.training else 0.0
        shared = self.routing.shared_dropout
        dtype = base.config.compute_dtype
        bias = None if base.bias is None else base.bias.to(dtype)  # as QuantLinear computes
        scale = self.scaling[adapter_name]
        return lora_linear_4bit(x, base.quantized, bias, A, B, scale, p, shared)

    def _fusable_adapter(
        self, x: torch.Tensor, args: tuple[Any, ...], kwargs: Any
    ) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """(name, A, B) of the one acting adapter when base and update can run as one fused
        node, else None.

        That needs a plain `QuantLinear` without hooks, x in the compute dtype, the adapter in
        that dtype or fp32 (on a bf16/fp16 compute dtype), and no autocast (which picks
        dtypes per op).
        """
        routing = self.routing
        if routing.is_disabled or routing.row_groups is not None or args or kwargs:
            return None
        acting = self.acting_adapters()
        base = self.base_layer
        if len(acting) != 1 or type(base) is not QuantLinear:
            return None
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        dtype = base.config.compute_dtype
        A, B = self._adapter_pair(acting[0])
        if x.dtype != dtype or not branch_dtype_fits(dtype, A.dtype, B.dtype):
            return None
        return acting[0], A, B

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
