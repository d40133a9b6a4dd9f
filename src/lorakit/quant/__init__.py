"""Quantized base layers: 4-bit (NF4/FP4) linear weights for QLoRA."""

from .linear import QuantConfig, QuantLinear, quantize_model_linears
from .loading import load_quantized
from .lora import LoraQuantLinear, register

register()

__all__ = [
    "LoraQuantLinear",
    "QuantConfig",
    "QuantLinear",
    "load_quantized",
    "quantize_model_linears",
]
