"""DoRA: a learned magnitude per output row times the direction of W + s·B A.

Weight-decomposed LoRA (Liu et al., 2024) writes the adapted weight as

    W' = g ⊙ (W + s·B A),   g = m / n,   n_o = ||W_o + s·(B A)_o||   (one entry per output row)

with m the learned magnitude (`lora_magnitude_vector`) and n the row norm of the adapted
weight, treated as a constant (detached: no gradient flows through it), as the paper's section
4.3 and peft do. For a linear layer (W (out, in), A (r, in), B (out, r), x (N, in)):

    no dropout:     y = b + g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ)
    dropout p > 0:  y = x Wᵀ + b + (g - 1) ⊙ (x_d Wᵀ) + g ⊙ (s·x_d Aᵀ Bᵀ),  x_d = drop(x)

(both the DoRA reference code and peft apply the dropped input to the base weight in the
magnitude term, so training with dropout runs the base matmul on x_d too; in expectation the
two forms agree).

The norm without the dense (out, in) update: with P = W Aᵀ (out, r) and C = A Aᵀ (r, r),

    n_o² = ||W_o||² + 2s·Σ_j B_oj P_oj + s²·Σ_jk B_oj C_jk B_ok,

so a step costs one (out, in, r) product and small ones instead of forming s·B A, its sum
with W and a pass over it. ||W_o||² changes only when W does; callers cache it
(`row_norm_sq`). The small terms are summed in float64, so the expansion's error is that of
P's matmul, not of cancellation between the terms.

Conv weights (out, in, *k) and adapters (A (r, in, *k), B (out, r, 1, ...)) are the same maths
on their (out, in·k) and (out, r) views. An embedding (table W (num, dim), A (r, num),
B (dim, r)) is the linear case of Wᵀ: one norm per embedding dimension.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .dropout import DropoutDraw, SharedDropout, new_draw, rebuild

# Rows of W cast to the adapter dtype at a time when forming P = W Aᵀ from a narrower base
# (bounds the transient copy to this many rows × in).
CAST_ROWS = 1024


class LinearBase(Protocol):
    """A frozen linear base as DoRA's fused node uses it (W (out, in), no bias)."""

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (N, in) -> x2 Wᵀ (N, out), in x2's dtype."""
        ...

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """grad (N, out) -> grad W (N, in), in grad's dtype."""
        ...


class DenseBase:
    """A dense weight stored (out, in), or (in, out) with `fan_in_fan_out` (as Conv1D)."""

    def __init__(self, weight: torch.Tensor, fan_in_fan_out: bool = False) -> None:
        self.weight = weight.t() if fan_in_fan_out else weight  # (out, in) view

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 @ self.weight.t()

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad @ self.weight


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A weight or factor as a matrix of rows: (out, in, *k) -> (out, in·k)."""
    return tensor.reshape(tensor.shape[0], -1)


@torch.no_grad()
def row_norm_sq(W: torch.Tensor) -> torch.Tensor:
    """||W_o||² for each row of W (out, in), float64 (out,), cast a block of rows at a time."""
    return torch.cat([block.double().square().sum(1) for block in W.split(CAST_ROWS)])


@torch.no_grad()
def weight_times_at(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """P = W Aᵀ (out, r) in A's dtype; a narrower W is widened a block of rows at a time."""
    if W.dtype == A.dtype:
        return W @ A.t()
    return torch.cat([block.to(A.dtype) @ A.t() for block in W.split(CAST_ROWS)])


@torch.no_grad()
def weight_norm(
    W_row_norm_sq: torch.Tensor,
    P: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """n_o = ||W_o + s·(B A)_o|| from ||W_o||² (out,), P = W Aᵀ (out, r), A (r, in), B (out, r).

    n² = ||W_o||² + 2s Σ_j B_oj P_oj + s² Σ_jk B_oj (A Aᵀ)_jk B_ok, summed in float64 (a
    negative rounding residue is clamped to 0); returned in A's dtype, without autograd.
    """
    B64 = B.double()
    s = scale.double() if isinstance(scale, torch.Tensor) else float(scale)
    cross = (B64 * P.double()).sum(1)  # (out,)
    gram = (A @ A.t()).double()  # (r, r)
    square = ((B64 @ gram) * B64).sum(1)  # (out,)
    n_sq = W_row_norm_sq.double() + 2 * s * cross + s * s * square
    return n_sq.clamp_min(0).sqrt().to(A.dtype)


@torch.no_grad()
def weight_norm_dense(W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """n_o = ||W_o + ΔW_o|| of (out, in) matrices, in ΔW's dtype (the reference, and merging)."""
    return torch.linalg.vector_norm(W.to(delta.dtype) + delta, dim=1)


def dora_merged(W: torch.Tensor, delta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W' = g ⊙ (W + ΔW) in ΔW's dtype; g is shaped to broadcast over W's output axis."""
    return g * (W.to(delta.dtype) + delta)


def dora_unmerged(W_merged: torch.Tensor, delta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W = W' / g - ΔW in ΔW's dtype: the inverse of `dora_merged` up to rounding."""
    return W_merged.to(delta.dtype) / g - delta


def _scaled(u: torch.Tensor, c: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """(u', alpha) with alpha · u' = c · u (a tensor c is multiplied into the thin side)."""
    if isinstance(c, torch.Tensor):
        return u * c, 1.0
    return u, c


def _draw(x: torch.Tensor, p: float, shared: SharedDropout | None) -> DropoutDraw | None:
    if p == 0:
        return None
    return new_draw(x, p) if shared is None else shared.draw(x, p)


def _dora_forward(
    x2: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    g: torch.Tensor,
    scale: float | torch.Tensor,
    p: float,
    draw: DropoutDraw | None,
    base: LinearBase,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (N, out) in x's dtype, t, u): t = x_d Wᵀ + s·x_d Aᵀ Bᵀ (N, out), u = x_d Aᵀ (N, r).

    The branch runs in A's dtype (x widened, the base outputs widened once); y is rounded into
    x's dtype once. x_d = x without dropout; with it x_d = x_kept / (1 - p).
    """
    z = base.forward(x2)  # (N, out), x's dtype
    if draw is None:
        u = x2.to(A.dtype) @ A.t()  # (N, r)
        t = z.to(A.dtype, copy=True)
        su, alpha = _scaled(u, scale)
        t.addmm_(su, B.t(), alpha=alpha)  # x Wᵀ + s·u Bᵀ
        y = t * g
    else:
        keep = 1.0 / (1.0 - p)
        zd = base.forward(draw.x_kept)  # (N, out): x_kept Wᵀ
        u = draw.x_kept.to(A.dtype) @ A.t()
        y = z.to(A.dtype, copy=True).sub_(zd.to(A.dtype), alpha=keep)  # x Wᵀ - x_d Wᵀ
        t = zd.to(A.dtype, copy=True)
        su, alpha = _scaled(u, scale)
        t.addmm_(su, B.t(), alpha=alpha).mul_(keep)  # x_d Wᵀ + s·x_d Aᵀ Bᵀ
        y.addcmul_(t, g)
    if bias is not None:
        y.add_(bias)
    return y.to(x2.dtype), t, u


class _DoraLinear(torch.autograd.Function):
    """DoRA over a frozen linear base as one node: forward as `dora_linear`, n detached.

    Saves x, A, B, g, u (N, r), t (N, out) for m's gradient and, with dropout, the packed
    mask (the dropped input is rebuilt in backward). The base's input-gradient is taken once
    for g ⊙ grad without dropout, and with dropout once for grad and once for (g - 1) ⊙ grad
    on the dropped input, as the two matmuls of the forward require.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        m: torch.Tensor,
        n: torch.Tensor,
        scale: float | torch.Tensor,
        p: float,
        draw: DropoutDraw | None,
        shared: SharedDropout | None,
        base: LinearBase,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        g = m.reshape(-1) / n  # (out,)
        y, t, u = _dora_forward(x2, bias, A, B, g, scale, p, draw, base)
        mask = draw.saved_mask if draw is not None else torch.empty(0, dtype=torch.bool)
        ctx.save_for_backward(x, A, B, g, n, u, t, mask)
        ctx.scale, ctx.p, ctx.shared, ctx.base = scale, p, shared, base
        ctx.seed = draw.seed if draw is not None else None
        ctx.has_bias, ctx.m_shape = bias is not None, m.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_x, need_bias, need_A, need_B, need_m = ctx.needs_input_grad[:5]
        x, A, B, g, n, u, t, mask = ctx.saved_tensors
        G = grad.reshape(-1, grad.shape[-1])  # (N, out), x's dtype
        Gf = G.to(A.dtype)
        Gg = Gf * g  # (N, out): the gradient reaching x_d Wᵀ + s·x_d Aᵀ Bᵀ, times g
        keep = 1.0 / (1.0 - ctx.p)
        c = ctx.scale * keep  # s / (1 - p): a number, or a 0-dim tensor under compile
        x2 = x.reshape(-1, x.shape[-1])
        kept = dropped = None
        if ctx.seed is not None and (need_x or need_A):
            rebuilt = rebuild if ctx.shared is None else ctx.shared.rebuild
            dropped, kept = rebuilt(x2, mask, ctx.seed)
        grad_m = grad_A = grad_B = grad_x = grad_bias = None
        if need_m:
            grad_m = ((Gf * t).sum(0) / n).reshape(ctx.m_shape)
        if need_B:
            grad_B = (u.t() @ Gg).mul_(c).t().contiguous()  # (out, r)
        if need_x or need_A:
            grad_u = (Gg @ B).mul_(c)  # (N, r)
            if need_A:
                grad_A = grad_u.t() @ (x2 if kept is None else kept).to(A.dtype)  # (r, in)
            if need_x:
                grad_x = _input_grad(ctx.base, G, Gg, Gf, g, grad_u @ A, dropped, keep)
                grad_x = grad_x.view(x.shape)
        if need_bias and ctx.has_bias:
            grad_bias = G.sum(0)
        return grad_x, grad_bias, grad_A, grad_B, grad_m, None, None, None, None, None, None


def _input_grad(
    base: LinearBase,
    G: torch.Tensor,
    Gg: torch.Tensor,
    Gf: torch.Tensor,
    g: torch.Tensor,
    lora_grad: torch.Tensor,
    dropped: torch.Tensor | None,
    keep: float,
) -> torch.Tensor:
    """dL/dx (N, in) in G's dtype, from the branch's (N, in) `lora_grad` in the adapter dtype.

    No dropout: (g ⊙ G) W + lora_grad. Dropout: G W + keep-mask ⊙ ((g - 1) ⊙ G W / (1 - p)
    + lora_grad).
    """
    if dropped is None:
        base_grad = base.input_grad(Gg.to(G.dtype))
        return _sum_into(base_grad, lora_grad)
    dropped_grad = base.input_grad((Gg - Gf).to(G.dtype))  # (g - 1) ⊙ G through W
    lora_grad.add_(dropped_grad.to(lora_grad.dtype), alpha=keep).masked_fill_(dropped, 0)
    return _sum_into(base.input_grad(G), lora_grad)


def _sum_into(base_grad: torch.Tensor, branch_grad: torch.Tensor) -> torch.Tensor:
    """base_grad + branch_grad in base_grad's dtype (a wider branch rounded in once)."""
    if base_grad.dtype == branch_grad.dtype:
        return base_grad.add_(branch_grad)
    return branch_grad.add_(base_grad).to(base_grad.dtype)


def dora_linear(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    scale: float | torch.Tensor,
    base: LinearBase,
    dropout_p: float = 0.0,
    shared: SharedDropout | None = None,
) -> torch.Tensor:
    """DoRA over a frozen linear base (see the module docstring), as one autograd node.

    Args:
        x: (..., in) in the base's dtype; `bias` (out,) in it too, or None.
        A: (r, in) and B: (out, r), in x's dtype or wider (fp32 on a bf16/fp16 base).
        m: The magnitude, out entries (any shape), in A's dtype.
        n: The detached row norm of W + s·B A (out,) in A's dtype (`weight_norm`).
        scale: s, a number or (under `torch.compile`) a 0-dim tensor.
        base: Computes x Wᵀ and grad W for the frozen W (no bias).
        dropout_p: Dropout on the branch's input (pass 0 outside training).
        shared: The model's shared dropout memo (one mask per input tensor), or None.

    Returns:
        y (..., out) in x's dtype.
    """
    draw = _draw(x, dropout_p, shared)
    tensors = (x, bias, A, B, m)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out: torch.Tensor = _DoraLinear.apply(
            x, bias, A, B, m, n, scale, dropout_p, draw, shared, base
        )
        return out
    x2 = x.reshape(-1, x.shape[-1])
    y = _dora_forward(x2, bias, A, B, m.reshape(-1) / n, scale, dropout_p, draw, base)[0]
    return y.view(*x.shape[:-1], y.shape[-1])


def add_dora_output(
    result: torch.Tensor,
    bias: torch.Tensor | None,
    lora_out: torch.Tensor,
    g: torch.Tensor,
    base_on_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference (plain autograd) DoRA update of any layer's output, as peft computes it.

    Args:
        result: The layer's output so far (base output, with bias, plus earlier adapters).
        bias: The base's bias shaped to broadcast over `result`, or None.
        lora_out: s · B A x_d, the plain LoRA branch's output (x_d = dropped input).
        g: m / n shaped to broadcast over `result`'s output axis.
        base_on_dropped: With dropout in training, the base (without bias) applied to x_d;
            None otherwise, when g rescales `result` without its bias.

    Returns:
        result + (g - 1) ⊙ base + g ⊙ lora_out, with base = result - bias or the given
        `base_on_dropped`; computed in the widest of the dtypes, not cast back.
    """
    if base_on_dropped is None:
        base_on_dropped = result if bias is None else result - bias
    return result + (g - 1) * base_on_dropped + g * lora_out
