"""`LoraParameter`: LoRA on one parameter of a module that is not a layer lorakit wraps.

Mixture-of-experts blocks in transformers keep their experts as 3-D `nn.Parameter`s
(`mlp.experts.gate_up_proj`, `down_proj`) and index them in their own forward, so there is
no `nn.Linear` whose output a branch could be added to. `LoraConfig.target_parameters` names
such parameters; each gets a `LoraParameter` that runs its module with W + Σ ΔW in place of
W for one call (`torch.func.functional_call`), ΔW being the per-expert delta of
`ops.param_delta`. The module's own parameter is never changed outside merging.

Several parameters of one module are wrapped by nesting, as in PEFT: the wrapper of the
module's first targeted parameter (in registration order) wraps the module, the next one
wraps that wrapper, and so on; each wrapper's `target_module()` is the module itself. The
state-dict keys follow (`experts.lora_A.<name>.weight` for the outermost,
`experts.base_layer.lora_A.<name>.weight` for the next, ...).

As in PEFT, such an adapter has no dropout (the update is on the weight, so no input can be
dropped), no `fan_in_fan_out`, and no per-row adapters (`adapter_names`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import TargetModuleError, UnsupportedOptionError
from ..ops.param_delta import (
    add_delta,
    pad_expert_factors,
    parameter_delta,
    parameter_features,
)
from .base import LoraLayer
from .init import LINEAR_INITS
from .linear import AdapterLinear
from .routing import AdapterRouting, AdapterSlot


class LoraParameter(LoraLayer):
    """A module whose parameter `parameter_name` gets LoRA deltas: W[e] + s · B_e A_e.

    Attributes:
        parameter_name: The name of the adapted parameter in `target_module()`.
        num_experts: E, the first dimension of a 3-D parameter (1 for a 2-D one).
        in_features: The size the adapter's A reads (see `ops.param_delta`).
        out_features: The size the adapter's B writes.
        is_transposed: The 3-D parameter holds (E, in, out) (the module's own
            `is_transposed` attribute, as transformers' experts set it), not (E, out, in).
    """

    init_table = LINEAR_INITS

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting, parameter_name: str) -> None:
        super().__init__(base_layer, routing)
        self.parameter_name = parameter_name
        parameter = self.base_weight()
        if parameter.dim() not in (2, 3):
            raise TargetModuleError(
                f"target_parameters: {parameter_name!r} of {type(self.target_module()).__name__} "
                f"has shape {tuple(parameter.shape)}; LoRA adapts 2-D weights and 3-D stacks of "
                "experts only. Fix: remove it from target_parameters."
            )
        is_transposed = getattr(self.target_module(), "is_transposed", False)
        self.is_transposed = bool(is_transposed) and parameter.dim() == 3
        self.num_experts, self.in_features, self.out_features = parameter_features(
            parameter.shape, self.is_transposed
        )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def target_module(self) -> nn.Module:
        """The model's own module holding the parameter (under any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def base_weight(self) -> torch.Tensor:
        """The adapted parameter itself (merging writes into it)."""
        parameter = self.target_module()._parameters[self.parameter_name]
        assert parameter is not None
        return parameter

    @property
    def weight(self) -> torch.Tensor:
        """The adapted parameter (LoRA's delta not applied)."""
        return self.base_weight()

    # --- adapters --------------------------------------------------------------------------
    def _create_adapter(
        self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        # A (E·r, in), B (out, r·E): one pair covers every expert (ops.param_delta)
        options: dict[str, Any] = {"bias": False, "dtype": dtype, "device": device}
        rank = r * self.num_experts
        self.lora_A[adapter_name] = AdapterLinear(self.in_features, rank, **options)
        self.lora_B[adapter_name] = AdapterLinear(rank, self.out_features, **options)

    def _adapter_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        assert isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)
        return A, B

    def _remove_adapter_tensors(self, adapter_name: str) -> None:
        del self.lora_A[adapter_name]
        del self.lora_B[adapter_name]

    def _adapter_holders(
        self, adapter_name: str
    ) -> tuple[tuple[nn.Module, nn.Module], tuple[str, str]]:
        return (self.lora_A[adapter_name], self.lora_B[adapter_name]), ("weight", "weight")

    @torch.no_grad()
    def pad_adapter_rank(self, adapter_name: str, target_rank: int) -> None:
        """Give an adapter rank `target_rank` per expert by zeros (`ops.param_delta`); ΔW and
        the scale are unchanged, A and B become new parameters (rebuild optimizers)."""
        r = self.r[adapter_name]
        assert target_rank >= r, "callers check that no adapter would shrink"
        A, B = self._adapter_pair(adapter_name)
        padded = pad_expert_factors(A, B, self.num_experts, target_rank)
        A_holder, B_holder = self.lora_A[adapter_name], self.lora_B[adapter_name]
        assert isinstance(A_holder, AdapterLinear) and isinstance(B_holder, AdapterLinear)
        for holder, value in zip((A_holder, B_holder), padded, strict=True):
            old = holder._parameters["weight"]
            assert old is not None
            holder._parameters["weight"] = nn.Parameter(value, requires_grad=old.requires_grad)
        A_holder.out_features = B_holder.in_features = target_rank * self.num_experts
        self.r[adapter_name] = target_rank
        self.refresh_slots()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the parameter's shape (fp32 for half-precision adapters)."""
        A, B = self._adapter_pair(adapter_name)
        shape = self.base_weight().shape
        return parameter_delta(A, B, self.scaling[adapter_name], shape, self.is_transposed)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module with W + Σ ΔW of the acting adapters in place of W (W unchanged)."""
        routing = self.routing
        if routing.row_groups is not None:
            raise UnsupportedOptionError(
                f"adapter_names (one adapter per row) reaches parameter "
                f"{self.parameter_name!r}, adapted through target_parameters, where the "
                "adapter changes the weight for the whole batch, as in PEFT. Fix: run one "
                "adapter per call (set_adapter)."
            )
        slots = () if routing.is_disabled else self.active_slots
        if not slots:
            return self.base_layer(*args, **kwargs)
        W = self.base_weight()
        delta = self._slot_delta(slots[0], W.shape)
        for slot in slots[1:]:
            delta = delta + self._slot_delta(slot, W.shape)
        adapted = add_delta(W, delta.to(W.device))
        return functional_call(self.base_layer, {self._parameter_path(): adapted}, args, kwargs)

    def _slot_delta(self, slot: AdapterSlot, shape: torch.Size) -> torch.Tensor:
        A, B = slot.pair()
        return parameter_delta(A, B, slot.forward_scale(), shape, self.is_transposed)

    def _parameter_path(self) -> str:
        """The parameter's path from `base_layer` (`base_layer.` once per nested wrapper)."""
        parts = []
        module = self.base_layer
        while isinstance(module, LoraParameter):
            parts.append("base_layer")
            module = module.base_layer
        return ".".join([*parts, self.parameter_name])

    def extra_repr(self) -> str:
        return (
            f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}, "
            f"in_features={self.in_features}, out_features={self.out_features}"
        )
