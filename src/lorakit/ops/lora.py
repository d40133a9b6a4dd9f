"""The LoRA update: y = W x + s · B (A drop(x)), its scale and its dense delta s · B A.

Shapes: x (..., in) viewed as (N, in); A (r, in), B (out, r); u = drop(x) A^T (N, r);
y (..., out). Dropout is inverted: kept inputs are scaled by 1 / (1 - p), which is folded
into the scalar c = s / (1 - p) applied to the (N, r) side, never to a full-size tensor.

The scale is a Python number in eager forwards (a matmul's `alpha`) or a 0-dim tensor under
`torch.compile` (a graph input, so another adapter's scale needs no new graph), which then
multiplies u (N, r) instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .dropout import DropoutDraw, SharedDropout, new_draw, rebuild

# add_base_grad(g, branch_grad) -> g W + branch_grad: the layer's whole input-gradient, made
# by the node that owns the base matmul (in place into branch_grad where the dtypes agree).
AddBaseGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# s or c: a number, or a 0-dim tensor (compiled forwards).
Scale = float | torch.Tensor


def lora_scale(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (rank-stabilised scaling)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _at_least_fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Half-precision tensors as fp32, others unchanged: deltas feed merges, which need fp32."""
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s · B A, shape (out, in), computed in the adapter dtype or fp32 if that is half."""
    A, B = _at_least_fp32(A, B)
    return (B @ A) * scale


def scaled_thin_side(u: torch.Tensor, c: Scale) -> tuple[torch.Tensor, float]:
    """(u', alpha) with alpha · u' = c · u: a number c stays the matmul's alpha; a tensor c
    is multiplied into u (N, r), the small side."""
    if isinstance(c, torch.Tensor):
        return u * c, 1.0
    return u, c


def draw_for(x: torch.Tensor, p: float, shared: SharedDropout | None) -> DropoutDraw | None:
    if p == 0:
        return None
    return new_draw(x, p) if shared is None else shared.draw(x, p)


def rebuild_kept(
    x2: torch.Tensor, saved_mask: torch.Tensor, seed: int, shared: SharedDropout | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return rebuild(x2, saved_mask, seed) if shared is None else shared.rebuild(x2, saved_mask, seed)


class _LoraUpdate(torch.autograd.Function):
    """y = y_base + c · x_kept A^T B^T added to any base output, in one fused addmm.

    Saves x, A, B, the small u and, with dropout, the packed mask; the dropped input is
    rebuilt in backward rather than stored.
    """

    @staticmethod
    def forward(
        ctx: Any,
        result: torch.Tensor,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: Scale,
        p: float,
        draw: DropoutDraw | None,
        shared: SharedDropout | None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        u = (x2 if draw is None else draw.x_kept) @ A.t()  # (N, r)
        c = scale / (1.0 - p)
        cu, alpha = scaled_thin_side(u, c)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), cu, B.t(), alpha=alpha)  # (N, out)
        save_lora_context(ctx, x, A, B, u, draw, c, shared)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        saved = ctx.saved_tensors  # unpack once: checkpointing allows a single unpack
        grad_x, grad_A, grad_B = lora_grads(ctx, saved, grad, need_x, need_A, need_B)
        return grad, grad_x, grad_A, grad_B, None, None, None, None


class _FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + c · x_kept A^T B^T for a dense linear base, as one autograd node.

    Owning the base matmul lets the LoRA term be added into the base output in place and the
    LoRA input-gradient be added into the base input-gradient in place, so the update costs
    only its thin matmuls: no extra full-size tensors and no extra passes over them.

    The branch may run in a wider dtype than the base (fp32 adapters on a bf16 base): x is
    widened for it, and its output and input-gradient are each rounded into the base's once.
    Run apart, that mix would also make an fp32 copy of the whole sum and have autograd widen,
    narrow and add up full-size input-gradients.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: Scale,
        p: float,
        draw: DropoutDraw | None,
        shared: SharedDropout | None,
    ) -> torch.Tensor:
        out, u = dense_lora_forward(x, W, bias, A, B, scale / (1.0 - p), draw)
        save_lora_context(ctx, x, A, B, u, draw, scale / (1.0 - p), shared, W)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_x, need_W, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        saved = ctx.saved_tensors  # unpack once: checkpointing allows a single unpack
        W = saved[-1]

        def add_base_grad(g: torch.Tensor, branch_grad: torch.Tensor) -> torch.Tensor:
            if branch_grad.dtype == g.dtype:
                return branch_grad.addmm_(g, W)
            return (g @ W).add_(branch_grad)  # base dtype, the branch rounded in once

        grad_x, grad_A, grad_B = lora_grads(ctx, saved, grad, need_x, need_A, need_B, add_base_grad)
        g = grad.reshape(-1, grad.shape[-1])
        grad_W = grad_bias = None
        if need_W:
            x = saved[0]
            grad_W = g.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_W, grad_bias, grad_A, grad_B, None, None, None, None


def save_lora_context(
    ctx: Any,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    u: torch.Tensor,
    draw: DropoutDraw | None,
    c: Scale,
    shared: SharedDropout | None,
    W: torch.Tensor | None = None,
) -> None:
    saved_mask = draw.saved_mask if draw is not None else torch.empty(0, dtype=torch.bool)
    extra = () if W is None else (W,)
    ctx.save_for_backward(x, A, B, u, saved_mask, *extra)
    ctx.c, ctx.shared = c, shared
    ctx.seed = draw.seed if draw is not None else None


def lora_grads(
    ctx: Any,
    saved: tuple[torch.Tensor, ...],
    grad: torch.Tensor,
    need_x: bool,
    need_A: bool,
    need_B: bool,
    add_base_grad: AddBaseGrad | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the LoRA term, in the adapter dtype; with `add_base_grad`, grad_x is the
    layer's whole input-gradient (the base's g W added by the owner of the base matmul)."""
    x, A, B, u, saved_mask = saved[:5]
    c, seed = ctx.c, ctx.seed
    g = grad.reshape(-1, grad.shape[-1])  # (N, out)
    g_branch = g.to(A.dtype)  # the same tensor unless the base runs in another dtype
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    grad_x = grad_A = grad_B = None
    dropped = kept = None
    if seed is not None and (need_x or need_A):
        dropped, kept = rebuild_kept(x2, saved_mask, seed, ctx.shared)
    if need_B:  # (out, r), as uᵀg transposed: MKL is faster this way round
        grad_B = (u.t() @ g_branch).mul_(c).t().contiguous()
    if need_x or need_A:
        grad_u = (g_branch @ B).mul_(c)  # (N, r)
        if need_A:
            grad_A = grad_u.t() @ (x2 if kept is None else kept).to(A.dtype)  # (r, in)
        if need_x:
            lora_grad = grad_u @ A  # (N, in)
            if dropped is not None:
                lora_grad.masked_fill_(dropped, 0)
            if add_base_grad is not None:
                lora_grad = add_base_grad(g, lora_grad)  # + g W, the base's input-gradient
            grad_x = lora_grad.view(x.shape)
    return grad_x, grad_A, grad_B


def add_branch(
    out: torch.Tensor,
    x2: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    c: Scale,
    draw: DropoutDraw | None,
) -> torch.Tensor:
    """Add c · x_kept Aᵀ Bᵀ into the base output `out` (N, out) in place; return u = x_kept Aᵀ.

    The branch runs in the adapter dtype (x widened when the base runs narrower; exact, as the
    mask only zeroes entries); a branch in another dtype than `out` is summed in the wider one
    and rounded into `out` once.
    """
    kept = x2 if draw is None else draw.x_kept
    if kept.dtype != A.dtype:
        kept = kept.to(A.dtype)
    u = kept @ A.t()  # (N, r)
    cu, alpha = scaled_thin_side(u, c)
    if out.dtype == u.dtype:
        out.addmm_(cu, B.t(), alpha=alpha)
    else:
        out.add_(cu @ B.t(), alpha=alpha)
    return u


def dense_lora_forward(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    c: Scale,
    draw: DropoutDraw | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x Wᵀ + b + c u Bᵀ in W's dtype, u) with u = x_kept Aᵀ in A's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    out = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())  # (N, out)
    u = add_branch(out, x2, A, B, c, draw)
    return out.view(*x.shape[:-1], out.shape[-1]), u


def needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def add_lora_linear(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: Scale,
    dropout_p: float = 0.0,
    shared: SharedDropout | None = None,
) -> torch.Tensor:
    """Return result + s · drop(x) A^T B^T; without autograd it is written into `result`.

    `result` is the base layer's output for `x`; dropout with probability `dropout_p` applies
    to the LoRA branch's input only (pass 0 outside training). Layers passing the same
    `shared` memo and the same input tensor share one mask.
    """
    if x.dtype != A.dtype or result.dtype != A.dtype:
        return _add_lora_linear_reference(result, x, A, B, scale, dropout_p)
    draw = draw_for(x, dropout_p, shared)
    if needs_graph(result, x, A, B):
        out: torch.Tensor = _LoraUpdate.apply(result, x, A, B, scale, dropout_p, draw, shared)
        return out
    x2 = x.reshape(-1, x.shape[-1])
    u = (x2 if draw is None else draw.x_kept) @ A.t()  # (N, r)
    u, alpha = scaled_thin_side(u, scale / (1.0 - dropout_p))
    if result.is_contiguous():  # no autograd here, so writing into the base output is safe
        result.view(-1, result.shape[-1]).addmm_(u, B.t(), alpha=alpha)
        return result
    out = torch.addmm(result.reshape(-1, result.shape[-1]), u, B.t(), alpha=alpha)
    return out.view(result.shape)


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: Scale,
    dropout_p: float = 0.0,
    shared: SharedDropout | None = None,
) -> torch.Tensor:
    """y = x W^T + b + s · drop(x) A^T B^T for a dense linear base (W: (out, in)).

    x, W and bias share one dtype; A and B share one, the same or wider (fp32 adapters on a
    bf16/fp16 base). Callers use `add_lora_linear` for other mixes and under autocast.
    """
    draw = draw_for(x, dropout_p, shared)
    if needs_graph(x, W, bias, A, B):
        out: torch.Tensor = _FusedLoraLinear.apply(x, W, bias, A, B, scale, dropout_p, draw, shared)
        return out
    return dense_lora_forward(x, W, bias, A, B, scale / (1.0 - dropout_p), draw)[0]


def _add_lora_linear_reference(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: Scale,
    dropout_p: float,
) -> torch.Tensor:
    """Plain-autograd form for mixed dtypes: branch in the adapter dtype, cast back once."""
    x_lora = x.to(A.dtype)
    if dropout_p > 0:
        x_lora = torch.nn.functional.dropout(x_lora, dropout_p, training=True)
    update, alpha = scaled_thin_side(x_lora @ A.t(), scale)  # (N, r)
    # Sum in the wider dtype of the two, then round into the base output's dtype once.
    return torch.add(result, update @ B.t(), alpha=alpha).to(result.dtype)


def add_lora_embedding(
    result: torch.Tensor, indices: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: Scale
) -> torch.Tensor:
    """Return result + s · A^T[indices] B^T.

    Shapes: A (r, num_embeddings), B (dim, r); A^T[indices] is (..., r).
    """
    rows = torch.nn.functional.embedding(indices, A.t())  # (..., r)
    return result + ((rows @ B.t()) * scale).to(result.dtype)


def conv_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = s · B ∘ A for a conv A (r, in, *k) followed by a 1×1 conv B (out, r, 1, ...).

    The composition of a kernel-k conv with a 1×1 conv is one kernel-k conv whose weight is
    ΔW[o, i, *k] = s · Σ_j B[o, j] A[j, i, *k], in fp32 when A and B are half precision.
    """
    A, B = _at_least_fp32(A, B)
    B2 = B.reshape(B.shape[0], B.shape[1])  # (out, r)
    return torch.einsum("oj,j...->o...", B2, A) * scale
