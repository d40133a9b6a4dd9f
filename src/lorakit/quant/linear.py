"""`QuantLinear`: a drop-in for `nn.Linear` whose frozen weight is stored in 4 bits.

The weight lives as buffers (packed codes and block scales), so `state_dict()` saves exactly
the quantized bytes; the forward pass dequantizes it piecewise and multiplies in the compute
dtype (`lorakit.ops.nf4.linear_4bit`). Only the bias is a parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.nf4 import (
    DOUBLE_QUANT_BLOCKSIZE,
    FLOAT_DTYPES,
    Quantized4bit,
    QuantType,
    check_quant_options,
    dequantize_4bit,
    linear_4bit,
    quantize_4bit,
)

# Buffers that hold quantized data: moved between devices but never cast by `module.to(dtype)`.
QUANT_BUFFERS = ("weight_packed", "weight_absmax", "weight_nested_absmax", "weight_offset")


def _zeros(size: int, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    return torch.zeros(size, dtype=dtype, device=device)


@dataclass(frozen=True)
class QuantConfig:
    """How linear weights are quantized and computed.

    Attributes:
        quant_type: "nf4" (NormalFloat4, suited to normally distributed weights) or "fp4".
        blocksize: weights per absmax scale; one of 32, 64, ..., 4096.
        double_quant: store the scales in 8 bits as well (blocks of 256): 0.516 instead of
            0.5625 bytes per weight at blocksize 64.
        compute_dtype: dtype the forward pass dequantizes to and multiplies in
            (torch.float32, torch.bfloat16 or torch.float16); outputs come back in the
            input's dtype.
    """

    quant_type: QuantType = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_quant_options(self.quant_type, self.blocksize)
        if self.compute_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"compute_dtype={self.compute_dtype!r} is not supported; use one of {FLOAT_DTYPES}."
            )
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be True or False, got {self.double_quant!r}.")


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W frozen in 4 bits (NF4/FP4, blockwise absmax, optional double quant).

    Build one from an `nn.Linear` with `QuantLinear.from_linear(linear, config)`. The plain
    constructor makes empty buffers of the right shapes, ready for `load_state_dict`.
    """

    weight_packed: Tensor
    weight_absmax: Tensor
    weight_nested_absmax: Tensor | None
    weight_offset: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: QuantConfig | None = None,
        device: torch.device | str | None = None,
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config if config is not None else QuantConfig()
        self.weight_dtype = weight_dtype
        numel = in_features * out_features
        n_blocks = -(-numel // self.config.blocksize)
        self.register_buffer("weight_packed", _zeros((numel + 1) // 2, torch.uint8, device))
        nested_absmax = offset = None
        if self.config.double_quant:
            absmax = _zeros(n_blocks, torch.uint8, device)
            nested_absmax = _zeros(-(-n_blocks // DOUBLE_QUANT_BLOCKSIZE), torch.float32, device)
            offset = torch.zeros((), dtype=torch.float32, device=device)
        else:
            absmax = _zeros(n_blocks, torch.float32, device)
        self.register_buffer("weight_absmax", absmax)
        self.register_buffer("weight_nested_absmax", nested_absmax)
        self.register_buffer("weight_offset", offset)
        self.bias = nn.Parameter(_zeros(out_features, torch.float32, device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None) -> QuantLinear:
        """Quantize an `nn.Linear`'s weight; its bias parameter is kept as it is (shared)."""
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            config=config,
            device=weight.device,
            weight_dtype=weight.dtype,
        )
        module.set_weight(weight)
        module.bias = linear.bias
        return module

    @property
    def quantized(self) -> Quantized4bit:
        """The buffers as a `Quantized4bit` (no copy)."""
        return Quantized4bit(
            packed=self.weight_packed,
            absmax=self.weight_absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            quant_type=self.config.quant_type,
            blocksize=self.config.blocksize,
            nested_absmax=self.weight_nested_absmax,
            offset=self.weight_offset,
        )

    def set_weight(self, weight: Tensor) -> None:
        """Quantize a dense (out_features, in_features) weight into this layer's buffers."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"Weight of shape {tuple(weight.shape)} does not fit this layer; expected "
                f"{expected}."
            )
        config = self.config
        q = quantize_4bit(weight, config.quant_type, config.blocksize, config.double_quant)
        self.weight_packed = q.packed
        self.weight_absmax = q.absmax
        self.weight_nested_absmax = q.nested_absmax
        self.weight_offset = q.offset
        self.weight_dtype = weight.dtype

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense (out_features, in_features) weight, in `dtype` (default: the original)."""
        return dequantize_4bit(self.quantized, dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight: packed codes plus every scale (bias excluded)."""
        return self.quantized.storage_bytes()

    def forward(self, x: Tensor) -> Tensor:
        compute_dtype = self.config.compute_dtype
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        return linear_4bit(x.to(compute_dtype), self.quantized, bias).to(x.dtype)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuantLinear:
        # Quantized buffers follow device moves but keep their dtypes: `model.half()` must not
        # round the fp32 scales, so a cast is undone from the original values.
        kept = {name: self._buffers[name] for name in QUANT_BUFFERS}
        for name in QUANT_BUFFERS:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(kept)
            raise
        for name, tensor in kept.items():
            if tensor is not None:
                moved = fn(tensor)
                tensor = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
            self._buffers[name] = tensor
        return self

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={config.quant_type}, "
            f"blocksize={config.blocksize}, double_quant={config.double_quant}, "
            f"compute_dtype={config.compute_dtype}"
        )


def _is_skipped(name: str, skip_modules: Sequence[str]) -> bool:
    """True if a skip entry names this module or a module containing it (whole path parts)."""
    parts = name.split(".")
    for entry in skip_modules:
        entry_parts = entry.split(".")
        width = len(entry_parts)
        if any(parts[i : i + width] == entry_parts for i in range(len(parts) - width + 1)):
            return True
    return False


def quantize_model_linears(
    model: nn.Module,
    config: QuantConfig | None = None,
    skip_modules: Sequence[str] = ("lm_head",),
) -> nn.Module:
    """Replace every `nn.Linear` inside `model` by a `QuantLinear`, in place; return `model`.

    Only modules whose type is exactly `nn.Linear` are replaced: subclasses (such as the
    output projection inside `nn.MultiheadAttention`, which reads `.weight` directly) may
    depend on a dense weight.

    Args:
        model: the model to change.
        config: the quantization settings (default `QuantConfig()`: NF4, blocks of 64,
            double quantization, fp32 compute).
        skip_modules: module names kept in full precision. An entry matches whole parts of a
            module's dotted name, so "lm_head" skips `lm_head` and "layers.0" skips every
            module inside `model.layers.0`.

    Raises:
        TypeError: if `skip_modules` is a single string.
        ValueError: if a selected weight cannot be quantized (its dtype or size); the model
            is left unchanged.
    """
    if isinstance(skip_modules, str):
        raise TypeError(
            f"skip_modules must be a sequence of names, got the string {skip_modules!r}; "
            f"write ({skip_modules!r},)."
        )
    config = config if config is not None else QuantConfig()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and type(module) is nn.Linear and not _is_skipped(name, skip_modules)
    ]
    for name, module in targets:
        weight = module.weight
        if weight.dtype not in FLOAT_DTYPES or weight.is_meta or math.prod(weight.shape) == 0:
            raise ValueError(
                f"Cannot quantize {name!r}: its weight is {weight.dtype} on {weight.device} "
                f"with shape {tuple(weight.shape)}; quantization needs a non-empty "
                f"{FLOAT_DTYPES} weight with data. Add it to skip_modules to keep it."
            )
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, QuantLinear.from_linear(module, config))
    return model
