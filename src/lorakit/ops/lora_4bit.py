"""LoRA fused with a frozen 4-bit base: y = x dequant(Q)ᵀ + b + c · x_kept Aᵀ Bᵀ as one node.

Run apart, the 4-bit base and the LoRA update each make a full-size tensor: the update adds
into a copy of the base output, and in backward each returns its own input-gradient, which
autograd then sums into a third. Owning both lets the update be added into the base output
in place and the base's input-gradient be accumulated into the LoRA one, one decoded piece
of the weight at a time; this is what keeps QLoRA's training transient small.
"""

from __future__ import annotations

from typing import Any

import torch

from .dropout import DropoutDraw, SharedDropout
from .lora import add_branch, draw_for, lora_grads, needs_graph, save_lora_context
from .nf4 import Quantized4bit, linear_4bit_forward, linear_4bit_input_grad


def _forward(
    x: torch.Tensor,
    q: Quantized4bit,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    c: float,
    draw: DropoutDraw | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x dequant(Q)ᵀ + b + c u Bᵀ as (N, out), u) with u = x_kept Aᵀ."""
    x2 = x.reshape(-1, x.shape[-1])
    out = linear_4bit_forward(x2, q, bias)
    return out, add_branch(out, x2, A, B, c, draw)


class _FusedLora4bit(torch.autograd.Function):
    """The 4-bit base and one adapter as a single autograd node (Q frozen, bias optional)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        q: Quantized4bit,
        scale: float,
        p: float,
        draw: DropoutDraw | None,
        shared: SharedDropout | None,
    ) -> torch.Tensor:
        c = scale / (1.0 - p)
        out, u = _forward(x, q, bias, A, B, c, draw)
        save_lora_context(ctx, x, A, B, u, draw, c, shared)
        ctx.q, ctx.has_bias = q, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_x, need_bias, need_A, need_B = ctx.needs_input_grad[:4]
        saved = ctx.saved_tensors  # unpack once: checkpointing allows a single unpack
        grad = grad.contiguous()
        q = ctx.q

        def add_base_grad(g: torch.Tensor, branch_grad: torch.Tensor) -> torch.Tensor:
            if branch_grad.dtype == g.dtype:
                return linear_4bit_input_grad(g, q, into=branch_grad)
            return linear_4bit_input_grad(g, q).add_(branch_grad)  # rounded in once

        grad_x, grad_A, grad_B = lora_grads(ctx, saved, grad, need_x, need_A, need_B, add_base_grad)
        grad_bias = None
        if need_bias and ctx.has_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, grad_A, grad_B, None, None, None, None, None


def lora_linear_4bit(
    x: torch.Tensor,
    q: Quantized4bit,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    shared: SharedDropout | None = None,
) -> torch.Tensor:
    """y = x dequant(Q)ᵀ + b + s · drop(x) Aᵀ Bᵀ, computed in x's dtype (bias in it too).

    A and B share x's dtype or, on bf16/fp16 compute, are fp32: the branch then runs in fp32
    and is rounded into the output (and its input-gradient into x's) once.

    Q is a frozen 2-D quantized weight (out, in); it is dequantized a piece of rows at a time
    in forward and again in backward, as `linear_4bit` does.
    """
    draw = draw_for(x, dropout_p, shared)
    if needs_graph(x, bias, A, B):
        out: torch.Tensor = _FusedLora4bit.apply(x, bias, A, B, q, scale, dropout_p, draw, shared)
        return out
    result, _ = _forward(x, q, bias, A, B, scale / (1.0 - dropout_p), draw)
    return result.view(*x.shape[:-1], q.shape[0])
