"""Initial adapters built from the base weight (PiSSA, OLoRA) or from orthogonal halves.

Pure tensor functions. W is the dense (out, in) weight, r the rank and s the adapter's scale;
each returns A (r, in), B (out, r) and, where the method moves part of W into the adapter,
the residual W_res = W - s·B·A, so that W_res + s·B·A = W and the adapted model starts equal
to the base. The work is done in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import torch


def _working_copy(W: torch.Tensor) -> torch.Tensor:
    """W in float32 (or float64 if it is float64), detached from autograd."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    return W.detach().to(dtype)


def pissa_factors(
    W: torch.Tensor, r: int, scale: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: the adapter holds the top-r singular triplets of W.

    With W ≈ U_r diag(S_r) V_rᵀ (the r largest singular values):
    A = diag(√(S_r / s)) V_rᵀ, B = U_r diag(√(S_r / s)), W_res = W - s·B·A.

    Args:
        W: The (out, in) base weight.
        r: Rank of the adapter.
        scale: The adapter's scale s.
        niter: None for the exact SVD (`torch.linalg.svd`); an int N for the randomized SVD
            with N subspace iterations (`torch.svd_lowrank(W, q=r, niter=N)`, which draws
            from torch's global generator).

    Returns:
        (A (r, in), B (out, r), W_res (out, in)), in the working dtype.
    """
    weight = _working_copy(W)
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U_r, S_r, Vh_r = U[:, :r], S[:r], Vh[:r]
    else:
        U_r, S_r, V_r = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh_r = V_r.t()
    root = torch.sqrt(S_r / scale)
    A = root[:, None] * Vh_r  # (r, in)
    B = U_r * root[None, :]  # (out, r)
    return A.contiguous(), B.contiguous(), weight - scale * (B @ A)


def olora_factors(
    W: torch.Tensor, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: the adapter holds the first r columns of W's QR decomposition.

    With W = Q R (Q orthonormal columns, R upper triangular, `torch.linalg.qr`):
    B = Q[:, :r], A = R[:r], W_res = W - s·B·A.

    Args:
        W: The (out, in) base weight.
        r: Rank of the adapter.
        scale: The adapter's scale s.

    Returns:
        (A (r, in), B (out, r), W_res (out, in)), in the working dtype.
    """
    weight = _working_copy(W)
    Q, R = torch.linalg.qr(weight)
    B = Q[:, :r].contiguous()  # (out, r)
    A = R[:r].contiguous()  # (r, in)
    return A, B, weight - scale * (B @ A)


def orthogonal_factors(
    in_features: int, out_features: int, r: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal init: A and B built on complementary rows of a random orthogonal matrix.

    Q is the orthogonal factor of X ~ N(0, 1)^(r×r); its even-indexed rows Q_e = Q[0::2] and
    odd-indexed rows Q_o = Q[1::2] are orthogonal to each other, so with
    G_A ~ N(0, 1)^(in×r/2) and G_B ~ N(0, 1)^(r/2×out):
    A = (G_A Q_e)ᵀ / 10, B = G_Bᵀ Q_o / 10, and B·A = G_Bᵀ Q_o Q_eᵀ G_Aᵀ / 100 = 0.
    Both factors are non-zero while the model starts unchanged. The draws are made in this
    order (X, G_A, G_B) on the CPU in float32.

    Args:
        in_features: Columns of A.
        out_features: Rows of B.
        r: Rank of the adapter; must be even.
        generator: Where the normal draws come from (default: torch's global generator).

    Returns:
        (A (r, in), B (out, r)) in float32.
    """
    assert r % 2 == 0, "LoraConfig checks that the rank is even"
    X = torch.randn(r, r, generator=generator)
    Q, _ = torch.linalg.qr(X)
    G_A = torch.randn(in_features, r // 2, generator=generator)
    G_B = torch.randn(r // 2, out_features, generator=generator)
    A = (G_A @ Q[0::2]).t() / 10.0  # (r, in)
    B = G_B.t() @ Q[1::2] / 10.0  # (out, r)
    return A.contiguous(), B.contiguous()


def mutated_init_delta(
    A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain rank-2r LoRA against the original base, from a trained PiSSA/OLoRA adapter.

    The trained model is W_res + s·B·A with W_res = W - s·B0·A0, that is
    W + s·(B·A - B0·A0) = W + s·[B | -B0]·[A ; A0]: A' = [A ; A0] (rows stacked),
    B' = [B | -B0] (columns side by side). With the scale kept (lora_alpha and r both
    doubled) this adapter on W gives the trained model.

    Args:
        A, B: The trained factors, (r, in) and (out, r).
        A0, B0: The factors at initialisation, same shapes.

    Returns:
        (A' (2r, in), B' (out, 2r)).
    """
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)
