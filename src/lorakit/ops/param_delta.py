"""LoRA on a bare parameter: per-expert deltas of a 2-D weight or a 3-D stack of experts.

A mixture-of-experts layer may keep its E experts' weights as one 3-D parameter W of shape
(E, d1, d2) and multiply by W[e] itself instead of calling an `nn.Linear`. One adapter covers
all experts with two matrices, PEFT's layout:

    A: (E·r, in)    rows expert-major:  A_e = A[e·r:(e+1)·r]        (r, in)
    B: (out, r·E)   columns rank-major: B_e[:, j] = B[:, j·E + e]   (out, r)

    ΔW[e] = s · B_e A_e                 (out, in)  when W[e] is (out, in): y = W[e] x
    ΔW[e] = s · (B_e A_e)ᵀ              (in, out)  when W[e] is (in, out): y = x W[e]
                                                   (a "transposed" stack, e.g. gpt-oss)

so with W of shape (E, d1, d2), in = d2 and out = d1, or in = d1 and out = d2 when
transposed. A 2-D parameter (d1, d2) is one expert used as (out, in): ΔW = s · B A.
"""

from __future__ import annotations

import torch


def parameter_features(shape: torch.Size, is_transposed: bool) -> tuple[int, int, int]:
    """(num_experts, in_features, out_features) of a 2-D or 3-D parameter (see module doc).

    `is_transposed` (the stack holds (E, in, out)) only applies to 3-D parameters.
    """
    if len(shape) == 2:
        out_features, in_features = shape
        return 1, in_features, out_features
    assert len(shape) == 3, "callers check that the parameter is 2-D or 3-D"
    num_experts, d1, d2 = shape
    return (num_experts, d1, d2) if is_transposed else (num_experts, d2, d1)


def expert_factors(
    A: torch.Tensor, B: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split A (E·r, in) and B (out, r·E) into A_e (E, r, in) and B_e (E, out, r)."""
    A_e = A.reshape(num_experts, -1, A.shape[-1])  # (E, r, in): rows expert-major
    B_e = B.reshape(B.shape[0], -1, num_experts).permute(2, 0, 1)  # (E, out, r): rank-major
    return A_e, B_e


def pad_expert_factors(
    A: torch.Tensor, B: torch.Tensor, num_experts: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B of rank r per expert as rank `rank` >= r, every ΔW[e] unchanged.

    Each expert's block of A gets zero rows at its end; B's new columns (ranks r..rank-1 of
    every expert, being rank-major) all go at its end, as zeros.
    """
    A_e = A.reshape(num_experts, -1, A.shape[-1])  # (E, r, in)
    padded_A = A.new_zeros(num_experts, rank, A.shape[-1])
    padded_A[:, : A_e.shape[1]] = A_e
    padded_B = B.new_zeros(B.shape[0], rank * num_experts)  # (out, rank·E)
    padded_B[:, : B.shape[1]] = B
    return padded_A.reshape(num_experts * rank, A.shape[-1]), padded_B


def parameter_delta(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor,
    shape: torch.Size,
    is_transposed: bool,
) -> torch.Tensor:
    """ΔW of a parameter of `shape` (2-D or 3-D), in that shape (see module doc).

    Computed in the factors' dtype, or fp32 when they are half precision (merges and the
    forward's W + ΔW round once into W's dtype).
    """
    if A.dtype in (torch.float16, torch.bfloat16):
        A, B = A.float(), B.float()
    if len(shape) == 2:
        return (B @ A) * scale  # (out, in) = shape
    num_experts = shape[0]
    A_e, B_e = expert_factors(A, B, num_experts)
    delta = torch.bmm(B_e, A_e) * scale  # (E, out, in)
    return delta.transpose(1, 2) if is_transposed else delta


def add_delta(W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + ΔW in W's dtype; the sum is taken in ΔW's (fp32 for a half-precision W) and
    rounded once."""
    if W.dtype == delta.dtype:
        return W + delta
    return (W.to(delta.dtype) + delta).to(W.dtype)
