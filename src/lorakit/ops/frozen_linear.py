"""y = x·Wᵀ + b for a weight that takes no gradient, through oneDNN on CPU when that is faster.

`F.linear` runs float32 on CPU through MKL's sgemm. oneDNN's matmul, which PyTorch ships
for its compiled graphs, measured 1.1-1.5x faster on this project's CPU (AMD EPYC with
AVX-512) for the products a frozen base layer runs, and 2x for a 16-row LM head
(`benchmarks/RESULTS.md`, "Frozen base products"). It reads the dense weight as it is, so
nothing is repacked or held twice. The op has no autograd formula: it serves inference and
the hand-written backward passes, where the weight is a constant, and
`linear_with_frozen_weight` gives it one for a constant weight and bias (the input-gradient
only). Tiny products stay on `F.linear`, where oneDNN's fixed cost per call (about 10 µs)
outweighs its speed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# Multiply-adds below which a product stays on F.linear (16 x 512 x 128 and smaller).
MIN_MULTIPLY_ADDS = 1 << 20

OneDnnLinear = Callable[..., torch.Tensor]


@functools.cache
def onednn_linear_op() -> OneDnnLinear | None:
    """torch's oneDNN linear op, or None where this build has no working one (checked once)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op: OneDnnLinear = torch.ops.mkldnn._linear_pointwise
        result = op(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    return op if torch.equal(result, torch.full((2, 4), 3.0)) else None


@functools.cache
def onednn_linear_add_op() -> OneDnnLinear | None:
    """torch's oneDNN linear op with an added tensor fused in (a binary-add post-op), or None
    where this build has no working one (checked once)."""
    if onednn_linear_op() is None:
        return None
    try:
        op: OneDnnLinear = torch.ops.mkldnn._linear_pointwise.binary
        other = torch.arange(8.0).view(2, 4)
        result = op(torch.ones(2, 3), other, torch.ones(4, 3), None, "add")
    except (AttributeError, RuntimeError):
        return None
    return op if torch.equal(result, other + 3.0) else None


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `frozen_linear(x, weight, bias)` takes the oneDNN route."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if weight.dim() != 2 or x.dim() < 2 or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the op has no derivative: autograd must see F.linear
    multiply_adds = x.numel() * weight.shape[0]
    return multiply_adds >= MIN_MULTIPLY_ADDS and onednn_linear_op() is not None


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x·Wᵀ + b: x (..., in), W (out, in) (any strides, e.g. a transpose), b (out,) or None.

    Equal to `F.linear` up to float32 rounding (another summation order).
    """
    op = onednn_linear_op() if uses_onednn(x, weight, bias) else None
    if op is None:
        return F.linear(x, weight, bias)
    return op(x, weight, bias, "none", [], "")


def frozen_linear_add(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ + other as a fresh tensor: x (N, in), W (out, in) (any strides), other (N, out).

    On the oneDNN route the sum happens in the product's epilogue, so `other` is read once
    and no pass over the output follows; elsewhere it is F.linear's output plus `other`.
    """
    op = onednn_linear_add_op() if uses_onednn(x, weight) else None
    fits = other.shape == (*x.shape[:-1], weight.shape[0]) and other.is_contiguous()
    if op is None or not fits or other.dtype != x.dtype:
        return F.linear(x, weight).add_(other)
    return op(x, other, weight, None, "add")


class _FrozenWeightLinear(torch.autograd.Function):
    """x·Wᵀ + b with W and b constants: forward and input-gradient g W both on oneDNN."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return frozen_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return frozen_linear(grad, weight.t()), None, None  # g W; F.linear under create_graph


def linear_with_frozen_weight(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x·Wᵀ + b where W and b take no gradient and x may: `F.linear`'s result up to float32
    rounding, with the forward and the input-gradient on oneDNN where `frozen_linear` would
    take it. F.linear itself runs whenever W or b requires grad, under autocast (which
    F.linear obeys) and while compiling (the compiler picks its own kernels).
    """
    is_constant = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if not is_constant or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return frozen_linear(x, weight, bias)
    if not uses_onednn(x.detach(), weight, bias):
        return F.linear(x, weight, bias)
    output: torch.Tensor = _FrozenWeightLinear.apply(x, weight, bias)
    return output
