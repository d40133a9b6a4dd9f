"""One fused autograd node for every LoRA linear forward, and its plain-autograd reference.

    y = base(x) + Σ_branches branch(x)        x (..., in) viewed as (N, in), y (..., out)

The node owns the base matmul, so each branch adds its output into the base output in place
and its input-gradient is added into the base's input-gradient in place: a branch costs only
its own (thin) work, with no extra full-size tensor and no extra pass over one. What the node
runs is given by two small protocols; new variants change a branch (or add a base), never the
route.

Base (`ops.lora_bases`: `DenseBase` for `nn.Linear` and transformers' `Conv1D`, `Quant4bitBase`
for a 4-bit NF4/FP4 weight). The node passes the base's `weight` (None for a packed one) and
`bias` as autograd inputs:
    output(x2, weight, bias) -> (N, out), a fresh tensor the node may write into;
    input_grad(g, weight, into) -> g W (N, in), added into `into` (the branches' summed
        input-gradient, or None) in place where the dtypes agree;
    weight_grad(g, x2) -> dL/dW in W's layout (asked only when W requires grad).

Branch (`ops.lora_branch.LoraBranch` for LoRA and `lora_bias`). Its autograd tensors come in
`tensors` (its own `num_tensors` of them, in its order), so every branch is differentiated by
the one node:
    num_tensors: how many of the node's tensors are this branch's;
    needs_base_without_bias: True to receive the base output without its bias (the node adds
        the bias after all branches ran), e.g. DoRA's y = base_nobias · (m/n) + b + ...;
    forward(out, x2, tensors) -> (out, saved): adds the branch into `out` (N, out) in place
        and returns it with the tensors its backward needs (None where it has none); a branch
        that rescales the base output (the node's only branch) may return a fresh tensor
        instead, when keeping the unscaled one for backward saves a pass;
    for_backward() -> the branch as backward needs it (without forward-only tensors, which
        the node would otherwise keep alive until backward);
    backward(g, x2, tensors, saved, needs) -> (g_base, grad_x, grads): the gradient reaching
        the base output (g itself unless forward rescaled `out`), the branch's input-gradient
        (N, in) or None, and the gradients of its tensors; `needs` says which of (x,
        *tensors) need one;
    reference(result, x, tensors) -> the layer's output by plain autograd from the base
        module's output `result` for x: the reference path, and the oracle of `forward`.
Per-row adapters (serving) fit the same shape: a branch whose tensors are stacked adapters
and whose data holds the row indices.

The reference path (each branch's `reference`) is plain autograd on the base module's own
output: the layers run it where the node cannot (autocast, hooks on the base, bases without
a protocol such as bitsandbytes' layers, dtypes the node does not fuse, mixed-adapter
batches), and it is the tests' oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

BranchGrads = tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor | None, ...]]


class NodeBase(Protocol):
    """A base linear map the node runs (see the module docstring)."""

    def output(
        self, x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor: ...

    def input_grad(
        self, g: torch.Tensor, weight: torch.Tensor | None, into: torch.Tensor | None
    ) -> torch.Tensor: ...

    def weight_grad(self, g: torch.Tensor, x2: torch.Tensor) -> torch.Tensor: ...


class NodeBranch(Protocol):
    """A branch the node adds to the base output (see the module docstring)."""

    @property
    def num_tensors(self) -> int: ...

    @property
    def needs_base_without_bias(self) -> bool: ...

    def forward(
        self, out: torch.Tensor, x2: torch.Tensor, tensors: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]: ...

    def for_backward(self) -> NodeBranch: ...

    def backward(
        self,
        g: torch.Tensor,
        x2: torch.Tensor,
        tensors: tuple[torch.Tensor, ...],
        saved: tuple[torch.Tensor | None, ...],
        needs: tuple[bool, ...],
    ) -> BranchGrads: ...

    def reference(
        self, result: torch.Tensor, x: torch.Tensor, tensors: tuple[torch.Tensor, ...]
    ) -> torch.Tensor: ...


def branch_dtype_fits(base_dtype: torch.dtype, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the node can run a branch with these tensors on a base computing in `base_dtype`:
    they share one dtype, the base's own or fp32 on a bf16/fp16 base."""
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        return False
    half = base_dtype in (torch.bfloat16, torch.float16)
    return dtype == base_dtype or (half and dtype == torch.float32)


def needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _split(tensors: Sequence[Any], counts: Sequence[int]) -> list[tuple[Any, ...]]:
    """`tensors` cut into consecutive groups of `counts` items."""
    groups, start = [], 0
    for count in counts:
        groups.append(tuple(tensors[start : start + count]))
        start += count
    return groups


def _forward(
    x: torch.Tensor,
    base: NodeBase,
    branches: Sequence[NodeBranch],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[tuple[torch.Tensor | None, ...]]]:
    """(y (N, out), each branch's saved tensors): base output, branches added in place."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    late_bias = bias is not None and any(b.needs_base_without_bias for b in branches)
    out = base.output(x2, weight, None if late_bias else bias)
    groups = _split(tensors, [b.num_tensors for b in branches])
    saved = []
    for branch, group in zip(branches, groups, strict=True):
        out, kept = branch.forward(out, x2, group)
        saved.append(kept)
    if late_bias:  # out of place: a rescaling branch may keep `out` for its backward
        assert bias is not None
        out = out + bias
    return out, saved


class _LoraNode(torch.autograd.Function):
    """y = base(x) + Σ branch(x) as one node: x, weight, bias and every branch tensor in."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        base: NodeBase,
        branches: tuple[NodeBranch, ...],
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        out, saved = _forward(x, base, branches, weight, bias, tensors)
        ctx.base = base
        ctx.branches = tuple(branch.for_backward() for branch in branches)
        ctx.saved_counts = [len(group) for group in saved]
        ctx.save_for_backward(x, weight, bias, *tensors, *(t for group in saved for t in group))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors  # unpack once: checkpointing allows a single unpack
        x, weight, bias = saved[:3]
        branches: tuple[NodeBranch, ...] = ctx.branches
        counts = [branch.num_tensors for branch in branches]
        tensors = saved[3 : 3 + sum(counts)]
        groups = _split(tensors, counts)
        saved_groups = _split(saved[3 + sum(counts) :], ctx.saved_counts)
        needs = ctx.needs_input_grad
        need_x, need_weight, need_bias = needs[0], needs[3], needs[4]
        g = grad.contiguous().view(-1, grad.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        g_base, grad_x, start = g, None, 5
        tensor_grads: list[torch.Tensor | None] = []
        for branch, group, kept in zip(branches, groups, saved_groups, strict=True):
            branch_needs = (need_x, *needs[start : start + len(group)])
            start += len(group)
            g_branch_base, branch_grad_x, grads = branch.backward(g, x2, group, kept, branch_needs)
            if g_branch_base is not g:
                g_base = g_branch_base  # a rescaling branch is its node's only branch
            if branch_grad_x is not None:
                grad_x = branch_grad_x if grad_x is None else grad_x.add_(branch_grad_x)
            tensor_grads.extend(grads)
        if need_x:
            grad_x = ctx.base.input_grad(g_base, weight, grad_x).view(x.shape)
        grad_weight = ctx.base.weight_grad(g_base, x2) if need_weight else None
        grad_bias = g.sum(0) if need_bias and bias is not None else None
        return grad_x, None, None, grad_weight, grad_bias, *tensor_grads


def lora_forward(
    x: torch.Tensor,
    base: NodeBase,
    branches: tuple[NodeBranch, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    tensors: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """y = base(x) + Σ branch(x), through the node when autograd needs it, else directly.

    x, weight and bias share the base's compute dtype; each branch's tensors pass
    `branch_dtype_fits`. Otherwise, and under autocast, callers run the branches' `reference`.
    """
    if needs_graph(x, weight, bias, *tensors):
        out: torch.Tensor = _LoraNode.apply(x, base, branches, weight, bias, *tensors)
        return out
    result, _ = _forward(x, base, branches, weight, bias, tensors)
    return result.view(*x.shape[:-1], result.shape[-1])
