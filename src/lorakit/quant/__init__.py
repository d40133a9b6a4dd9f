"""Quantized base layers: 4-bit (NF4/FP4) linear weights for QLoRA."""

from .linear import QuantConfig, QuantLinear, quantize_model_linears

__all__ = ["QuantConfig", "QuantLinear", "quantize_model_linears"]
