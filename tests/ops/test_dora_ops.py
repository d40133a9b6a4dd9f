"""DoRA's maths (ops.dora) against hand computations in float64."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops.dora import (
    DoraBranch,
    add_dora_output,
    as_rows,
    dora_merged,
    dora_unmerged,
    row_norm_sq,
    weight_norm,
    weight_norm_dense,
    weight_times_at,
)
from lorakit.ops.dropout import SharedDropout, new_draw
from lorakit.ops.lora_bases import DenseBase
from lorakit.ops.lora_branch import with_draw
from lorakit.ops.lora_node import lora_forward

# float64 maths on both sides: only summation order differs.
EXACT = 1e-10
# float32 against float64: a few ulps of values of order 1 summed over 64 terms.
FP32 = 1e-5
# bf16 results of two roundings apart: 2^-7 relative, for values of order 1 to 10.
BF16 = 5e-2


def _factors(
    out: int, inp: int, r: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(out, inp, generator=generator, dtype=dtype)
    A = torch.randn(r, inp, generator=generator, dtype=dtype) / 4
    B = torch.randn(out, r, generator=generator, dtype=dtype) / 4
    return W, A, B


def _hand_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    dense = W + s * (B @ A)
    return torch.stack([torch.sqrt(sum(v * v for v in row)) for row in dense])


@pytest.mark.parametrize("scale", [0.5, 2.0, torch.tensor(1.5, dtype=torch.float64)])
def test_weight_norm_without_dense_delta_equals_row_norms_of_w_plus_sba(scale: object) -> None:
    W, A, B = _factors(7, 11, 3)
    s = float(scale)  # type: ignore[arg-type]
    n = weight_norm(row_norm_sq(W), weight_times_at(W, A), A, B, scale)  # type: ignore[arg-type]
    torch.testing.assert_close(n, _hand_norm(W, A, B, s), rtol=EXACT, atol=EXACT)
    torch.testing.assert_close(
        weight_norm_dense(W, s * (B @ A)), _hand_norm(W, A, B, s), rtol=EXACT, atol=EXACT
    )


def test_weight_norm_in_float32_is_as_accurate_as_a_dense_float32_norm() -> None:
    # A benchmark-sized layer: the expansion's small terms run in float32 (not float64), and
    # n must stay within float32 accuracy of the float64 dense norm (measured 1.0e-7 relative;
    # ||W + s·B A|| formed densely in float32, as peft does, 1.2e-7).
    generator = torch.Generator().manual_seed(5)
    W = torch.randn(1376, 512, generator=generator) * 0.02
    A = torch.randn(16, 512, generator=generator) / 512**0.5
    B = torch.randn(1376, 16, generator=generator) * 0.02
    s = 2.0
    n = weight_norm(row_norm_sq(W), weight_times_at(W, A), A, B, s)
    assert n.dtype == torch.float32
    exact = weight_norm_dense(W.double(), s * (B.double() @ A.double()))
    dense_fp32 = weight_norm_dense(W, s * (B @ A))
    error = ((n.double() - exact) / exact).abs().max().item()
    dense_error = ((dense_fp32.double() - exact) / exact).abs().max().item()
    assert error < 1e-6
    assert error < 4 * dense_error


def test_weight_norm_of_conv_views_equals_norm_over_all_but_the_output_axis() -> None:
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(5, 3, 2, 2, generator=generator, dtype=torch.float64)  # (out, in, kh, kw)
    A = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)  # (r, in, kh, kw)
    B = torch.randn(5, 2, 1, 1, generator=generator, dtype=torch.float64)  # (out, r, 1, 1)
    s = 0.75
    dense = W + s * torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
    expected = dense.square().sum(dim=(1, 2, 3)).sqrt()
    A2, B2 = as_rows(A), as_rows(B)
    n = weight_norm(row_norm_sq(as_rows(W)), weight_times_at(as_rows(W), A2), A2, B2, s)
    torch.testing.assert_close(n, expected, rtol=EXACT, atol=EXACT)


def test_weight_times_at_widens_a_narrow_weight_before_the_product() -> None:
    W, A, _ = _factors(2100, 16, 4, torch.float32)  # more rows than one cast block
    W16 = W.to(torch.bfloat16)
    P = weight_times_at(W16, A)
    assert P.dtype == torch.float32
    expected = W16.double() @ A.double().t()
    torch.testing.assert_close(P.double(), expected, rtol=FP32, atol=FP32)


def test_row_norm_sq_is_the_float64_sum_of_squares_of_each_row() -> None:
    W = torch.tensor([[3.0, 4.0], [1.0, -2.0]], dtype=torch.bfloat16)
    result = row_norm_sq(W)
    assert result.dtype == torch.float64
    assert result.tolist() == [25.0, 5.0]


def _hand_dora(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    s: float,
    x_dropped: torch.Tensor | None,
) -> torch.Tensor:
    """peft's formula with n detached: y = x Wᵀ + b + (g - 1) x_d Wᵀ + g s x_d Aᵀ Bᵀ."""
    n = _hand_norm(W, A.detach(), B.detach(), s).detach()
    g = m / n
    if x_dropped is None:
        return b + g * (x @ W.t() + s * (x @ A.t()) @ B.t())
    lora = s * (x_dropped @ A.t()) @ B.t()
    return x @ W.t() + b + (g - 1) * (x_dropped @ W.t()) + g * lora


def _dora_layer(
    x: torch.Tensor,
    stored: torch.Tensor,
    bias: torch.Tensor | None,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    n: torch.Tensor,
    s: float,
    is_transposed: bool = False,
    p: float = 0.0,
    route: str = "node",
) -> torch.Tensor:
    """A DoRA linear layer's output through the fused node or the branch's reference path."""
    base = DenseBase(is_transposed)
    branch = DoraBranch(s, p, n, base, stored, bias, SharedDropout())
    if route == "reference":
        x2 = x.reshape(-1, x.shape[-1])
        result = base.output(x2, stored, bias).view(*x.shape[:-1], -1)
        return branch.reference(result, x, tensors)
    return lora_forward(x, base, (with_draw(branch, x),), stored, bias, tensors)


@pytest.mark.parametrize("route", ["node", "reference"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("is_transposed", [False, True])
def test_dora_branch_outputs_and_gradients_equal_the_hand_formula(
    route: str, p: float, is_transposed: bool
) -> None:
    W, A, B = _factors(6, 5, 2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(6, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    s = 1.25
    stored = W.t().contiguous() if is_transposed else W
    n = weight_norm(row_norm_sq(W), weight_times_at(W, A.detach()), A.detach(), B.detach(), s)
    torch.manual_seed(11)
    y = _dora_layer(x, stored, b, (A, B, m), n, s, is_transposed, p, route)
    torch.manual_seed(11)
    x_dropped = None
    if p > 0:
        mask = new_draw(x, p).x_kept.ne(0).view(x.shape).double()
        assert 0 < int(mask.sum()) < x.numel()  # the mask drops some entries, not all
        x_dropped = x * mask / (1 - p)  # keeps x's graph
    expected = _hand_dora(x, W, b, A, B, m, s, x_dropped)
    torch.testing.assert_close(y, expected, rtol=EXACT, atol=EXACT)
    grad = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, b, A, B, m), grad)
    want = torch.autograd.grad(expected, (x, b, A, B, m), grad)
    for name, g_got, g_want in zip(["x", "b", "A", "B", "m"], got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=EXACT, atol=EXACT, msg=name)


def test_dora_branch_on_a_bf16_base_runs_in_fp32_and_rounds_once() -> None:
    W, A, B = _factors(6, 5, 2, torch.float32)
    x = torch.randn(3, 5).to(torch.bfloat16)
    m = torch.rand(6) + 0.5
    s = 2.0
    W16 = W.to(torch.bfloat16)
    n = weight_norm(row_norm_sq(W16), weight_times_at(W16, A), A, B, s)
    y = _dora_layer(x, W16, None, (A, B, m), n, s)
    assert y.dtype == torch.bfloat16
    # The base output is the bf16 matmul's; the rest runs in fp32 and is rounded once.
    z = (x @ W16.t()).float()
    g = m / _hand_norm(W16.double(), A.double(), B.double(), s).float()
    expected = g * (z + s * (x.float() @ A.t()) @ B.t())
    assert torch.equal(y, expected.to(torch.bfloat16))


def test_merge_then_unmerge_inverts_and_the_merged_weight_computes_the_eval_forward() -> None:
    W, A, B = _factors(6, 5, 2)
    m = torch.rand(6, dtype=torch.float64) + 0.5
    s = 0.5
    delta = s * (B @ A)
    g = (m / weight_norm_dense(W, delta)).view(-1, 1)
    merged = dora_merged(W, delta, g)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(
        x @ merged.t(),
        _hand_dora(x, W, torch.zeros(6).double(), A, B, m, s, None),
        rtol=EXACT,
        atol=EXACT,
    )
    torch.testing.assert_close(dora_unmerged(merged, delta, g), W, rtol=EXACT, atol=EXACT)


def test_add_dora_output_rescales_the_base_without_its_bias() -> None:
    result = torch.tensor([[2.0, 5.0]], dtype=torch.float64)  # base output, bias included
    bias = torch.tensor([1.0, -1.0], dtype=torch.float64)
    lora_out = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    g = torch.tensor([2.0, 3.0], dtype=torch.float64)
    # b + g (result - b) + g lora_out = [1 + 2·1 + 1, -1 + 3·6 + 0.75]
    expected = torch.tensor([[4.0, 17.75]], dtype=torch.float64)
    assert torch.equal(add_dora_output(result, bias, lora_out, g), expected)
    on_dropped = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    # result + (g - 1) on_dropped + g lora_out = [2 + 1 + 1, 5 + 2 + 0.75]
    got = add_dora_output(result, bias, lora_out, g, on_dropped)
    assert torch.equal(got, torch.tensor([[4.0, 7.75]], dtype=torch.float64))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_node_backward_twice_on_a_retained_graph_gives_the_same_gradients(p: float) -> None:
    # Backward reuses buffers in place; the tensors saved for it must stay untouched.
    W, A, B = _factors(6, 5, 2)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(6, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    n = weight_norm(row_norm_sq(W), weight_times_at(W, A.detach()), A.detach(), B.detach(), 0.5)
    y = _dora_layer(x, W, None, (A, B, m), n, 0.5, p=p)
    grad = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    first = torch.autograd.grad(y, (x, A, B, m), grad, retain_graph=True)
    second = torch.autograd.grad(y, (x, A, B, m), grad)
    for name, g_first, g_second in zip(["x", "A", "B", "m"], first, second, strict=True):
        assert torch.equal(g_first, g_second), name


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_node_keeps_one_tokens_by_out_tensor_for_backward(p: float) -> None:
    # t (N, out) for m's gradient is the only full-size output tensor the node keeps.
    W, A, B = _factors(7, 5, 2)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_()
    n = weight_norm(row_norm_sq(W), weight_times_at(W, A), A, B, 0.5)
    shapes: list[tuple[int, ...]] = []
    full_size: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        if tensor.shape == (4, 7):
            full_size.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = _dora_layer(x, W, None, (A.requires_grad_(), B.requires_grad_(), m), n, 0.5, p=p)
    assert shapes.count((4, 7)) == 1
    # Without dropout that tensor is the output itself: y = g ⊙ t kept in t's storage.
    assert (full_size[0].data_ptr() == y.data_ptr()) == (p == 0.0)


@pytest.mark.parametrize("has_bias", [False, True])
def test_dora_node_where_a_magnitude_is_zero_keeps_t_and_its_gradients_are_exact(
    has_bias: bool,
) -> None:
    # g = m / n with a zero: t cannot be read back from y = g ⊙ t, so the node keeps t.
    W, A, B = _factors(6, 5, 2)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=generator, dtype=torch.float64) if has_bias else None
    m = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5
    m[2] = 0.0
    m.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    n = weight_norm(row_norm_sq(W), weight_times_at(W, A.detach()), A.detach(), B.detach(), 0.5)
    y = _dora_layer(x, W, b, (A, B, m), n, 0.5)
    expected = _hand_dora(
        x, W, torch.zeros(6, dtype=torch.float64) if b is None else b, A, B, m, 0.5, None
    )
    torch.testing.assert_close(y, expected, rtol=EXACT, atol=EXACT)
    grad = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, A, B, m), grad)
    want = torch.autograd.grad(expected, (x, A, B, m), grad)
    for name, g_got, g_want in zip(["x", "A", "B", "m"], got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=EXACT, atol=EXACT, msg=name)
    assert got[3][2] != 0  # the zero magnitude still gets its gradient


def test_dora_node_on_a_bf16_base_with_dropout_equals_the_reference_path() -> None:
    W, A, B = _factors(6, 5, 2, torch.float32)
    x = torch.randn(3, 4, 5).to(torch.bfloat16)
    m = torch.rand(6) + 0.5
    W16 = W.to(torch.bfloat16)
    n = weight_norm(row_norm_sq(W16), weight_times_at(W16, A), A, B, 2.0)
    torch.manual_seed(5)
    node = _dora_layer(x, W16, None, (A, B, m), n, 2.0, p=0.3)
    torch.manual_seed(5)
    reference = _dora_layer(x, W16, None, (A, B, m), n, 2.0, p=0.3, route="reference")
    assert node.dtype == torch.bfloat16
    # Both sum in fp32 and round once; the reference rescales x_d Wᵀ in bf16 first.
    torch.testing.assert_close(node, reference, rtol=BF16, atol=BF16)
