"""ops.init_corda against the hand computation in float64: the covariance-oriented SVD
reconstructs W, ipm / kpm keep the largest / smallest triplets, and the adapter plus the
residual give W back."""

from __future__ import annotations

import torch

from lorakit.ops.init_corda import (
    corda_factors,
    covariance_decomposition,
    sample_covariance,
    select_triplets,
)

# float64 products and an inverse of a well-conditioned 5 x 5 matrix.
EXACT_TOL = 1e-10


def _weight_and_covariance() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    x = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    return W, x.t() @ x / 20


def test_sample_covariance_divides_by_the_largest_entry_not_magnitude() -> None:
    x = torch.tensor([[-4.0, 1.0], [2.0, -1.0]], dtype=torch.float64)  # max 2, max |.| 4
    y = x / 2.0
    torch.testing.assert_close(sample_covariance(x), y.t() @ y, atol=EXACT_TOL, rtol=0)


def test_covariance_decomposition_rebuilds_w_and_orients_by_w_c() -> None:
    W, C = _weight_and_covariance()
    U, S, V = covariance_decomposition(W, C)
    torch.testing.assert_close(U @ torch.diag(S) @ V.t(), W, atol=EXACT_TOL, rtol=0)
    damped = C + torch.eye(5, dtype=torch.float64) * torch.diagonal(C).mean() * 0.01
    _, expected_S, _ = torch.linalg.svd(W @ damped)
    torch.testing.assert_close(S, expected_S, atol=EXACT_TOL, rtol=0)


def test_ipm_keeps_the_largest_and_kpm_the_smallest_triplets() -> None:
    U, S, V = covariance_decomposition(*_weight_and_covariance())
    ipm = select_triplets(U, S, V, 2, "ipm")
    kpm = select_triplets(U, S, V, 2, "kpm")
    assert torch.equal(ipm.S_WC, S[:2]) and torch.equal(kpm.S_WC, S[-2:])
    assert torch.equal(ipm.U_WC, U[:, :2]) and torch.equal(kpm.V_WC, V[:, -2:])


def test_factors_hold_the_triplets_and_the_residual_gives_w_back() -> None:
    W, C = _weight_and_covariance()
    eigens = select_triplets(*covariance_decomposition(W, C), 2, "ipm")
    scale = 4.0
    A, B, W_res = corda_factors(W, eigens, scale)
    part = eigens.U_WC @ torch.diag(eigens.S_WC) @ eigens.V_WC.t()
    torch.testing.assert_close(scale * B @ A, part, atol=EXACT_TOL, rtol=0)
    torch.testing.assert_close(W_res + scale * B @ A, W, atol=EXACT_TOL, rtol=0)
    root = (eigens.S_WC / scale).sqrt()
    torch.testing.assert_close(A, root[:, None] * eigens.V_WC.t(), atol=EXACT_TOL, rtol=0)
