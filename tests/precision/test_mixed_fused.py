"""fp32 adapters on a half-precision base: the fused node against the plain autograd form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit import LoraConfig, get_peft_model
from lorakit.ops.dropout import SharedDropout, unpack_mask
from lorakit.ops.lora_bases import DenseBase
from lorakit.ops.lora_branch import LoraBranch, with_draw
from lorakit.ops.lora_node import branch_dtype_fits, lora_forward

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
ULPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}  # two roundings of the half dtype


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float) -> bool:
    """Within two roundings of `scale`, the largest sum of absolute terms behind an entry:
    rounding errors scale with the terms, not with a result they cancel down to."""
    error = (got.float() - expected.float()).abs().max().item()
    return error <= ULPS[dtype] * (scale + 1e-3)


def _term_scales(x, W, bias, A, B, upstream, c):  # type: ignore[no-untyped-def]
    """Largest Σ|terms| of the output and of the gradients of x, A and B (float64)."""
    x, W, A, B, g = (t.detach().double().abs() for t in (x, W, A, B, upstream))
    b = 0.0 if bias is None else bias.double().abs()
    out = x @ W.t() + b + c * (x @ A.t()) @ B.t()
    grad_x = g @ W + c * (g @ B) @ A
    grad_A = c * (g @ B).flatten(0, -2).t() @ x.flatten(0, -2)
    grad_B = c * g.flatten(0, -2).t() @ (x @ A.t()).flatten(0, -2)
    return [t.max().item() for t in (out, grad_x, grad_A, grad_B)]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    r=st.integers(1, 5),
    p=st.sampled_from([0.0, 0.2]),
    with_bias=st.booleans(),
    half=st.sampled_from(sorted(HALF)),
    seed=st.integers(0, 2**16),
)
def test_fused_mixed_equals_the_plain_form(
    n: int, d_in: int, d_out: int, r: int, p: float, with_bias: bool, half: str, seed: int
) -> None:
    dtype = HALF[half]
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=gen).to(dtype)
    bias = torch.randn(d_out, generator=gen).to(dtype) if with_bias else None
    x = torch.randn(n, 2, d_in, generator=gen).to(dtype).requires_grad_()
    A = torch.randn(r, d_in, generator=gen).requires_grad_()
    B = torch.randn(d_out, r, generator=gen).requires_grad_()
    upstream = torch.randn(n, 2, d_out, generator=gen).to(dtype)
    shared = SharedDropout()  # keeps the draw, so the plain form can use the same mask
    branch = with_draw(LoraBranch(0.75, p, False, shared), x)
    fused = lora_forward(x, DenseBase(), (branch,), W, bias, (A, B))
    got = torch.autograd.grad(fused, [x, A, B], upstream)
    kept = x
    if p > 0:
        draw = shared.draw(x, p)  # the memo: the very draw the fused node made
        kept = x.masked_fill(unpack_mask(draw.saved_mask, (n * 2, d_in)).view(x.shape), 0)
    # The plain form: branch in fp32, summed with the base output in fp32, rounded once.
    update = (kept.float() @ A.t()) @ B.t()
    plain = torch.add(torch.nn.functional.linear(x, W, bias), update, alpha=0.75 / (1 - p))
    plain = plain.to(dtype)
    expected = torch.autograd.grad(plain, [x, A, B], upstream)
    out_scale, *grad_scales = _term_scales(x, W, bias, A, B, upstream, 0.75 / (1 - p))
    assert fused.dtype == plain.dtype == dtype
    assert _close(fused, plain, dtype, out_scale)
    for g, e, scale in zip(got, expected, grad_scales, strict=True):
        assert g.dtype == e.dtype
        assert _close(g, e, dtype, scale)


def _bf16_layer(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24)).to(torch.bfloat16)
    config = LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, lora_dropout=dropout)
    return get_peft_model(model, config).base_model.model[0]


def test_layer_dispatches_mixed_dtypes_to_the_fused_node() -> None:
    layer = _bf16_layer(0.0)
    x = torch.randn(5, 32).to(torch.bfloat16).requires_grad_()
    assert layer._node_base(x) is not None
    out = layer(x)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_LoraNodeBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._node_base(x) is None
        assert type(layer(x).grad_fn).__name__ != "_LoraNodeBackward"
    assert layer._node_base(x.float()) is None  # x must come in the base's dtype
    layer.lora_A["default"].to(torch.float16)  # A and B in different dtypes: no fit
    assert not branch_dtype_fits(torch.bfloat16, layer.adapter_slots["default"].pair())


def test_a_trained_bf16_base_gets_its_gradients_through_the_fused_node() -> None:
    """Base weight and bias trained too (full fine-tuning beside LoRA): same as plain autograd."""
    layer = _bf16_layer(0.0)
    layer.base_layer.requires_grad_(True)
    x = torch.randn(5, 32).to(torch.bfloat16)
    params = [layer.base_layer.weight, layer.base_layer.bias]
    fused = torch.autograd.grad(layer(x).float().pow(2).sum(), params)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    plain_out = torch.add(
        layer.base_layer(x), (x.float() @ A.t()) @ B.t(), alpha=layer.scaling["default"]
    )
    plain = torch.autograd.grad(plain_out.to(torch.bfloat16).float().pow(2).sum(), params)
    g = 2 * plain_out.detach().double().abs()  # |d loss / d out|
    scales = [(g.t() @ x.double().abs()).max().item(), g.sum(0).max().item()]
    for got, expected, scale in zip(fused, plain, scales, strict=True):
        assert got.dtype == torch.bfloat16
        assert _close(got, expected, torch.bfloat16, scale)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_a_bf16_base_moves_only_the_adapter(dropout: float) -> None:
    layer = _bf16_layer(dropout)
    layer.train()
    before = layer.base_layer.weight.clone()
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 32).to(torch.bfloat16)
    target = torch.randn(16, 24)
    losses = []
    for _ in range(20):
        loss = (layer(x).float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert torch.equal(layer.base_layer.weight, before)
