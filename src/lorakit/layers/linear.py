"""LoRA around a linear map: `torch.nn.Linear`, or transformers' `Conv1D` (weight (in, out))."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.lora import add_lora_linear, delta_weight, lora_linear
from .base import LoraLayer, module_weight
from .init import LINEAR_INITS
from .routing import AdapterRouting, AdapterSlot


def branch_dtype_fits(base_dtype: torch.dtype, A_dtype: torch.dtype, B_dtype: torch.dtype) -> bool:
    """Whether a fused node can run an adapter's branch on a base computing in `base_dtype`.

    The branch runs in the adapter's dtype: the base's own, or fp32 on a bf16/fp16 base.
    """
    if A_dtype != B_dtype:
        return False
    half = base_dtype in (torch.bfloat16, torch.float16)
    return A_dtype == base_dtype or (half and A_dtype == torch.float32)


FusedOperands = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]


class AdapterLinear(nn.Linear):
    """A bias-free `nn.Linear` for lora_A/lora_B whose weight is allocated, not initialised.

    LoRA's init table fills A and B right after (or a file does), so nn.Linear's own kaiming
    draw would be thrown away: skipping it halves the cost of creating an adapter.
    """

    def reset_parameters(self) -> None:
        """Leave the weight as allocated; `layers.init` (or a load) sets its values."""


class LoraLinear(LoraLayer):
    """y = base(x) + s · B(A(drop(x))); A and B are bias-free `nn.Linear`s in `lora_A`/`lora_B`."""

    init_table = LINEAR_INITS

    def __init__(
        self, base_layer: nn.Module, routing: AdapterRouting, fan_in_fan_out: bool = False
    ) -> None:
        super().__init__(base_layer, routing)
        self.fan_in_fan_out = fan_in_fan_out
        rows, columns = self.base_weight().shape
        self.in_features, self.out_features = (rows, columns) if fan_in_fan_out else (columns, rows)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_adapter(
        self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        options = {"bias": False, "dtype": dtype, "device": device}
        self.lora_A[adapter_name] = AdapterLinear(self.in_features, r, **options)  # type: ignore[arg-type]
        self.lora_B[adapter_name] = AdapterLinear(r, self.out_features, **options)  # type: ignore[arg-type]

    def _adapter_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return module_weight(self.lora_A[adapter_name]), module_weight(self.lora_B[adapter_name])

    def _remove_adapter_tensors(self, adapter_name: str) -> None:
        del self.lora_A[adapter_name]
        del self.lora_B[adapter_name]

    def _adapter_holders(
        self, adapter_name: str
    ) -> tuple[tuple[nn.Module, nn.Module], tuple[str, str]]:
        return (self.lora_A[adapter_name], self.lora_B[adapter_name]), ("weight", "weight")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self.routing
        if routing.is_disabled or routing.row_groups is not None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        slots = self.active_slots
        if not slots:  # merged or absent: the base alone, no added work
            result: torch.Tensor = self.base_layer(x)
            return result
        operands = self._fused_operands(x, slots[0]) if len(slots) == 1 else None
        if operands is not None:
            W, bias, A, B = operands
            p = slots[0].dropout_p if self.training else 0.0
            scale = slots[0].forward_scale()
            return lora_linear(x, W, bias, A, B, scale, p, routing.shared_dropout)
        result = self.base_layer(x)
        for slot in slots:
            result = self._add_slot_output(result, x, slot)
        return result

    def _fused_operands(self, x: torch.Tensor, slot: AdapterSlot) -> FusedOperands | None:
        """(W, bias, A, B) when the fused path (owning the base matmul) may run, else None.

        It needs an exact `nn.Linear` without hooks, no autocast, x in the base's dtype, and
        the adapter in that dtype or, on a bf16/fp16 base, in fp32 (the default there). This
        runs on every forward, so it reads the module tables directly (nn.Module's attribute
        lookup cost more than the checks).
        """
        base = self._modules["base_layer"]
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return None
        if torch.is_autocast_enabled(x.device.type):  # autocast decides dtypes per op
            return None
        W, bias = base._parameters["weight"], base._parameters["bias"]
        A, B = slot.pair()
        assert W is not None
        if x.dtype != W.dtype or (bias is not None and bias.dtype != W.dtype):
            return None
        return (W, bias, A, B) if branch_dtype_fits(W.dtype, A.dtype, B.dtype) else None

    def _add_slot_output(
        self, result: torch.Tensor, x: torch.Tensor, slot: AdapterSlot
    ) -> torch.Tensor:
        A, B = slot.pair()
        p = slot.dropout_p if self.training else 0.0
        shared = self.routing.shared_dropout
        return add_lora_linear(result, x, A, B, slot.forward_scale(), p, shared)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self._adapter_pair(adapter_name)
        delta = delta_weight(A, B, self.scaling[adapter_name])  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
