"""PiSSA, OLoRA and orthogonal initial factors against hand computations in float64."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops.init_svd import (
    mutated_init_delta,
    olora_factors,
    orthogonal_factors,
    pissa_factors,
)

EXACT = 1e-10  # float64: only the order of sums differs from the hand computation
FP32_ZERO = 1e-6  # a float32 product that is zero in exact arithmetic (values of order 0.1)
# pissa_niter_N on a matrix whose r-th and (r+1)-th singular values differ 100-fold: the
# randomized subspace is exact to about (1/100)^(2N+1) of the spectrum, far below this.
RANDOMIZED_TOL = 1e-8


def _weight(out_features: int = 7, in_features: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)


def _top_r_projection(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, top r singular values) from the eigenvectors of W Wᵀ: an independent route to SVD."""
    eigenvalues, eigenvectors = torch.linalg.eigh(W @ W.t())  # ascending
    U_r = eigenvectors[:, -r:]
    return U_r @ U_r.t(), eigenvalues[-r:].flip(0).sqrt()


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_pissa_holds_the_top_singular_triplets_and_the_residual_restores_w(scale: float) -> None:
    W, r = _weight(), 3
    A, B, W_res = pissa_factors(W, r, scale)
    projection, singular_values = _top_r_projection(W, r)
    assert A.shape == (r, 5) and B.shape == (7, r)
    assert torch.allclose(W_res + scale * B @ A, W, atol=EXACT, rtol=0)
    assert torch.allclose(scale * B @ A, projection @ W, atol=EXACT, rtol=0)  # best rank-r part
    # balanced halves: A Aᵀ = Bᵀ B = diag(S_r / s)
    expected = torch.diag(singular_values / scale)
    assert torch.allclose(A @ A.t(), expected, atol=EXACT, rtol=0)
    assert torch.allclose(B.t() @ B, expected, atol=EXACT, rtol=0)
    # the residual keeps the other singular values only
    remaining = torch.linalg.svdvals(W)[r:]
    assert torch.allclose(torch.linalg.svdvals(W_res)[: len(remaining)], remaining, atol=EXACT)


def test_pissa_niter_is_the_randomized_svd_of_a_gapped_spectrum() -> None:
    left, _ = torch.linalg.qr(_weight(9, 9, seed=1))
    right, _ = torch.linalg.qr(_weight(6, 6, seed=2))
    singular_values = torch.tensor([9.0, 7.0, 0.05, 0.03, 0.02, 0.01], dtype=torch.float64)
    W = left[:, :6] * singular_values @ right.t()  # (9, 6), known spectrum
    torch.manual_seed(0)
    A, B, W_res = pissa_factors(W, 2, 2.0, niter=4)
    torch.manual_seed(0)
    A_again, _, _ = pissa_factors(W, 2, 2.0, niter=4)
    exact_A, exact_B, _ = pissa_factors(W, 2, 2.0)
    assert torch.allclose(W_res + 2.0 * B @ A, W, atol=EXACT, rtol=0)
    assert torch.allclose(B @ A, exact_B @ exact_A, atol=RANDOMIZED_TOL, rtol=0)
    assert torch.equal(A, A_again)  # the global generator decides the draw


def test_olora_is_the_leading_qr_block() -> None:
    W, r, scale = _weight(), 3, 1.5
    A, B, W_res = olora_factors(W, r, scale)
    assert torch.allclose(B.t() @ B, torch.eye(r, dtype=torch.float64), atol=EXACT, rtol=0)
    assert torch.equal(A, A.triu())  # R's leading rows: upper triangular
    # W[:, :r] = Q R[:, :r] = Q[:, :r] R[:r, :r]: B A reproduces W's first r columns
    assert torch.allclose((B @ A)[:, :r], W[:, :r], atol=EXACT, rtol=0)
    assert torch.allclose(W_res + scale * B @ A, W, atol=EXACT, rtol=0)
    # Q[:, :r] spans W's first r columns: Gram-Schmidt by hand gives the same projector
    basis = []
    for column in W[:, :r].t():
        for vector in basis:
            column = column - (vector @ column) * vector
        basis.append(column / column.norm())
    by_hand = torch.stack(basis, dim=1)
    assert torch.allclose(B @ B.t(), by_hand @ by_hand.t(), atol=EXACT, rtol=0)


def test_orthogonal_factors_are_nonzero_with_a_zero_product() -> None:
    generator = torch.Generator().manual_seed(0)
    A, B = orthogonal_factors(in_features=10, out_features=6, r=4, generator=generator)
    assert A.shape == (4, 10) and B.shape == (6, 4)
    assert (B @ A).abs().max() < FP32_ZERO
    assert torch.linalg.matrix_rank(A) == 2 and torch.linalg.matrix_rank(B) == 2  # fp32 rtol
    # A's rows lie in the span of the even rows of one orthogonal Q, B's in the odd rows':
    # Aᵀ's column space (r-dim coordinates) is orthogonal to B's row space
    assert (B.t() @ B @ A @ A.t()).abs().max() < FP32_ZERO
    # redrawn from the same seed: the same factors (X, G_A, G_B in that order)
    again = orthogonal_factors(10, 6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(A, again[0]) and torch.equal(B, again[1])
    by_hand_generator = torch.Generator().manual_seed(0)
    X = torch.randn(4, 4, generator=by_hand_generator)
    G_A = torch.randn(10, 2, generator=by_hand_generator)
    Q, _ = torch.linalg.qr(X)
    assert torch.allclose(A, (G_A @ Q[0::2]).t() / 10, atol=0, rtol=0)


def test_mutated_init_delta_is_b_a_minus_b0_a0() -> None:
    A, A0 = _weight(3, 5, seed=3), _weight(3, 5, seed=4)
    B, B0 = _weight(7, 3, seed=5), _weight(7, 3, seed=6)
    A_cat, B_cat = mutated_init_delta(A, B, A0, B0)
    assert A_cat.shape == (6, 5) and B_cat.shape == (7, 6)
    assert torch.allclose(B_cat @ A_cat, B @ A - B0 @ A0, atol=EXACT, rtol=0)
