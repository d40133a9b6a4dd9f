"""LoRA's scale s, its dense deltas s · B A (linear, conv) and the embedding update.

A linear layer's forward, y = W x + b + s · B (A drop(x)), is the fused node of
`ops.lora_node` with the branch of `ops.lora_branch`. The scale is a Python number in eager
forwards or a 0-dim tensor under `torch.compile` (a graph input, so another adapter's scale
needs no new graph).
"""

from __future__ import annotations

import math

import torch

from .lora_branch import Scale


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
