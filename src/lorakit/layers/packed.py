"""LoRA around a linear base whose weight is packed (4-bit codes): no dense weight to merge into.

The base runs itself (it dequantizes per call) and the adapters add their branch by the
reference path, unless a subclass gives the fused node a protocol for the base
(`_node_base`, as `quant.lora.LoraQuantLinear` does). Writing s·BA into 4-bit codes would
round most of it away and could not be undone, so `merge_adapter` is refused.
`merge_and_unload` asks `merged_module` instead: the base is dequantized in fp32, the deltas
are added in fp32, and a new module takes the wrapper's place, a dense `nn.Linear` or (with
`requantize`) a fresh 4-bit layer.

Rounding of `merged_module`, against the unmerged layer:
- dense: W' = dequant(Q) + Σ s·BA is formed in fp32 and rounded once into the base's weight
  dtype. With fp32 weights the merged layer computes x W'ᵀ + b, which differs from the
  unmerged x dequant(Q)ᵀ + b + s·(x Aᵀ) Bᵀ only by fp32 rounding (the sums are taken in
  another order). With bf16/fp16 weights add one rounding of W' (half an ulp: relative
  2⁻⁹ in bf16, 2⁻¹¹ in fp16).
- requantized: W' itself is quantized again, so each entry moves by at most the 4-bit step
  bound of its block, half the largest gap between adjacent code values times the block's
  absmax (0.152 · absmax for NF4), plus the 8-bit error of that absmax under double
  quantization. This is the error of quantizing any weight; it is not undone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MergeError
from . import dora
from .base import LoraLayer
from .linear import LoraLinear, NodeOperands
from .lora_bias import bias_delta
from .routing import AdapterRouting


class LoraPackedLinear(LoraLinear):
    """y = base(x) + s · B(A(drop(x))) for a base that stores its weight packed.

    Subclasses say how to read the base: `dequantized_weight` (fp32), `dense_dtype`,
    `base_dtype_and_device`, and how to build a packed layer again (`requantized_module`).
    """

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting) -> None:
        LoraLayer.__init__(self, base_layer, routing)
        self.fan_in_fan_out = False
        self.in_features = int(base_layer.in_features)  # type: ignore[arg-type]
        self.out_features = int(base_layer.out_features)  # type: ignore[arg-type]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # --- what subclasses provide -------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        """The base's dense (out_features, in_features) weight in fp32 (a fresh tensor)."""
        raise NotImplementedError

    def dense_dtype(self) -> torch.dtype:
        """The dtype of a dense layer standing in for the base: the weight's original dtype."""
        raise NotImplementedError

    def requantized_module(self, weight: torch.Tensor) -> nn.Module:
        """A packed layer like the base (same settings and bias) holding `weight` (fp32)."""
        raise NotImplementedError

    def _node_base(self, x: torch.Tensor) -> NodeOperands | None:
        """None: a packed base of unknown layout runs itself (the reference path)."""
        return None

    # --- merging -------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        raise MergeError(
            f"Adapters cannot be merged in place into the 4-bit weight of "
            f"{type(self.base_layer).__name__}: that would re-quantize it, rounding most of "
            "s·BA away, and unmerge could not restore it. Call merge_and_unload() instead "
            "(it returns full-precision nn.Linear layers, or 4-bit ones with "
            "requantize=True), or keep the adapters unmerged."
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized base weight in its original dtype (a fresh tensor)."""
        return self.dequantized_weight().to(self.dense_dtype())

    @torch.no_grad()
    def merged_dense_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """W' = dequant(Q) + Σ s·BA over the named adapters this layer holds, in fp32 (a DoRA
        adapter's g ⊙ (W' + s·BA), see `layers.dora`)."""
        weight = self.dequantized_weight()
        norms = {  # DoRA's, against the base before any adapter is added in (as peft)
            name: dora.weight_norm_of(self, name)
            for name in adapter_names
            if name in self.lora_magnitude_vector
        }
        for adapter_name in adapter_names:
            if adapter_name in norms:
                weight = dora.merged_dense(self, adapter_name, weight, norms[adapter_name])
            elif adapter_name in self.r:
                weight += self.get_delta_weight(adapter_name).to(weight)
        return weight

    def merged_weight_is_finite(self, adapter_name: str) -> bool:
        return bool(torch.isfinite(self.merged_dense_weight([adapter_name])).all())

    @torch.no_grad()
    def merged_module(self, adapter_names: list[str], requantize: bool = False) -> nn.Module:
        """A new layer holding dequant(Q) + Σ s·BA; the wrapper and its base are left as they are.

        Returns an `nn.Linear` in `dense_dtype()` sharing the base's bias parameter (a cast
        copy if its dtype differs; a new one holding bias + Σ s·b with `lora_bias`), or with
        `requantize` a packed layer built like the base.
        See the module docstring for the rounding of each.
        """
        weight = self.merged_dense_weight(adapter_names)
        bias = self._merged_bias(adapter_names)
        if requantize:
            module = self.requantized_module(weight)
            if bias is not getattr(self.base_layer, "bias", None):
                module.register_parameter("bias", bias)  # bias + Σ s·b (lora_bias adapters)
            return module
        dtype = self.dense_dtype()
        # built on meta (no allocation, no random init), then given the merged weight
        linear = nn.Linear(self.in_features, self.out_features, False, "meta", dtype)
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)  # frozen, as before
        if bias is not None and bias.dtype != dtype:
            bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
        linear.register_parameter("bias", bias)  # the base's own parameter when it fits
        return linear

    @torch.no_grad()
    def _merged_bias(self, adapter_names: list[str]) -> nn.Parameter | None:
        """The base's bias parameter itself, or with `lora_bias` adapters among
        `adapter_names` a new one holding bias + Σ s·b (summed in fp32, rounded once)."""
        bias = getattr(self.base_layer, "bias", None)
        assert bias is None or isinstance(bias, nn.Parameter)
        merged = None
        for name in adapter_names:
            delta = bias_delta(self, name) if name in self.r else None
            if delta is not None:
                assert bias is not None, "PeftModel._checked_merge refuses a base without one"
                merged = (bias.detach().float() if merged is None else merged) + delta
        if merged is None or bias is None:
            return bias
        return nn.Parameter(merged.to(bias.dtype), requires_grad=bias.requires_grad)
