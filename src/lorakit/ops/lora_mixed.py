"""LoRA with fp32 adapters on a bf16/fp16 dense base, fused: y = round(x Wᵀ + b + c · x_kept Aᵀ Bᵀ).

The base matmul runs in the base dtype; the branch runs in the adapter dtype (x is widened
once for it) and its (N, out) result is added into the base output in place, so the sum is
formed in fp32 and rounded into the base dtype once, as in the unfused form. Run apart, the
unfused form also makes an fp32 copy of the whole sum, rounds it back, and in backward has
autograd widen, narrow and add up input-gradients of the full size; this node does none of
that: the branch's input-gradient is added in place into the base's, rounded once.
"""

from __future__ import annotations

from typing import Any

import torch

from .dropout import DropoutDraw, SharedDropout
from .lora import draw_for, rebuild_kept, save_lora_context


def _branch_input(x2: torch.Tensor, draw: DropoutDraw | None, dtype: torch.dtype) -> torch.Tensor:
    """x ⊙ keep in the adapter dtype (exact: the mask only zeroes entries)."""
    return (x2 if draw is None else draw.x_kept).to(dtype)


def _forward(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    c: float,
    draw: DropoutDraw | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x Wᵀ + b + c u Bᵀ as (N, out) in W's dtype, u) with u = x_kept Aᵀ in A's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    u = _branch_input(x2, draw, A.dtype) @ A.t()  # (N, r)
    out = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())
    out.add_(u @ B.t(), alpha=c)  # fp32 sum, rounded once into the base dtype
    return out, u


class _FusedLoraMixed(torch.autograd.Function):
    """The dense half-precision base (frozen) and one full-precision adapter as one node."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        W: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
        p: float,
        draw: DropoutDraw | None,
        shared: SharedDropout | None,
    ) -> torch.Tensor:
        c = scale / (1.0 - p)
        out, u = _forward(x, W, bias, A, B, c, draw)
        save_lora_context(ctx, x, A, B, u, draw, c, shared, W)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        x, A, B, u, saved_mask, W = ctx.saved_tensors  # one unpack (checkpointing)
        c, seed = ctx.c, ctx.seed
        g = grad.reshape(-1, grad.shape[-1])  # (N, out), base dtype
        g_wide = g.to(A.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        dropped = kept = None
        if seed is not None and (need_x or need_A):
            dropped, kept = rebuild_kept(x2, saved_mask, seed, ctx.shared)
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = (u.t() @ g_wide).mul_(c).t().contiguous()  # (out, r)
        if need_x or need_A:
            grad_u = (g_wide @ B).mul_(c)  # (N, r)
            if need_A:
                grad_A = grad_u.t() @ (x2 if kept is None else kept).to(A.dtype)  # (r, in)
            if need_x:
                lora_grad = grad_u @ A  # (N, in), adapter dtype
                if dropped is not None:
                    lora_grad.masked_fill_(dropped, 0)
                base_grad = g @ W  # (N, in), base dtype
                grad_x = base_grad.add_(lora_grad).view(x.shape)  # rounded once
        return grad_x, grad_A, grad_B, None, None, None, None, None, None


def lora_linear_mixed(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    shared: SharedDropout | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ with x, W, b in one (half) dtype and A, B in another.

    W and b are frozen here (no gradient is returned for them): callers fall back to the
    unfused form when they train.
    """
    draw = draw_for(x, dropout_p, shared)
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        out: torch.Tensor = _FusedLoraMixed.apply(x, A, B, W, bias, scale, dropout_p, draw, shared)
        return out
    result, _ = _forward(x, W, bias, A, B, scale / (1.0 - dropout_p), draw)
    return result.view(*x.shape[:-1], W.shape[0])
