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

from typing import NamedTuple

import torch

from .dropout import DropoutDraw, SharedDropout, rebuild, unpack_mask
from .lora_branch import Scale, draw_for, scaled_thin_side
from .lora_node import NodeBase

# Rows of W cast to the adapter dtype at a time when forming P = W Aᵀ from a narrower base
# (bounds the transient copy to this many rows × in).
CAST_ROWS = 1024


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


class DoraBranch(NamedTuple):
    """DoRA as a branch of the fused LoRA node (`ops.lora_node`), for a linear base.

    The node hands `forward` the base output without its bias, x Wᵀ (N, out), and adds the
    bias after; the branch rescales it in place (it is the node's only branch):

        no dropout:  out <- g ⊙ t,                         t = x Wᵀ + s·x Aᵀ Bᵀ
        dropout:     out <- x Wᵀ - x_d Wᵀ + g ⊙ t,         t = x_d Wᵀ + s·x_d Aᵀ Bᵀ

    with g = m / n and x_d = x_kept / (1 - p), running the base once more on x_kept. Tensors
    (the node's autograd inputs): (A, B, m). Saved for backward: u = x_kept Aᵀ (N, r), t (N,
    out) for m's gradient (Σ_N grad ⊙ t / n), and the packed dropout mask.

    Attributes:
        scale: s.
        p: Dropout probability on the branch input (0 outside training).
        n: The detached row norm of W + s·B A, (out,) in the adapter's dtype.
        base: The node's base, to run W on the dropped input (dropout only).
        weight: The base's weight as the node passes it (None for a packed one).
        bias: The base's bias, for `reference` only (the node adds it itself).
        shared: Per-model memo of dropout draws and rebuilt inputs.
        draw: The forward's dropout draw, or None (and in the backward copy).
        seed: The draw's seed (None without dropout).
    """

    scale: Scale
    p: float
    n: torch.Tensor
    base: NodeBase  # the node's base; the branch uses its output and input_grad
    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    shared: SharedDropout | None = None
    draw: DropoutDraw | None = None
    seed: int | None = None

    @property
    def needs_base_without_bias(self) -> bool:
        return True  # g rescales x Wᵀ, not the bias

    @property
    def num_tensors(self) -> int:
        return 3

    def for_backward(self) -> DoraBranch:
        return self._replace(draw=None)

    def forward(
        self, out: torch.Tensor, x2: torch.Tensor, tensors: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        """Rescale `out` = x Wᵀ (N, out) in place into the DoRA output (without bias)."""
        A, B, m = tensors
        g = m.reshape(-1) / self.n  # (out,)
        kept = x2 if self.draw is None else self.draw.x_kept
        u = kept.to(A.dtype) @ A.t()  # (N, r)
        su, alpha = scaled_thin_side(u, self.scale)
        if self.draw is None:
            t = out.to(A.dtype, copy=True).addmm_(su, B.t(), alpha=alpha)
            if out.dtype == t.dtype:
                torch.mul(t, g, out=out)
            else:
                out.copy_(t * g)  # rounded into the base dtype once
            return u, t, torch.empty(0, dtype=torch.bool)
        keep = 1.0 / (1.0 - self.p)
        zd = self.base.output(self.draw.x_kept, self.weight, None)  # (N, out): x_kept Wᵀ
        if out.dtype == A.dtype:
            y = out.sub_(zd, alpha=keep)
            t = zd  # its own tensor: reused
        else:
            y = out.to(A.dtype).sub_(zd.to(A.dtype), alpha=keep)
            t = zd.to(A.dtype)
        t.addmm_(su, B.t(), alpha=alpha).mul_(keep)  # x_d Wᵀ + s·x_d Aᵀ Bᵀ
        y.addcmul_(t, g)
        if y is not out:
            out.copy_(y)
        return u, t, self.draw.saved_mask

    def backward(
        self,
        g: torch.Tensor,
        x2: torch.Tensor,
        tensors: tuple[torch.Tensor, ...],
        saved: tuple[torch.Tensor, ...],
        needs: tuple[bool, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor | None, ...]]:
        """(gradient reaching x Wᵀ: g ⊙ grad without dropout, grad with it; the branch's
        input-gradient; gradients of A, B and m)."""
        A, B, m = tensors
        u, t, saved_mask = saved
        need_x, need_A, need_B, need_m = needs[:4]
        G = g.to(A.dtype)  # the same tensor unless the base runs in another dtype
        factor = m.reshape(-1) / self.n  # g = m / n, (out,)
        Gg = G * factor  # (N, out)
        keep = 1.0 / (1.0 - self.p)
        c = self.scale * keep
        dropped = kept = None
        if self.seed is not None and (need_x or need_A):
            rebuilt = self.shared.rebuild if self.shared is not None else rebuild
            dropped, kept = rebuilt(x2, saved_mask, self.seed)
        grad_x = grad_A = grad_B = grad_m = None
        if need_m:
            grad_m = ((G * t).sum(0) / self.n).reshape(m.shape)
        if need_B:
            grad_B = (u.t() @ Gg).mul_(c).t().contiguous()  # (out, r)
        if need_x or need_A:
            grad_u = (Gg @ B).mul_(c)  # (N, r)
            if need_A:
                grad_A = grad_u.t() @ (x2 if kept is None else kept).to(A.dtype)  # (r, in)
            if need_x:
                grad_x = grad_u @ A  # (N, in)
        if dropped is None:
            return Gg.to(g.dtype), grad_x, (grad_A, grad_B, grad_m)
        if grad_x is not None:  # + (g - 1) ⊙ grad through W on the dropped input
            on_dropped = (G * ((factor - 1) * keep)).to(g.dtype)  # one pass over (N, out)
            grad_x = self.base.input_grad(on_dropped, self.weight, grad_x)
            grad_x.masked_fill_(dropped, 0)
        return g, grad_x, (grad_A, grad_B, grad_m)

    def reference(
        self, result: torch.Tensor, x: torch.Tensor, tensors: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """The DoRA update of `result` (the base module's output for x) by plain autograd,
        with the mask `forward` would get (the same memo); rounded into result's dtype once."""
        A, B, m = tensors
        g = m.reshape(-1) / self.n
        x_lora = x.to(A.dtype)
        draw = draw_for(x, self.p, self.shared)
        on_dropped = None
        if draw is not None:
            dropped = unpack_mask(draw.saved_mask, (x.numel() // x.shape[-1], x.shape[-1]))
            x_kept = x.masked_fill(dropped.view(x.shape), 0)
            x_lora = x_kept.to(A.dtype)
            x2 = x_kept.reshape(-1, x.shape[-1])
            if self.weight is not None:
                x2 = x2.to(self.weight.dtype)
            z = self.base.output(x2, self.weight, None).view(*x.shape[:-1], -1)
            on_dropped = z / (1.0 - self.p)
        lora_out = (x_lora @ A.t()) @ B.t() * (self.scale / (1.0 - self.p))  # (..., out)
        return add_dora_output(result, self.bias, lora_out, g, on_dropped).to(result.dtype)


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
