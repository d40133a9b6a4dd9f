"""The LoRA math against hand computations in float64, and the fused node against autograd."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.ops.dropout import SharedDropout, draw_seed, drop_mask, pack_mask, unpack_mask
from lorakit.ops.lora import conv_delta_weight, delta_weight, lora_scale
from lorakit.ops.lora_bases import DenseBase
from lorakit.ops.lora_branch import LoraBranch, with_draw
from lorakit.ops.lora_node import lora_forward

EXACT = 1e-10  # float64 hand computation: only summation order differs


def test_scale_plain_and_rslora() -> None:
    assert lora_scale(32, 16, use_rslora=False) == 2.0
    assert lora_scale(32, 16, use_rslora=True) == 8.0
    assert lora_scale(8, 3, use_rslora=True) == pytest.approx(8 / math.sqrt(3), rel=1e-15)


def test_delta_weight_is_scaled_b_times_a() -> None:
    A = torch.randn(3, 5, dtype=torch.float64)
    B = torch.randn(4, 3, dtype=torch.float64)
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for o in range(4):
        for i in range(5):
            expected[o, i] = 1.5 * sum(B[o, j] * A[j, i] for j in range(3))
    assert torch.allclose(delta_weight(A, B, 1.5), expected, atol=EXACT, rtol=0)


def _node(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    p: float,
    is_transposed: bool = False,
) -> torch.Tensor:
    """The fused node over a dense base with one LoRA branch per (A, B) pair."""
    shared = SharedDropout()
    branches = tuple(with_draw(LoraBranch(scale, p, False, shared), x) for _ in pairs)
    tensors = tuple(t for pair in pairs for t in pair)
    return lora_forward(x, DenseBase(is_transposed), branches, W, bias, tensors)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    r=st.integers(1, 4),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    is_transposed=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_node_matches_hand_computation(
    n: int, d_in: int, d_out: int, r: int, p: float, is_transposed: bool, seed: int
) -> None:
    """Output and every gradient (x, W, bias, A, B) of the node against plain float64 math,
    for nn.Linear's layout and Conv1D's transposed one."""
    torch.manual_seed(seed)
    x = torch.randn(2, n, d_in, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    stored = W.t() if is_transposed else W  # Conv1D stores (in, out)
    scale = 0.75
    torch.manual_seed(seed + 1)
    out = _node(x, stored, bias, [(A, B)], scale, p, is_transposed)
    # Hand computation with the same mask: the op draws its seed first from torch's generator.
    torch.manual_seed(seed + 1)
    mask = drop_mask((2 * n, d_in), p, draw_seed(), x.device).view(2, n, d_in) if p else None
    x_dropped = x * ~mask / (1 - p) if mask is not None else x
    expected = x @ W.t() + bias + scale * (x_dropped @ A.t()) @ B.t()
    assert torch.allclose(out, expected, atol=EXACT, rtol=0)
    weights = torch.randn_like(expected)
    got = torch.autograd.grad((out * weights).sum(), (x, W, bias, A, B))
    want = torch.autograd.grad((expected * weights).sum(), (x, W, bias, A, B))
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=EXACT, rtol=0)


@pytest.mark.parametrize("is_transposed", [False, True], ids=["linear", "conv1d"])
def test_node_passes_gradcheck_with_two_branches(is_transposed: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    pairs = [
        (
            torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 2, dtype=torch.float64, requires_grad=True),
        )
        for _ in range(2)
    ]
    W = torch.randn(4, 5, dtype=torch.float64) if is_transposed else torch.randn(5, 4).double()
    W.requires_grad_(True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def function(*tensors: torch.Tensor) -> torch.Tensor:
        x, W, bias, A1, B1, A2, B2 = tensors
        return _node(x, W, bias, [(A1, B1), (A2, B2)], 2.0, 0.0, is_transposed)

    inputs = (x, W, bias, *(t for pair in pairs for t in pair))
    assert torch.autograd.gradcheck(function, inputs)


def test_no_grad_forward_matches_and_keeps_no_graph() -> None:
    x = torch.randn(4, 6, dtype=torch.float64)
    A = torch.randn(2, 6, dtype=torch.float64)
    B = torch.randn(3, 2, dtype=torch.float64)
    W = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    expected = x @ W.detach().t() + 0.5 * x @ A.t() @ B.t()
    with torch.no_grad():
        out = _node(x, W, None, [(A, B)], 0.5, 0.0)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.allclose(out, expected, atol=EXACT, rtol=0)


# bf16 keeps 8 significant bits: rounding an exact value to it moves it by at most 2^-8 of
# itself (half an ulp). The reference path sums in fp32 first, off from exact by a few fp32
# ulps (2^-24) of the terms' magnitudes before that single rounding.
BF16_ROUNDING = 2.0**-8
FP32_SUM_SLACK = 2.0**-20


@pytest.mark.parametrize("needs_grad", [False, True], ids=["no-grad", "autograd"])
def test_reference_rounds_an_fp32_sum_into_bf16_once(needs_grad: bool) -> None:
    """A bf16 input and base output with fp32 adapters: the reference path sums in fp32,
    rounds into bf16 once, leaves the base output as it was and keeps autograd."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, generator=generator).to(torch.bfloat16)
    A = torch.randn(2, 6, generator=generator).requires_grad_(needs_grad)
    B = torch.randn(3, 2, generator=generator).requires_grad_(needs_grad)
    base = torch.randn(4, 3, generator=generator).to(torch.bfloat16)
    base_before = base.clone()
    out = LoraBranch(0.5, 0.0).reference(base, x, (A, B))
    assert torch.equal(base, base_before)
    assert out.dtype == torch.bfloat16
    assert out.requires_grad == needs_grad
    branch = 0.5 * (x.double() @ A.detach().double().t() @ B.detach().double().t())
    exact = base.double() + branch
    terms = base.double().abs() + 0.5 * (
        x.double().abs() @ A.detach().double().abs().t() @ B.detach().double().abs().t()
    )
    limit = BF16_ROUNDING * exact.abs() + FP32_SUM_SLACK * terms
    assert bool(((out.double() - exact).abs() <= limit).all())


def test_drop_mask_is_deterministic_and_has_rate_p() -> None:
    shape = (400, 500)
    first = drop_mask(shape, 0.3, seed=123, device=torch.device("cpu"))
    again = drop_mask(shape, 0.3, seed=123, device=torch.device("cpu"))
    other = drop_mask(shape, 0.3, seed=124, device=torch.device("cpu"))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    drop_rate = first.double().mean().item()
    # 200k Bernoulli(0.3) draws: standard error 0.001, so 5 sigma is 0.005.
    assert abs(drop_rate - 0.3) < 0.005
    assert not drop_mask(shape, 0.0, seed=5, device=torch.device("cpu")).any()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 21), p=st.floats(0.0, 1.0), seed=st.integers(0))
def test_packed_mask_round_trips_at_one_bit_per_element(
    rows: int, cols: int, p: float, seed: int
) -> None:
    dropped = drop_mask((rows, cols), p, seed, torch.device("cpu"))
    saved = pack_mask(dropped)
    assert saved.dtype == torch.uint8 and saved.numel() == math.ceil(rows * cols / 8)
    assert torch.equal(unpack_mask(saved, (rows, cols)), dropped)


def test_conv_delta_weight_composes_kernels() -> None:
    A = torch.randn(2, 3, 3, 3, dtype=torch.float64)  # r=2, in=3, 3x3 kernel
    B = torch.randn(4, 2, 1, 1, dtype=torch.float64)  # out=4
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    composed = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, A), B) * 0.5
    merged = torch.nn.functional.conv2d(x, conv_delta_weight(A, B, 0.5))
    assert torch.allclose(composed, merged, atol=EXACT, rtol=0)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float-scale", "tensor-scale"])
def test_branch_with_lora_bias_matches_hand_computation(p: float, as_tensor: bool) -> None:
    """lora_bias: y = x Wᵀ + b + s·B(A drop(x)) + s·b_B, b_B not dropped; every gradient
    (b_B's is s·Σ g) against float64 autograd, with s a number (eager) or a 0-dim tensor
    (compiled forwards), and the reference path equal to the node."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 6, dtype=torch.float64)
    scale = torch.tensor(0.75, dtype=torch.float64) if as_tensor else 0.75
    branch = LoraBranch(scale, p, True, SharedDropout())
    torch.manual_seed(5)
    out = lora_forward(x, DenseBase(), (with_draw(branch, x),), W, None, (A, B, b))
    torch.manual_seed(5)
    mask = drop_mask((15, 6), p, draw_seed(), x.device).view(x.shape) if p else None
    x_dropped = x * ~mask / (1 - p) if mask is not None else x
    expected = x @ W.t() + 0.75 * ((x_dropped @ A.t()) @ B.t() + b)
    assert torch.allclose(out, expected, atol=EXACT, rtol=0)
    weights = torch.randn_like(expected)
    got = torch.autograd.grad((out * weights).sum(), (x, A, B, b))
    want = torch.autograd.grad((expected * weights).sum(), (x, A, B, b))
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=EXACT, rtol=0)
    assert torch.allclose(got[3], 0.75 * weights.sum((0, 1)), atol=EXACT, rtol=0)
    torch.manual_seed(5)
    reference = branch.reference(x @ W.t(), x, (A, B, b))
    assert torch.allclose(reference, expected, atol=EXACT, rtol=0)


def test_branch_with_lora_bias_on_a_bf16_base_rounds_once() -> None:
    """fp32 A, B and b_B on a bf16 base: the branch and its bias are summed in fp32 and rounded
    into the bf16 output once, as the reference path does."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=generator).bfloat16()
    W = torch.randn(3, 6, generator=generator).bfloat16()
    A, B = torch.randn(2, 6, generator=generator), torch.randn(3, 2, generator=generator)
    b = torch.randn(3, generator=generator)
    branch = LoraBranch(0.5, 0.0, True)
    node = lora_forward(x, DenseBase(), (branch,), W, None, (A, B, b))
    reference = branch.reference(x @ W.t(), x, (A, B, b))
    assert node.dtype == torch.bfloat16
    assert torch.equal(node, reference)
