"""The per-expert delta of a bare parameter against hand computations in float64."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops.param_delta import (
    add_delta,
    pad_expert_factors,
    parameter_delta,
    parameter_features,
)

EXACT = 1e-10  # float64 hand computation: only summation order differs
E, R, IN, OUT = 3, 2, 5, 4


def _factors() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(E * R, IN, generator=generator, dtype=torch.float64)
    B = torch.randn(OUT, R * E, generator=generator, dtype=torch.float64)
    return A, B


def _hand_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW[e, o, i] = s Σ_j B[o, j·E + e] A[e·r + j, i], entry by entry: A's rows are grouped
    by expert, B's columns by rank (PEFT's layout)."""
    delta = torch.zeros(E, OUT, IN, dtype=torch.float64)
    for e in range(E):
        for o in range(OUT):
            for i in range(IN):
                total = sum(B[o, j * E + e] * A[e * R + j, i] for j in range(R))
                delta[e, o, i] = scale * total
    return delta


def test_features_of_a_stack_stored_out_in_and_in_out() -> None:
    assert parameter_features(torch.Size([E, OUT, IN]), is_transposed=False) == (E, IN, OUT)
    assert parameter_features(torch.Size([E, IN, OUT]), is_transposed=True) == (E, IN, OUT)
    assert parameter_features(torch.Size([OUT, IN]), is_transposed=True) == (1, IN, OUT)


def test_stack_stored_out_in_gets_each_experts_scaled_b_a() -> None:
    A, B = _factors()
    delta = parameter_delta(A, B, 1.5, torch.Size([E, OUT, IN]), is_transposed=False)
    assert delta.shape == (E, OUT, IN)
    assert torch.allclose(delta, _hand_delta(A, B, 1.5), atol=EXACT, rtol=0)


def test_transposed_stack_gets_each_experts_delta_transposed() -> None:
    A, B = _factors()
    delta = parameter_delta(A, B, 0.5, torch.Size([E, IN, OUT]), is_transposed=True)
    assert delta.shape == (E, IN, OUT)
    assert torch.allclose(delta, _hand_delta(A, B, 0.5).transpose(1, 2), atol=EXACT, rtol=0)


def test_two_dimensional_parameter_is_one_plain_delta() -> None:
    generator = torch.Generator().manual_seed(1)
    A = torch.randn(R, IN, generator=generator, dtype=torch.float64)
    B = torch.randn(OUT, R, generator=generator, dtype=torch.float64)
    expected = torch.zeros(OUT, IN, dtype=torch.float64)
    for o in range(OUT):
        for i in range(IN):
            expected[o, i] = 2.0 * sum(B[o, j] * A[j, i] for j in range(R))
    delta = parameter_delta(A, B, 2.0, torch.Size([OUT, IN]), is_transposed=False)
    assert torch.allclose(delta, expected, atol=EXACT, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factors_give_an_fp32_delta_and_one_rounding(dtype: torch.dtype) -> None:
    A, B = (t.to(dtype) for t in _factors())
    delta = parameter_delta(A, B, 1.0, torch.Size([E, OUT, IN]), is_transposed=False)
    assert delta.dtype == torch.float32
    exact = _hand_delta(A.double(), B.double(), 1.0)
    assert torch.allclose(delta.double(), exact, atol=1e-5, rtol=0)  # fp32 products of halves
    W = torch.randn(E, OUT, IN).to(dtype)
    assert torch.equal(add_delta(W, delta), (W.float() + delta).to(dtype))


def test_padding_each_experts_rank_leaves_every_delta_unchanged() -> None:
    A, B = _factors()
    padded_A, padded_B = pad_expert_factors(A, B, E, 4)
    assert padded_A.shape == (E * 4, IN) and padded_B.shape == (OUT, 4 * E)
    shape = torch.Size([E, OUT, IN])
    delta = parameter_delta(padded_A, padded_B, 1.5, shape, is_transposed=False)
    assert torch.allclose(delta, _hand_delta(A, B, 1.5), atol=EXACT, rtol=0)
    assert torch.equal(padded_A.reshape(E, 4, IN)[:, R:], torch.zeros(E, 4 - R, IN).double())
