"""ops.frozen_linear: the oneDNN route of frozen base products against float64 and F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops.frozen_linear import (
    MIN_MULTIPLY_ADDS,
    frozen_linear,
    frozen_linear_add,
    onednn_linear_add_op,
    uses_onednn,
)
from lorakit.ops.lora_bases import DenseBase

pytestmark = pytest.mark.usefixtures("requires_onednn")

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture
def requires_onednn() -> None:
    from lorakit.ops.frozen_linear import onednn_linear_op

    if onednn_linear_op() is None:
        pytest.skip("this torch build has no working oneDNN linear")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_within_rounding(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """|got - x Wᵀ| within the float32 bound of any summation order: K·eps·(|x| |W|ᵀ)."""
    x64, w64 = x.double(), weight.double()
    exact = x64 @ w64.t()
    bound = x.shape[-1] * EPS32 * (x64.abs() @ w64.abs().t())
    assert got.dtype == torch.float32
    assert bool(((got.double() - exact).abs() <= bound).all())
    # And as close as F.linear: both round the same products, only in another order.
    assert (got - F.linear(x, weight)).abs().max() <= 1e-4 * exact.abs().max()


@pytest.mark.parametrize(
    ("x_shape", "out"), [((16, 512), 1376), ((2, 9, 384), 384), ((1, 512), 8000)]
)
def test_large_products_take_onednn_and_equal_the_float64_product(
    x_shape: tuple[int, ...], out: int
) -> None:
    x, weight = _randn(*x_shape, seed=0), _randn(out, x_shape[-1], seed=1)
    assert uses_onednn(x, weight)
    got = frozen_linear(x, weight)
    assert got.shape == (*x_shape[:-1], out)
    _assert_within_rounding(got, x, weight)


def test_strided_inputs_transposed_weights_and_bias_on_the_onednn_route() -> None:
    x = _randn(16, 1024, seed=0)[:, ::2]  # every second column: not contiguous
    weight_in_out = _randn(512, 700, seed=1)  # read through its transpose, as a backward does
    bias = _randn(700, seed=2)
    assert uses_onednn(x, weight_in_out.t(), bias)
    got = frozen_linear(x, weight_in_out.t(), bias)
    _assert_within_rounding(got - bias, x, weight_in_out.t())


def test_small_reduced_precision_or_gradient_products_stay_on_f_linear() -> None:
    weight = _randn(64, 64, seed=1)
    small = _randn(4, 64, seed=0)
    assert small.numel() * weight.shape[0] < MIN_MULTIPLY_ADDS
    assert not uses_onednn(small, weight)
    large, big_weight = _randn(64, 512, seed=0), _randn(512, 512, seed=1)
    assert uses_onednn(large, big_weight)
    assert not uses_onednn(large.bfloat16(), big_weight.bfloat16())
    assert not uses_onednn(large, big_weight, torch.zeros(512, dtype=torch.float64))
    tracked = large.clone().requires_grad_(True)
    assert not uses_onednn(tracked, big_weight)  # the oneDNN op has no derivative
    with torch.no_grad():
        assert uses_onednn(tracked, big_weight)


def test_a_product_that_needs_a_gradient_keeps_autograd() -> None:
    x = _randn(64, 512, seed=0).requires_grad_(True)
    weight = _randn(512, 512, seed=1)
    frozen_linear(x, weight).square().sum().backward()
    expected_x = x.detach().clone().requires_grad_(True)
    F.linear(expected_x, weight).square().sum().backward()
    assert x.grad is not None and expected_x.grad is not None
    assert torch.equal(x.grad, expected_x.grad)  # the same F.linear both times


@pytest.mark.parametrize("is_transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("has_into", [False, True])
def test_dense_base_input_grad_on_onednn_is_g_w_plus_into(
    is_transposed: bool, has_into: bool
) -> None:
    g, weight_out_in = _randn(256, 700, seed=0), _randn(700, 512, seed=1)
    into = _randn(256, 512, seed=2) if has_into else None
    weight = weight_out_in.t().contiguous() if is_transposed else weight_out_in
    base = DenseBase(is_transposed=is_transposed)
    assert uses_onednn(g, weight_out_in.t())
    expected = g.double() @ weight_out_in.double()
    if into is not None:
        expected += into.double()
    got = base.input_grad(g, weight, None if into is None else into.clone())
    # Any summation order of the 700 products, plus one rounding for adding `into`.
    bound = 700 * EPS32 * (g.double().abs() @ weight_out_in.double().abs())
    bound += EPS32 * expected.abs()
    assert bool(((got.double() - expected).abs() <= bound).all())
    x = _randn(256, 512, seed=3)
    output = base.output(x, weight, None)
    _assert_within_rounding(output, x, weight_out_in)


@pytest.mark.parametrize("contiguous_other", [True, False], ids=["fused", "strided-other"])
def test_frozen_linear_add_is_the_product_plus_other_and_leaves_other_alone(
    contiguous_other: bool,
) -> None:
    x, weight = _randn(256, 512, seed=0), _randn(700, 512, seed=1)
    other = _randn(256, 700, seed=2) if contiguous_other else _randn(700, 256, seed=2).t()
    kept = other.clone()
    assert uses_onednn(x, weight) and onednn_linear_add_op() is not None
    got = frozen_linear_add(x, weight, other)
    assert torch.equal(other, kept)  # a fresh result: `other` is read, never written
    expected = x.double() @ weight.double().t() + other.double()
    bound = 512 * EPS32 * (x.double().abs() @ weight.double().abs().t()) + EPS32 * expected.abs()
    assert got.shape == (256, 700) and got.dtype == torch.float32
    assert bool(((got.double() - expected).abs() <= bound).all())
