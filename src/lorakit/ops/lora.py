"""The LoRA update: y = W x + s · B (A drop(x)), its scale and its dense delta s · B A.

Shapes: x (..., in), A (r, in), B (out, r), u = drop(x) A^T (..., r), y (..., out).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .dropout import draw_seed, drop_mask


def lora_scale(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (rank-stabilised scaling)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s · B A, shape (out, in), computed in the adapter dtype."""
    return (B @ A) * scale


class _LoraLinearUpdate(torch.autograd.Function):
    """y = y_base + c · (x ⊙ m) A^T B^T with c = s / (1 - p), in one fused addmm.

    Saves x (a reference the base usually keeps anyway), A, B, the small u = (x ⊙ m) A^T and
    the dropout seed; the keep-mask m is regenerated once in backward instead of being stored.
    The 1 / (1 - p) rescale is folded into c, so it touches (N, r) values, not (N, in).
    """

    @staticmethod
    def forward(
        ctx: Any,
        result: torch.Tensor,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        p: float,
        seed: int,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dropped = _apply_mask(x2, p, seed)
        u = dropped @ A.t()  # (N, r)
        c = scale / (1.0 - p)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), u, B.t(), alpha=c)  # (N, out)
        ctx.save_for_backward(x, A, B, u)
        ctx.c, ctx.p, ctx.seed = c, p, seed
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, A, B, u = ctx.saved_tensors
        c, p, seed = ctx.c, ctx.p, ctx.seed
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        _, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = (g.t() @ u).mul_(c)  # (out, r)
        if need_x or need_A:
            grad_u = (g @ B).mul_(c)  # (N, r)
            x2 = x.reshape(-1, x.shape[-1])
            dropped = drop_mask(tuple(x2.shape), p, seed, x2.device) if p > 0 else None
            if need_A:
                x_kept = x2 if dropped is None else x2.masked_fill(dropped, 0)
                grad_A = grad_u.t() @ x_kept  # (r, in)
            if need_x:
                grad_x2 = grad_u @ A  # (N, in)
                if dropped is not None:
                    grad_x2.masked_fill_(dropped, 0)
                grad_x = grad_x2.view(x.shape)
        return grad, grad_x, grad_A, grad_B, None, None, None


def _apply_mask(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if p == 0:
        return x2
    return x2.masked_fill(drop_mask(tuple(x2.shape), p, seed, x2.device), 0)


def add_lora_linear(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Return result + s · drop(x) A^T B^T; without autograd it is written into `result`.

    `result` is the base layer's output for `x`; dropout with probability `dropout_p` applies
    to the LoRA branch's input only (pass 0 outside training).
    """
    if x.dtype != A.dtype or result.dtype != A.dtype:
        return _add_lora_linear_reference(result, x, A, B, scale, dropout_p)
    seed = draw_seed() if dropout_p > 0 else 0
    needs_graph = torch.is_grad_enabled() and (
        result.requires_grad or x.requires_grad or A.requires_grad or B.requires_grad
    )
    if needs_graph:
        out: torch.Tensor = _LoraLinearUpdate.apply(result, x, A, B, scale, dropout_p, seed)
        return out
    u = _apply_mask(x.reshape(-1, x.shape[-1]), dropout_p, seed) @ A.t()  # (N, r)
    c = scale / (1.0 - dropout_p)
    if result.is_contiguous():  # no autograd here, so writing into the base output is safe
        result.view(-1, result.shape[-1]).addmm_(u, B.t(), alpha=c)
        return result
    return torch.addmm(result.reshape(-1, result.shape[-1]), u, B.t(), alpha=c).view(result.shape)


def _add_lora_linear_reference(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """Plain-autograd form for mixed dtypes: branch in the adapter dtype, cast back once."""
    x_lora = x.to(A.dtype)
    if dropout_p > 0:
        x_lora = torch.nn.functional.dropout(x_lora, dropout_p, training=True)
    update = (x_lora @ A.t()) @ B.t()
    return result + (update * scale).to(result.dtype)


def add_lora_embedding(
    result: torch.Tensor, indices: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
) -> torch.Tensor:
    """Return result + s · A^T[indices] B^T.

    Shapes: A (r, num_embeddings), B (dim, r); A^T[indices] is (..., r).
    """
    rows = torch.nn.functional.embedding(indices, A.t())  # (..., r)
    return result + ((rows @ B.t()) * scale).to(result.dtype)


def conv_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s · B ∘ A for a conv A (r, in, *k) followed by a 1×1 conv B (out, r, 1, ...).

    The composition of a kernel-k conv with a 1×1 conv is one kernel-k conv whose weight is
    ΔW[o, i, *k] = s · Σ_j B[o, j] A[j, i, *k].
    """
    B2 = B.reshape(B.shape[0], B.shape[1])  # (out, r)
    return torch.einsum("oj,j...->o...", B2, A) * scale


class _FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + c · (x ⊙ m) A^T B^T, for a dense linear base, as one autograd node.

    Owning the base matmul lets the LoRA term be added into the base output in place and the
    LoRA input-gradient be added into the base input-gradient in place, so the update costs
    only its thin matmuls: no extra full-size tensors and no extra passes over them.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        p: float,
        seed: int,
    ) -> torch.Tensor:
        out, u = _fused_forward(x, W, bias, A, B, scale, p, seed)
        ctx.save_for_backward(x, W, A, B, u)
        ctx.c, ctx.p, ctx.seed, ctx.has_bias = scale / (1.0 - p), p, seed, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, W, A, B, u = ctx.saved_tensors
        c, p, seed = ctx.c, ctx.p, ctx.seed
        need_x, need_W, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_W = grad_bias = grad_A = grad_B = None
        if need_B:
            grad_B = (g.t() @ u).mul_(c)  # (out, r)
        if need_W:
            grad_W = g.t() @ x2  # (out, in)
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_x or need_A:
            grad_u = (g @ B).mul_(c)  # (N, r)
            dropped = drop_mask(tuple(x2.shape), p, seed, x2.device) if p > 0 else None
            if need_A:
                x_kept = x2 if dropped is None else x2.masked_fill(dropped, 0)
                grad_A = grad_u.t() @ x_kept  # (r, in)
            if need_x:
                lora_grad = grad_u @ A  # (N, in)
                if dropped is None:
                    grad_x2 = torch.addmm(lora_grad, g, W)  # g W + grad_u A in one pass
                else:
                    grad_x2 = torch.addmm(lora_grad.masked_fill_(dropped, 0), g, W)
                grad_x = grad_x2.view(x.shape)
        return grad_x, grad_W, grad_bias, grad_A, grad_B, None, None, None


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """y = x W^T + b + s · drop(x) A^T B^T for a dense linear base (W: (out, in)).

    All tensors must share one dtype; callers use `add_lora_linear` otherwise.
    """
    seed = draw_seed() if dropout_p > 0 else 0
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, W, bias, A, B)
    )
    if needs_graph:
        out: torch.Tensor = _FusedLoraLinear.apply(x, W, bias, A, B, scale, dropout_p, seed)
        return out
    return _fused_forward(x, W, bias, A, B, scale, dropout_p, seed)[0]


def _fused_forward(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x W^T + b + c u B^T, u) with u = (x ⊙ m) A^T and c = s / (1 - p)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    u = _apply_mask(x2, p, seed) @ A.t()  # (N, r)
    out = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())  # (N, out)
    out.addmm_(u, B.t(), alpha=scale / (1.0 - p))
    return out.view(*x.shape[:-1], out.shape[-1]), u
