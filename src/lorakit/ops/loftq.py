"""LoftQ: a 4-bit weight plus a rank-r correction that together approximate the original weight.

Plain quantization leaves the error W − dequant(Q). LoftQ (Li et al., 2023) starts the LoRA
adapter at the best rank-r fit of that error, so that the quantized model with its adapter is
close to the full-precision one before training starts. It alternates two steps:

    Q_k = quantize(W − s · B_{k−1} A_{k−1})      (Q_1 = quantize(W))
    s · B_k A_k = best rank-r fit of W − dequant(Q_k)      (truncated SVD)

The error after step k is ‖W − dequant(Q_k) − s · B_k A_k‖_F, the norm of the singular values
left out by the truncation. The quantizer (nearest code under a blockwise absmax scale) does not
minimise that error exactly, so a later step can in rare cases be a little worse; the result is
the step with the smallest error, which makes more iterations never worse.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .nf4 import FLOAT_DTYPES, Quantized4bit, QuantType, dequantize_4bit, quantize_4bit

# The SVD runs in fp32: residuals of 4-bit quantization are ~1e-1 of the weight, far above
# fp32's rounding, and fp64 would double the temporary memory of each layer.
SVD_DTYPE = torch.float32


@dataclass(frozen=True)
class LoftQResult:
    """The output of `loftq_decompose`: W ≈ dequant(quantized) + scale · B A.

    Attributes:
        quantized: The 4-bit weight, in the layout `QuantLinear` stores (its `dtype` is W's).
        A: (r, in) fp32.
        B: (out, r) fp32.
        errors: ‖W − dequant(Q_k) − s · B_k A_k‖_F after each iteration k (computed in fp64
            from the singular values); the result is the iteration with the smallest one.
        quantization_error: ‖W − dequant(quantize(W))‖_F, the error without the correction.
    """

    quantized: Quantized4bit
    A: Tensor
    B: Tensor
    errors: tuple[float, ...]
    quantization_error: float

    @property
    def error(self) -> float:
        """‖W − (dequant(Q) + s · B A)‖_F of the returned result."""
        return min(self.errors)


def low_rank_fit(R: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, float]:
    """Best rank-r fit of R (Eckart–Young), split into LoRA factors with the scale divided out.

    Formula: R = U diag(σ) Vᵀ; B = U_r diag(√σ_r) / √s (out, r); A = diag(√σ_r) V_rᵀ / √s
    (r, in); then s · B A = U_r diag(σ_r) V_rᵀ. When r exceeds min(out, in), the extra rows
    of A and columns of B are zero.

    Args:
        R: (out, in) residual; read in `SVD_DTYPE`.
        r: rank of the fit.
        scale: the LoRA scale s (> 0).

    Returns:
        (A (r, in), B (out, r), ‖R − s · B A‖_F) with A and B in `SVD_DTYPE`; the error is
        the fp64 norm of the singular values left out.
    """
    out_features, in_features = R.shape
    U, S, Vh = torch.linalg.svd(R.to(SVD_DTYPE), full_matrices=False)
    k = min(r, S.numel())
    root = S[:k].sqrt()  # (k,)
    A = R.new_zeros(r, in_features, dtype=SVD_DTYPE)
    B = R.new_zeros(out_features, r, dtype=SVD_DTYPE)
    A[:k] = (root[:, None] * Vh[:k]) / math.sqrt(scale)  # (k, in)
    B[:, :k] = (U[:, :k] * root[None, :]) / math.sqrt(scale)  # (out, k)
    error = float(S[k:].double().square().sum().sqrt())
    return A, B, error


@torch.no_grad()
def loftq_decompose(
    W: Tensor,
    r: int,
    scale: float,
    num_iter: int = 1,
    quant_type: QuantType = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> LoftQResult:
    """Quantize W to 4 bits and fit a rank-r correction: W ≈ dequant(Q) + s · B A.

    Q is made by `ops.nf4.quantize_4bit`, the quantizer `QuantLinear` uses, so its bytes are
    what a `QuantLinear` holds. Temporary memory is a few copies of W in fp32.

    Args:
        W: (out, in) weight in fp32, bf16 or fp16; read, never changed.
        r: LoRA rank (>= 1).
        scale: LoRA scale s (lora_alpha / r, or / √r with rsLoRA); > 0.
        num_iter: alternating quantize / fit iterations (>= 1).
        quant_type: "nf4" or "fp4".
        blocksize: values per absmax scale.
        double_quant: store the scales in 8 bits as well.

    Returns:
        The `LoftQResult` of the iteration with the smallest error.

    Raises:
        ValueError: for a W that is not a non-empty 2-D floating tensor, r < 1, scale <= 0,
            num_iter < 1, or quantization options `quantize_4bit` rejects.
    """
    if W.dim() != 2 or W.numel() == 0 or W.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"loftq_decompose needs a non-empty 2-D weight in {FLOAT_DTYPES}; got shape "
            f"{tuple(W.shape)} and dtype {W.dtype}."
        )
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r}: the rank must be an int >= 1.")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r}: the LoRA scale must be a finite number > 0.")
    if not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter={num_iter!r}: must be an int >= 1.")
    weight = W.detach().to(torch.float32)  # no copy when W is already fp32
    target = weight
    best: tuple[Quantized4bit, Tensor, Tensor] | None = None
    errors: list[float] = []
    quantization_error = math.nan
    for step in range(num_iter):
        q = quantize_4bit(target, quant_type, blocksize, double_quant)
        residual = weight - dequantize_4bit(q, torch.float32)  # (out, in)
        if step == 0:
            quantization_error = float(residual.double().norm())
        A, B, error = low_rank_fit(residual, r, scale)
        del residual
        errors.append(error)
        if error <= min(errors):
            best = (q, A, B)
        if step + 1 < num_iter:
            target = torch.addmm(weight, B, A, alpha=-scale)  # W − s · B A
    assert best is not None
    q, A, B = best
    q = dataclasses.replace(q, dtype=W.dtype)
    return LoftQResult(q, A, B, tuple(errors), quantization_error)
