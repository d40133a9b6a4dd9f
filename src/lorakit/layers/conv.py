"""LoRA around `torch.nn.Conv1d/2d/3d`: A is a conv with the base kernel, B a 1×1 conv."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.lora import conv_delta_weight
from . import dora
from .base import LoraLayer, module_weight
from .init import LINEAR_INITS
from .routing import AdapterRouting, AdapterSlot

_ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


class LoraConv(LoraLayer):
    """y = conv(x) + s · B(A(drop(x))), with A reusing the base's kernel, stride and padding."""

    init_table = LINEAR_INITS
    supports_lora_bias = True  # B's bias, added by B itself and scaled with it

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting) -> None:
        super().__init__(base_layer, routing)
        assert isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        self.conv_class: type[_ConvNd] = type(base_layer)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_adapter(
        self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        base = self.base_layer
        assert isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        self.lora_A[adapter_name] = self.conv_class(
            self.in_features,
            r,
            base.kernel_size,  # type: ignore[arg-type]
            stride=base.stride,  # type: ignore[arg-type]
            padding=base.padding,  # type: ignore[arg-type]
            dilation=base.dilation,  # type: ignore[arg-type]
            padding_mode=base.padding_mode,
            bias=False,
            dtype=dtype,
            device=device,
        )
        self.lora_B[adapter_name] = self.conv_class(
            r,
            self.out_features,
            1,
            bias=self.lora_bias.get(adapter_name, False),
            dtype=dtype,
            device=device,
        )

    def _adapter_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return module_weight(self.lora_A[adapter_name]), module_weight(self.lora_B[adapter_name])

    def _remove_adapter_tensors(self, adapter_name: str) -> None:
        del self.lora_A[adapter_name]
        del self.lora_B[adapter_name]

    def _adapter_holders(
        self, adapter_name: str
    ) -> tuple[tuple[nn.Module, nn.Module], tuple[str, str]]:
        return (self.lora_A[adapter_name], self.lora_B[adapter_name]), ("weight", "weight")

    def _add_slot_output(
        self, result: torch.Tensor, x: torch.Tensor, slot: AdapterSlot
    ) -> torch.Tensor:
        if self.lora_magnitude_vector and slot.adapter_name in self.lora_magnitude_vector:
            return dora.conv_output(self, result, x, slot)
        p = slot.dropout_p if self.training else 0.0
        A_conv, B_conv = slot.holders
        x_lora = x.to(slot.pair()[0].dtype)
        if p > 0:
            x_lora = nn.functional.dropout(x_lora, p, training=True)
        update = B_conv(A_conv(x_lora))
        return result + (update * slot.forward_scale()).to(result.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self._adapter_pair(adapter_name)
        return conv_delta_weight(A, B, self.scaling[adapter_name])
