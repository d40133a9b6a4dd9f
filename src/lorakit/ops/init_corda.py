"""CorDA's math: input covariances, the covariance-oriented SVD of W, and the adapter.

Pure tensor functions. For a layer y = W x (W (out, in)) whose inputs have covariance C
(in, in), CorDA decomposes W C = U diag(S) Vhᵀ and sets V = (Vh C⁻¹)ᵀ, so that
U diag(S) Vᵀ = W C C⁻¹ = W: r of these triplets (the largest for "ipm", the smallest for
"kpm") become the adapter and W loses them, W_res = W - U_r diag(S_r) V_rᵀ. C is damped
(C + λ·mean(diag C)·I, λ doubled from 0.01 until the inverse is accurate) so it inverts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INITIAL_DAMPING = 0.01
# The damped covariance is accepted once ‖C_d C_d⁻¹ - I‖_F is below this.
INVERSE_TOLERANCE = 0.05


@dataclass
class CordaEigens:
    """The r triplets of one layer: W's part that the adapter takes.

    Attributes:
        S_WC: Singular values (r,).
        U_WC: Left vectors (out, r).
        V_WC: Right vectors times C⁻¹, (in, r).
    """

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def sample_covariance(x: torch.Tensor) -> torch.Tensor:
    """xᵀx of one sample's rows x (tokens, in), x first divided by |max(x)| (its largest
    entry, not its largest magnitude), in x's dtype: (in, in)."""
    x = x / x.max().abs()
    return x.t() @ x


def covariance_decomposition(
    W: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All min(out, in) triplets of W C, in float32 (float64 stays float64).

    Args:
        W: The (out, in) base weight.
        C: The (in, in) covariance of the layer's inputs.

    Returns:
        (U (out, k), S (k,), V (in, k)), S descending, with U diag(S) Vᵀ = W up to the
        damping of C.
    """
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dtype)
    C = C.to(dtype)
    identity = torch.eye(C.shape[0], dtype=dtype, device=C.device)
    ones = torch.ones(C.shape[0], dtype=dtype, device=C.device)
    damping = INITIAL_DAMPING
    while True:
        # (1 · mean(diag C)) · λ per entry, summed and rounded in PEFT's order (a contiguous
        # copy of the diagonal): ill-conditioned C amplifies any difference
        damped = C + torch.diag(ones * torch.diag(C).mean() * damping)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, identity).item() < INVERSE_TOLERANCE:
            break
        damping *= 2
    U, S, Vh = torch.linalg.svd(W @ damped, full_matrices=False)  # W C: (out, in)
    V = (Vh @ inverse).t()  # (in, k)
    return U, S, V


def select_triplets(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, r: int, method: str
) -> CordaEigens:
    """The r largest triplets ("ipm") or the r smallest ("kpm"), as copies."""
    assert method in ("ipm", "kpm"), "CordaConfig checks corda_method"
    part = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(S_WC=S[part].clone(), U_WC=U[:, part].clone(), V_WC=V[:, part].clone())


def corda_factors(
    W: torch.Tensor, eigens: CordaEigens, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapter holding the triplets, and the residual base weight.

    With S' = S / s: A = diag(√S') Vᵀ, B = U diag(√S'), so s·B·A = U diag(S) Vᵀ, and
    W_res = W - s·B·A. Computed in float32 (float64 stays float64).

    Args:
        W: The (out, in) base weight.
        eigens: The layer's r triplets.
        scale: The adapter's scale s.

    Returns:
        (A (r, in), B (out, r), W_res (out, in)).
    """
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dtype)
    root = (eigens.S_WC.to(dtype) / scale).sqrt()
    A = root[:, None] * eigens.V_WC.to(dtype).t()  # (r, in)
    B = eigens.U_WC.to(dtype) * root[None, :]  # (out, r)
    return A.contiguous(), B.contiguous(), W - scale * (B @ A)
