"""The fused 4-bit base + LoRA node against the unfused path and a float64 hand computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit import LoraConfig, get_peft_model
from lorakit.ops.dropout import SharedDropout, unpack_mask
from lorakit.ops.lora_bases import Quant4bitBase
from lorakit.ops.lora_branch import LoraBranch, with_draw
from lorakit.ops.lora_node import lora_forward
from lorakit.ops.nf4 import dequantize_4bit, linear_4bit, quantize_4bit
from lorakit.quant import LoraQuantLinear, QuantConfig, QuantLinear

CLOSE = 1e-5  # fp32, the same products summed in another order
# fp32 gradients of entries up to ~30 from sums of 64-128 products: the reference path adds
# the base's and the branch's input-gradients (and applies c) in another order than the node,
# which moves an entry by a few ulps of the largest terms, not of the (possibly small) result.
REORDERED_ATOL = 1e-4


def lora_linear_4bit(
    x: torch.Tensor,
    q: object,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    p: float = 0.0,
    shared: SharedDropout | None = None,
) -> torch.Tensor:
    """The fused node over a 4-bit base with one LoRA branch."""
    branch = with_draw(LoraBranch(scale, p, False, shared), x)
    return lora_forward(x, Quant4bitBase(q), (branch,), None, bias, (A, B))  # type: ignore[arg-type]


def _operands(n: int, d_in: int, d_out: int, r: int, with_bias: bool, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    q = quantize_4bit(torch.randn(d_out, d_in, generator=generator), blocksize=64)
    x = torch.randn(n, 2, d_in, generator=generator, requires_grad=True)
    A = torch.randn(r, d_in, generator=generator, requires_grad=True)
    B = torch.randn(d_out, r, generator=generator, requires_grad=True)
    bias = torch.randn(d_out, generator=generator, requires_grad=True) if with_bias else None
    return q, x, A, B, bias


def _grads(out: torch.Tensor, tensors: list, seed: int) -> list:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    return list(torch.autograd.grad(out, tensors, upstream))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4),
    d_in=st.sampled_from([64, 128, 96, 33]),  # whole blocks per row, and rows that are not
    d_out=st.integers(1, 70),
    r=st.integers(1, 5),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_base_then_update(
    n: int, d_in: int, d_out: int, r: int, p: float, with_bias: bool, seed: int
) -> None:
    q, x, A, B, bias = _operands(n, d_in, d_out, r, with_bias, seed)
    tensors = [x, A, B] + ([bias] if bias is not None else [])
    torch.manual_seed(seed)  # both paths draw the same dropout mask from the global generator
    fused = lora_linear_4bit(x, q, bias, A, B, 1.5, p)
    fused_grads = _grads(fused, tensors, seed)
    torch.manual_seed(seed)
    plain = LoraBranch(1.5, p).reference(linear_4bit(x, q, bias), x, (A, B))
    plain_grads = _grads(plain, tensors, seed)
    assert torch.allclose(fused, plain, atol=CLOSE, rtol=CLOSE)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        assert torch.allclose(got, expected, atol=REORDERED_ATOL, rtol=CLOSE)


def test_fused_matches_float64_hand_computation() -> None:
    q, x, A, B, bias = _operands(3, 128, 40, 4, True, seed=7)
    out = lora_linear_4bit(x, q, bias, A, B, 0.5)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    out.backward(upstream.float())
    W = dequantize_4bit(q).double()
    x64, A64, B64 = x.detach().double(), A.detach().double(), B.detach().double()
    expected = x64 @ W.t() + bias.detach().double() + 0.5 * (x64 @ A64.t()) @ B64.t()
    assert torch.allclose(out.double(), expected, atol=1e-4, rtol=0)
    g = upstream.reshape(-1, 40)
    x2 = x64.reshape(-1, 128)
    expected_grad_x = (g @ W + 0.5 * (g @ B64) @ A64).view(x.shape)
    assert x.grad is not None and A.grad is not None and B.grad is not None
    assert torch.allclose(x.grad.double(), expected_grad_x, atol=1e-4, rtol=0)
    assert torch.allclose(A.grad.double(), 0.5 * (g @ B64).t() @ x2, atol=1e-4, rtol=0)
    assert torch.allclose(B.grad.double(), 0.5 * g.t() @ (x2 @ A64.t()), atol=1e-4, rtol=0)
    assert bias.grad is not None
    assert torch.allclose(bias.grad.double(), g.sum(0), atol=1e-4, rtol=0)


def _layer() -> LoraQuantLinear:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    model[0] = QuantLinear.from_linear(model[0], QuantConfig())
    config = LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, lora_dropout=0.1)
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model[0]
    assert isinstance(layer, LoraQuantLinear)
    return layer


def test_layer_takes_the_fused_path_and_gives_the_unfused_result() -> None:
    layer = _layer()
    x = torch.randn(5, 128, requires_grad=True)
    assert layer._node_base(x) is not None
    torch.manual_seed(3)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "_LoraNodeBackward"
    (fused_grad,) = torch.autograd.grad(fused.sum(), [x])
    torch.manual_seed(3)
    base_out = layer.base_layer(x)
    unfused = layer._add_adapter_output(base_out, x, "default")
    (unfused_grad,) = torch.autograd.grad(unfused.sum(), [x])
    assert torch.allclose(fused, unfused, atol=CLOSE, rtol=CLOSE)
    assert torch.allclose(fused_grad, unfused_grad, atol=REORDERED_ATOL, rtol=CLOSE)


@pytest.mark.parametrize("case", ["autocast", "bf16 input", "disabled", "hooked"])
def test_layer_falls_back_where_fusing_does_not_apply(case: str) -> None:
    layer = _layer()
    x = torch.randn(5, 128)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer._node_base(x) is None
        return
    if case == "bf16 input":
        x = x.bfloat16()
    elif case == "disabled":
        layer.routing.is_disabled = True
    else:
        layer.base_layer.register_forward_hook(lambda module, args, out: out)
    assert layer._node_base(x) is None or case == "disabled"
    torch.manual_seed(5)
    out = layer(x)  # and the reference path runs, with the base's own result
    torch.manual_seed(5)
    expected = layer.base_layer(x)
    if case != "disabled":
        A, B = layer.adapter_slots["default"].pair()
        expected = LoraBranch(layer.scaling["default"], 0.1, False, SharedDropout()).reference(
            expected, x, (A, B)
        )
    assert out.grad_fn is None or type(out.grad_fn).__name__ != "_LoraNodeBackward"
    assert torch.allclose(out.float(), expected.float(), atol=CLOSE, rtol=CLOSE)


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_compute_with_fp32_adapters_equals_the_plain_form(p: float, with_bias: bool) -> None:
    """The usual QLoRA set-up: bf16 compute, fp32 A and B; the branch is rounded in once."""
    q, x, A, B, bias = _operands(3, 128, 48, 4, with_bias, seed=11)
    x = x.detach().bfloat16().requires_grad_()
    bias = None if bias is None else bias.detach().bfloat16().requires_grad_()
    tensors = [x, A, B] + ([bias] if bias is not None else [])
    shared = SharedDropout()  # keeps the draw, so the plain form can use the same mask
    fused = lora_linear_4bit(x, q, bias, A, B, 1.5, p, shared)
    fused_grads = _grads(fused, tensors, seed=11)
    kept = x
    if p > 0:
        dropped = unpack_mask(shared.draw(x, p).saved_mask, (6, 128)).view(x.shape)
        kept = x.masked_fill(dropped, 0)
    update = (kept.float() @ A.t()) @ B.t()
    plain = torch.add(linear_4bit(x, q, bias), update, alpha=1.5 / (1 - p)).bfloat16()
    plain_grads = _grads(plain, tensors, seed=11)
    assert fused.dtype == torch.bfloat16
    assert torch.allclose(fused.float(), plain.float(), atol=0.05, rtol=2**-7)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        assert got.dtype == expected.dtype
        assert torch.allclose(got.float(), expected.float(), atol=0.05, rtol=2**-7)


def test_bf16_compute_layer_with_fp32_adapters_takes_the_fused_path() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    model[0] = QuantLinear.from_linear(model[0], QuantConfig(compute_dtype=torch.bfloat16))
    config = LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)
    layer = get_peft_model(model, config).base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(5, 128).bfloat16().requires_grad_()
    assert layer._node_base(x) is not None
    out = layer(x)
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ == "_LoraNodeBackward"
    assert layer._node_base(x.float()) is None  # x must come in the compute dtype
