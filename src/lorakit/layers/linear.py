"""LoRA around a linear map: `torch.nn.Linear`, or transformers' `Conv1D` (weight (in, out)).

A forward takes one of two routes, readable in `LoraLinear.forward`: the fused node
(`ops.lora_node`) when the base has a node protocol (`_node_base`) and every acting adapter's
tensors fit it, else the plain-autograd reference path (`LoraLayer.forward`, each adapter's
`reference`): autocast, hooks on the base, subclasses of the base type, other dtypes,
mixed-adapter batches, extra arguments.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..ops.dora import DoraBranch
from ..ops.lora import delta_weight
from ..ops.lora_bases import DenseBase
from ..ops.lora_branch import LoraBranch, with_draw
from ..ops.lora_node import NodeBase, branch_dtype_fits, lora_forward
from . import dora
from .base import LoraLayer, module_weight
from .init import LINEAR_INITS
from .routing import AdapterRouting, AdapterSlot

# What the node runs a base with: the base, its weight (None if packed) and bias, its dtype.
NodeOperands = tuple[NodeBase, torch.Tensor | None, torch.Tensor | None, torch.dtype]


def is_exact_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` itself (not a subclass); never imports transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return type(module) is getattr(pytorch_utils, "Conv1D", None)


class AdapterLinear(nn.Linear):
    """A bias-free `nn.Linear` for lora_A/lora_B whose weight is allocated, not initialised.

    LoRA's init table fills A and B right after (or a file does), so nn.Linear's own kaiming
    draw would be thrown away: skipping it halves the cost of creating an adapter.
    """

    def reset_parameters(self) -> None:
        """Leave the weight as allocated; `layers.init` (or a load) sets its values."""


class LoraLinear(LoraLayer):
    """y = base(x) + s · B(A(drop(x))) (+ s · b with `lora_bias`); A and B are `nn.Linear`s in
    `lora_A`/`lora_B`, bias-free but for B's with `lora_bias`."""

    init_table = LINEAR_INITS
    supports_lora_bias = True

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
        options["bias"] = self.lora_bias.get(adapter_name, False)  # lora_bias (`layers.lora_bias`)
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
            return super().forward(x, *args, **kwargs)  # the reference path
        slots = self.active_slots
        if not slots:  # merged or absent: the base alone, no added work
            result: torch.Tensor = self.base_layer(x)
            return result
        operands = self._node_base(x)
        if operands is not None:
            base, weight, bias, dtype = operands
            pairs = [self._slot_branch(slot, operands) for slot in slots]
            fits = all(branch_dtype_fits(dtype, tensors) for _, tensors in pairs)
            if fits and dora.node_fits([branch for branch, _ in pairs], weight):
                branches = tuple(with_draw(branch, x) for branch, _ in pairs)
                tensors = tuple(t for _, slot_tensors in pairs for t in slot_tensors)
                return lora_forward(x, base, branches, weight, bias, tensors)
        return super().forward(x)  # the reference path

    def _node_base(self, x: torch.Tensor) -> NodeOperands | None:
        """What the fused node runs the base with, or None where it may not run.

        It needs an exact `nn.Linear` or `Conv1D` (a subclass may compute otherwise) without
        hooks, no autocast (which decides dtypes per op) and x and the bias in the weight's
        dtype. This runs on every forward, so it reads the module tables directly (nn.Module's
        attribute lookup cost more than the checks).
        """
        base = self._modules["base_layer"]
        if base is None:
            return None
        if type(base) is not nn.Linear and not (self.fan_in_fan_out and is_exact_conv1d(base)):
            return None
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        assert weight is not None
        if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
            return None
        return DenseBase(self.fan_in_fan_out), weight, bias, weight.dtype

    def _slot_branch(
        self, slot: AdapterSlot, operands: NodeOperands | None = None
    ) -> tuple[LoraBranch | DoraBranch, tuple[torch.Tensor, ...]]:
        """The slot's adapter as a branch (no dropout draw yet) and its tensors: (A, B), or
        (A, B, b) when lora_B has a bias (`lora_bias`)."""
        if self.lora_magnitude_vector and slot.adapter_name in self.lora_magnitude_vector:  # DoRA
            return dora.linear_branch(self, slot, operands)  # operands: the node's, or None
        A, B = slot.pair()
        p = slot.dropout_p if self.training else 0.0
        B_bias = slot.holders[1]._parameters.get("bias")
        has_bias = B_bias is not None
        branch = LoraBranch(slot.forward_scale(), p, has_bias, self.routing.shared_dropout)
        return branch, (A, B) if B_bias is None else (A, B, B_bias)

    def _add_slot_output(
        self, result: torch.Tensor, x: torch.Tensor, slot: AdapterSlot
    ) -> torch.Tensor:
        branch, tensors = self._slot_branch(slot)
        return branch.reference(result, x, tensors)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self._adapter_pair(adapter_name)
        delta = delta_weight(A, B, self.scaling[adapter_name])  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
