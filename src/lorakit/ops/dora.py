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
(`row_norm_sq`, summed in float64). The other terms are formed in the adapter's dtype
(float32 at least): P itself carries a float32 matmul's error, of the size of |cross term|·ε,
and summing the terms in float32 adds an error of the same order, (||W_o||² + |cross term| +
square term)·ε, so float64 there would buy nothing (and cost a float64 matmul per layer and
step).

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
from .thin_products import factor_grad, rank_expand

# Rows of W cast to the adapter dtype at a time when forming P = W Aᵀ from a narrower base
# (bounds the transient copy to this many rows × in).
CAST_ROWS = 1024


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A weight or factor as a matrix of rows: (out, in, *k) -> (out, in·k)."""
    return tensor if tensor.dim() == 2 else tensor.reshape(tensor.shape[0], -1)


@torch.no_grad()
def row_norm_sq(W: torch.Tensor) -> torch.Tensor:
    """||W_o||² for each row of W (out, in), float64 (out,), cast a block of rows at a time."""
    return torch.cat([block.double().square().sum(1) for block in W.split(CAST_ROWS)])


def weight_times_at(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """P = W Aᵀ (out, r) in A's dtype; a narrower W is widened a block of rows at a time.
    Run without autograd (the norm it serves is detached)."""
    if W.dtype == A.dtype:
        return W @ A.t()
    return torch.cat([block.to(A.dtype) @ A.t() for block in W.split(CAST_ROWS)])


def weight_norm(
    W_row_norm_sq: torch.Tensor,
    P: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """n_o = ||W_o + s·(B A)_o|| from ||W_o||² (out,), P = W Aᵀ (out, r), A (r, in), B (out, r).

    n² = ||W_o||² + Σ_j B_oj (2s·P + s²·B A Aᵀ)_oj, the cross and square terms in one
    product, in A's dtype or float32 if narrower (see the module docstring); a negative
    rounding residue is clamped to 0; returned in A's dtype. Run without autograd (the norm
    is detached): this runs in every DoRA forward, so it is kept to six small ops.
    """
    dtype = torch.promote_types(A.dtype, torch.float32)
    A_, B_, P_ = (t if t.dtype == dtype else t.to(dtype) for t in (A, B, P))
    gram = A_ @ A_.t()  # (r, r)
    if isinstance(scale, torch.Tensor):  # compiled: s is a graph input, not a number
        s = scale.to(dtype)
        terms = torch.addmm(P_ * (2 * s), B_, gram * (s * s))
    else:
        terms = torch.addmm(P_, B_, gram, beta=2 * scale, alpha=scale * scale)
    n = torch.linalg.vecdot(B_, terms).add_(W_row_norm_sq).clamp_min_(0).sqrt_()  # (out,)
    return n if n.dtype == A.dtype else n.to(A.dtype)


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


def _rescaled(
    out: torch.Tensor, su: torch.Tensor, Bt: torch.Tensor, alpha: float, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, t): t = out + alpha · su Bᵀ summed into out's storage (or, for a narrower out, a
    copy in the adapter's dtype) and y = g ⊙ t, rounded into out's dtype once."""
    if out.dtype == su.dtype:
        t = out.addmm_(su, Bt, alpha=alpha)
        return t * g, t
    t = out.to(su.dtype).addmm_(su, Bt, alpha=alpha)
    return torch.mul(t, g, out=out), t


class DoraBranch(NamedTuple):
    """DoRA as a branch of the fused LoRA node (`ops.lora_node`), for a linear base.

    The node hands `forward` the base output without its bias, x Wᵀ (N, out), and adds the
    bias after; the branch is the node's only branch and rescales it:

        no dropout:  y = g ⊙ t,                           t = x Wᵀ + s·x Aᵀ Bᵀ
        dropout:     y = x Wᵀ - x_d Wᵀ + g ⊙ t,           t = x_d Wᵀ + s·x_d Aᵀ Bᵀ

    with g = m / n and x_d = x_kept / (1 - p), running the base once more on x_kept. Each
    (N, out) tensor is formed in place where the previous one is no longer needed: without
    dropout t is summed into the base output's storage and rescaled there into y (y a new
    tensor only on a narrower base, or where g has zeros); with dropout t is summed into
    x_kept Wᵀ's and y into the base output's. Tensors (the node's
    autograd inputs): (A, B, m). Saved for backward: u = x_kept Aᵀ (N, r), t (N, out) for m's
    gradient (Σ_N grad ⊙ t / n), g (out,) and the packed dropout mask; without dropout (and
    with g nowhere 0) y itself instead of t, t then formed in place and rescaled into y.

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
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """(y, saved): the DoRA output without bias from `out` = x Wᵀ (N, out), which it
        overwrites, and what backward needs."""
        A, B, m = tensors
        g = (m if m.dim() == 1 else m.reshape(-1)) / self.n  # (out,)
        kept = x2 if self.draw is None else self.draw.x_kept
        if kept.dtype != A.dtype:
            kept = kept.to(A.dtype)
        u = kept @ A.t()  # (N, r)
        su, alpha = scaled_thin_side(u, self.scale)
        if self.draw is None:
            if out.dtype == su.dtype and bool(g.all()):
                # y = g ⊙ t formed in t's storage, no second (N, out) tensor: backward reads
                # t ⊙ g from y (grad of m: Σ_N grad ⊙ y / m, as m = g·n).
                y = out.addmm_(su, B.t(), alpha=alpha).mul_(g)
                return y, (u, None, g, None, y)
            y, t = _rescaled(out, su, B.t(), alpha, g)
            return y, (u, t, g, None, None)
        keep = 1.0 / (1.0 - self.p)
        zd = self.base.output(self.draw.x_kept, self.weight, None)  # (N, out): x_kept Wᵀ
        if out.dtype == A.dtype:
            y = out.sub_(zd, alpha=keep)  # x Wᵀ - x_d Wᵀ
        else:  # summed in the adapter's wider dtype, rounded into out once
            zd = zd.to(A.dtype)
            y = out.to(A.dtype).sub_(zd, alpha=keep)
        t = zd.addmm_(su, B.t(), beta=keep, alpha=alpha * keep)  # x_d Wᵀ + s·x_d Aᵀ Bᵀ
        y.addcmul_(t, g)
        if y is not out:
            out.copy_(y)
        return out, (u, t, g, self.draw.saved_mask, None)

    def backward(
        self,
        g: torch.Tensor,
        x2: torch.Tensor,
        tensors: tuple[torch.Tensor, ...],
        saved: tuple[torch.Tensor | None, ...],
        needs: tuple[bool, ...],
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor | None, ...]]:
        """(gradient reaching x Wᵀ: g ⊙ grad without dropout, grad with it; the branch's
        input-gradient; gradients of A, B and m).

        The LoRA factors' gradients take c·g on their thin side: from g ⊙ grad when that is
        formed anyway for the base (no dropout), else from grad with c·g folded into B
        (out, r), so that no other (N, out) tensor is formed for them.
        """
        A, B, m = tensors
        # factor: g = m / n (out,); t (N, out), or y = g ⊙ t with t None (see forward)
        u, t, factor, saved_mask, y = saved
        assert u is not None and factor is not None
        need_x, need_A, need_B, need_m = needs[:4]
        G = g if g.dtype == A.dtype else g.to(A.dtype)  # the adapter's dtype
        keep = 1.0 / (1.0 - self.p)
        c = self.scale * keep
        dropped = kept = None
        if self.seed is not None and (need_x or need_A):
            assert saved_mask is not None
            rebuilt = self.shared.rebuild if self.shared is not None else rebuild
            dropped, kept = rebuilt(x2, saved_mask, self.seed)
        grad_m = spare = None
        if need_m:  # Σ_N grad ⊙ t / n; the product's storage is reused below
            if t is not None:
                spare = G * t  # (N, out)
                grad_m = spare.sum(0).div_(self.n)
            else:  # g·n = m: Σ_N grad ⊙ y / m
                assert y is not None
                spare = G * y
                grad_m = spare.sum(0).div_(m if m.dim() == 1 else m.reshape(-1))
            grad_m = grad_m if m.dim() == 1 else grad_m.reshape(m.shape)
        G_lora: torch.Tensor
        if self.seed is None:
            G_lora = G_base = torch.mul(G, factor, out=spare)  # also the gradient to x Wᵀ
            column: Scale = c
        else:
            G_lora, G_base, column = G, g, factor * c  # c·g on B's rows
        grad_x = grad_A = grad_B = None
        rows = column.view(-1, 1) if isinstance(column, torch.Tensor) else column
        if need_B:
            grad_B = factor_grad(G_lora, u).mul_(rows)  # (out, r)
        if need_x or need_A:
            grad_u = G_lora @ (B * rows)  # (N, r)
            if need_A:
                grad_A = grad_u.t() @ (x2 if kept is None else kept).to(A.dtype)  # (r, in)
            if need_x:
                grad_x = rank_expand(grad_u, A)  # (N, in)
        if dropped is None:
            G_base = G_base if G_base.dtype == g.dtype else G_base.to(g.dtype)
            return G_base, grad_x, (grad_A, grad_B, grad_m)
        if grad_x is not None:  # + (g - 1) ⊙ grad through W on the dropped input
            on_dropped = torch.mul(G, (factor - 1) * keep, out=spare).to(g.dtype)
            grad_x = self.base.input_grad(on_dropped, self.weight, grad_x)
            grad_x.masked_fill_(dropped, 0)
        return G_base, grad_x, (grad_A, grad_B, grad_m)

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
