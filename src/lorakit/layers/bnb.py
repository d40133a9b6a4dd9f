"""LoRA around bitsandbytes' 4-bit `Linear4bit` (what transformers' `BitsAndBytesConfig` makes).

bitsandbytes is never imported to decide whether a module is one of its layers (the registry
looks the class up in an already imported `bitsandbytes.nn`), so lorakit's import time does
not pay for it. The base runs its own 4-bit matmul; the adapters add their branch in their
own dtype (fp32 by default) as in `LoraLinear`. Merging follows `layers.packed`, reading the
weight with bitsandbytes' own dequantization.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from .packed import LoraPackedLinear


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes `Linear4bit` (only checked once bitsandbytes is imported)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    linear4bit = getattr(bnb_nn, "Linear4bit", None)
    return linear4bit is not None and isinstance(module, linear4bit)


class LoraBnbLinear4bit(LoraPackedLinear):
    """y = Linear4bit(x) + s · B(A(drop(x))); the 4-bit weight never changes."""

    def _base(self) -> Any:
        return self.base_layer

    def base_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """The base's compute dtype (until a forward sets it: the weight's original dtype)."""
        base = self._base()
        state = base.weight.quant_state  # None until bitsandbytes quantizes the weight
        dtype = base.compute_dtype or (base.weight.dtype if state is None else state.dtype)
        return dtype, base.weight.device

    def dense_dtype(self) -> torch.dtype:
        dtype: torch.dtype = self._quant_state().dtype
        return dtype

    def _quant_state(self) -> Any:
        """The weight's quantization state, in bitsandbytes' standard layout.

        On CPUs with AVX512-BF16, an inference forward repacks the weight in place into a
        kernel layout (bf16 scales); bitsandbytes converts it back the same way before saving
        a state dict, and so do we before reading the weight.
        """
        weight = self._base().weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return weight.quant_state

    def dequantized_weight(self) -> torch.Tensor:
        """bitsandbytes' dequantization of the weight, products formed and kept in fp32."""
        from bitsandbytes.functional import dequantize_4bit

        state = copy.copy(self._quant_state())
        state.dtype = torch.float32  # the output dtype of the dequantization only
        weight: torch.Tensor = dequantize_4bit(self._base().weight.data, state)
        return weight.reshape(self.out_features, self.in_features)

    def requantized_module(self, weight: torch.Tensor) -> nn.Module:
        """A `Linear4bit` with the base's settings and bias, quantized by bitsandbytes from the
        merged weight rounded to the weight's original dtype (as bitsandbytes stores it)."""
        import bitsandbytes as bnb

        base = self._base()
        state = self._quant_state()
        module = bnb.nn.Linear4bit(
            self.in_features,
            self.out_features,
            bias=False,
            compute_dtype=base.compute_dtype,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=base.weight.quant_storage,
            device="meta",
        )
        unquantized: Any = bnb.nn.Params4bit(
            weight.to(state.dtype),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=base.weight.quant_storage,
            module=module,
        )
        module.weight = unquantized.to(base.weight.device)  # moving it quantizes it
        module.bias = base.bias
        return module
