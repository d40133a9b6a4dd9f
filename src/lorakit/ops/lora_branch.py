"""The LoRA branch of the fused node: s · B (A drop(x)) (+ s · b_B with `lora_bias`).

Shapes: x (N, in); A (r, in); B (out, r); b_B (out,); u = x_kept Aᵀ (N, r). Dropout is
inverted: kept inputs are scaled by 1 / (1 - p), folded into c = s / (1 - p) on the (N, r)
side, never on a full-size tensor. The bias of B is not dropped, so it is scaled by s alone.

The branch runs in the adapter's dtype (x widened when the base runs narrower, exact since the
mask only zeroes entries); a branch in another dtype than the base output is summed in the
wider one and rounded into it once. See `ops.lora_node` for the protocol it implements.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, TypeVar, cast

import torch

from .dropout import DropoutDraw, SharedDropout, new_draw, rebuild, unpack_mask
from .thin_products import factor_grad, rank_expand

# s or c: a number (eager: a matmul's alpha) or a 0-dim tensor (compiled: a graph input).
Scale = float | torch.Tensor
BranchGrads = tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor | None, ...]]


def scaled_thin_side(u: torch.Tensor, c: Scale) -> tuple[torch.Tensor, float]:
    """(u', alpha) with alpha · u' = c · u: a number c stays the matmul's alpha; a tensor c
    is multiplied into u (N, r), the small side."""
    if isinstance(c, torch.Tensor):
        return u * c, 1.0
    return u, c


def draw_for(x: torch.Tensor, p: float, shared: SharedDropout | None) -> DropoutDraw | None:
    """The dropout draw for input x (None without dropout); `shared` memoises it per input."""
    if p == 0:
        return None
    return new_draw(x, p) if shared is None else shared.draw(x, p)


class DrawingBranch(Protocol):
    """A branch `with_draw` can give a draw: LoRA's, or DoRA's (`ops.dora.DoraBranch`)."""

    @property
    def p(self) -> float: ...

    @property
    def shared(self) -> SharedDropout | None: ...

    def _replace(self, *, draw: DropoutDraw | None = ..., seed: int | None = ...) -> Any: ...


BranchT = TypeVar("BranchT", bound=DrawingBranch)


def with_draw(branch: BranchT, x: torch.Tensor) -> BranchT:
    """The branch with its dropout draw for input x made (for the fused node's forward)."""
    draw = draw_for(x, branch.p, branch.shared)
    return branch if draw is None else cast(BranchT, branch._replace(draw=draw, seed=draw.seed))


class LoraBranch(NamedTuple):
    """One adapter's branch: what the fused node adds to the base output, and its gradients.

    Tensors (in `tensors`, the node's autograd inputs): (A, B) or (A, B, b_B) with
    `has_bias`. `draw` holds forward-only data (the kept input) and is dropped from the copy
    the node keeps for backward (`for_backward`), which rebuilds it from the saved mask.

    Attributes:
        scale: s.
        p: Dropout probability on the branch input (0 outside training).
        has_bias: B has a bias (`lora_bias`).
        shared: Per-model memo of dropout draws and rebuilt inputs.
        draw: The forward's draw, or None without dropout (and in the backward copy).
        seed: The draw's seed (None without dropout).
    """

    scale: Scale
    p: float
    has_bias: bool = False
    shared: SharedDropout | None = None
    draw: DropoutDraw | None = None
    seed: int | None = None

    @property
    def needs_base_without_bias(self) -> bool:
        return False  # LoRA adds to the whole base output

    @property
    def num_tensors(self) -> int:
        return 3 if self.has_bias else 2

    def for_backward(self) -> LoraBranch:
        """This branch without its forward-only draw (its seed and memo are kept)."""
        return self._replace(draw=None)

    def forward(
        self, out: torch.Tensor, x2: torch.Tensor, tensors: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """Add c · x_kept Aᵀ Bᵀ (+ s · b_B) into `out` (N, out) in place; return `out` and what
        backward needs: u (N, r) and the packed dropout mask (None without dropout)."""
        A, B = tensors[0], tensors[1]
        kept = x2 if self.draw is None else self.draw.x_kept
        if kept.dtype != A.dtype:
            kept = kept.to(A.dtype)
        u = kept @ A.t()  # (N, r)
        cu, alpha = scaled_thin_side(u, self.scale / (1.0 - self.p))
        bias_term, beta = self._bias_term(tensors)
        if out.dtype == u.dtype:
            out.addmm_(cu, B.t(), alpha=alpha)
            if bias_term is not None:
                out.add_(bias_term, alpha=beta)
        elif bias_term is None:
            out.add_(cu @ B.t(), alpha=alpha)  # summed in the wider dtype, rounded once
        else:
            out.add_(torch.addmm(bias_term, cu, B.t(), beta=beta, alpha=alpha))
        return out, (u, None if self.draw is None else self.draw.saved_mask)

    def _bias_term(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, float]:
        """(b', beta) with beta · b' = s · b_B, or (None, 0) without a bias."""
        if not self.has_bias:
            return None, 0.0
        if isinstance(self.scale, torch.Tensor):
            return tensors[2] * self.scale, 1.0
        return tensors[2], self.scale

    def backward(
        self,
        g: torch.Tensor,
        x2: torch.Tensor,
        tensors: tuple[torch.Tensor, ...],
        saved: tuple[torch.Tensor | None, ...],
        needs: tuple[bool, ...],
    ) -> BranchGrads:
        """(gradient reaching the base output, this branch's input-gradient or None, gradients
        of `tensors`), for the output gradient g (N, out); `needs` = (x, *tensors)."""
        A, B = tensors[0], tensors[1]
        u, saved_mask = saved
        assert u is not None
        need_x, need_A, need_B = needs[:3]
        c = self.scale / (1.0 - self.p)
        g_branch = g.to(A.dtype)  # the same tensor unless the base runs in another dtype
        dropped = kept = None
        if self.seed is not None and (need_x or need_A):
            assert saved_mask is not None
            rebuilt = self.shared.rebuild if self.shared is not None else rebuild
            dropped, kept = rebuilt(x2, saved_mask, self.seed)
        grad_x = grad_A = grad_B = grad_bias = None
        if need_B:
            grad_B = factor_grad(g_branch, u).mul_(c)  # (out, r)
        if need_x or need_A:
            grad_u = (g_branch @ B).mul_(c)  # (N, r)
            if need_A:
                grad_A = grad_u.t() @ (x2 if kept is None else kept).to(A.dtype)  # (r, in)
            if need_x:
                grad_x = rank_expand(grad_u, A)  # (N, in)
                if dropped is not None:
                    grad_x.masked_fill_(dropped, 0)
        if self.has_bias and needs[3]:
            grad_bias = g_branch.sum(0).mul_(self.scale)  # (out,)
        grads = (grad_A, grad_B, grad_bias) if self.has_bias else (grad_A, grad_B)
        return g, grad_x, grads

    def reference(
        self, result: torch.Tensor, x: torch.Tensor, tensors: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """result + the branch's output for x by plain autograd, summed in the wider dtype and
        rounded into result's once, with the mask `forward` would get (the same memo): the
        reference path and the oracle of `forward`. `result` is the base module's output."""
        A, B = tensors[0], tensors[1]
        x_lora = x.to(A.dtype)
        draw = draw_for(x, self.p, self.shared)
        if draw is not None:
            dropped = unpack_mask(draw.saved_mask, (x.numel() // x.shape[-1], x.shape[-1]))
            x_lora = x_lora.masked_fill(dropped.view(x.shape), 0)
        update = (x_lora @ A.t()) @ B.t() * (self.scale / (1.0 - self.p))  # (..., out)
        if self.has_bias:
            update = update + tensors[2] * self.scale
        return torch.add(result, update).to(result.dtype)
