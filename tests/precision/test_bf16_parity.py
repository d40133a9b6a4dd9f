"""A bf16 base: lorakit's outputs against peft's on the same weights, plain and under autocast."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from precision.precision_support import TARGETS, bf16_llama, llama_pair, logits
from tiny_models import tiny_llama, token_batch

# bf16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of itself.
BF16_UNIT_ROUNDOFF = 2.0**-8
# The logits are y = h W^T over the final hidden state h; the roundings of two bf16 decoder
# layers (norms, attention, MLP, residual adds) leave h off by a few of its own ulps, so
# |y - y_exact| <= BF16_ULPS x 2^-8 x (|h| |W|^T), the magnitudes summed into each logit, taken
# from the float64 run. Measured here: peft 6.5 of them, lorakit 6.5 at most; a LoRA scale off
# by 5 % puts lorakit 20 away. peft must keep within the bound too (it is not set for lorakit).
BF16_ULPS = 10.0


def _exact_and_ulp(peft_model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of a float64 copy of `peft_model`, 2^-8 x the magnitudes summed per logit)."""
    exact_model = copy.deepcopy(peft_model).double()
    with torch.no_grad():
        output = exact_model(input_ids=token_batch(), output_hidden_states=True)
    hidden = output.hidden_states[-1]  # after the final norm: what the head multiplies
    summed = hidden.abs() @ exact_model.get_output_embeddings().weight.abs().t()
    return output.logits, BF16_UNIT_ROUNDOFF * summed


def _assert_within_bf16_rounding(
    actual: torch.Tensor, expected: torch.Tensor, peft_model: torch.nn.Module
) -> None:
    """lorakit's logits (`actual`) and peft's (`expected`) each within the bf16 limit of exact."""
    exact, ulp = _exact_and_ulp(peft_model)
    for name, output in (("peft", expected), ("lorakit", actual)):
        ulps = float(((output - exact).abs() / ulp).max())
        assert ulps <= BF16_ULPS, f"{name} is {ulps:.1f} bf16 ulps of |h||W| from exact"


def _adapter_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {tensor.dtype for name, tensor in model.named_parameters() if ".lora_" in name}


@pytest.mark.parametrize("use_autocast", [False, True])
def test_fp32_adapters_on_a_bf16_base_match_peft(use_autocast: bool) -> None:
    peft_model, lorakit_model = llama_pair()
    assert _adapter_dtypes(lorakit_model) == _adapter_dtypes(peft_model) == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
        expected, actual = logits(peft_model), logits(lorakit_model)
    # Same branch in fp32, one rounding of base + update into bf16 in both: identical here.
    _assert_within_bf16_rounding(actual, expected, peft_model)
    assert lorakit_model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits.dtype == (
        torch.bfloat16
    )


@pytest.mark.parametrize("use_autocast", [False, True])
def test_adapters_kept_in_bf16_match_peft(use_autocast: bool) -> None:
    peft_model, lorakit_model = llama_pair(autocast_adapter_dtype=False)
    assert _adapter_dtypes(lorakit_model) == _adapter_dtypes(peft_model) == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
        expected, actual = logits(peft_model), logits(lorakit_model)
    _assert_within_bf16_rounding(actual, expected, peft_model)


def test_autocast_over_an_fp32_base_matches_peft() -> None:
    base = tiny_llama()
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False}
    import peft

    torch.manual_seed(3)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()
    lorakit_model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    lorakit_model.load_state_dict(peft_model.state_dict())
    lorakit_model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = logits(peft_model), logits(lorakit_model)
    unadapted = logits(base)
    _, ulp = _exact_and_ulp(peft_model)
    assert (expected - unadapted).abs().max().item() > 10 * BF16_ULPS * ulp.max().item()
    _assert_within_bf16_rounding(actual, expected, peft_model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_adapter_dtype_follows_the_option(dtype: torch.dtype, autocast_adapter_dtype: bool) -> None:
    model = lorakit.get_peft_model(
        tiny_llama().to(dtype),
        lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    assert _adapter_dtypes(model) == {torch.float32 if autocast_adapter_dtype else dtype}
    model.add_adapter(
        "other",
        lorakit.LoraConfig(r=2, target_modules=["q_proj"]),
        autocast_adapter_dtype=not autocast_adapter_dtype,
    )
    other = {t.dtype for n, t in model.named_parameters() if ".other." in n}
    assert other == {dtype if autocast_adapter_dtype else torch.float32}


def test_the_branch_is_summed_with_the_base_output_before_one_rounding() -> None:
    """y = round_bf16(y_base + s · B A x) with the sum in fp32 (hand computation in float64)."""
    model = lorakit.get_peft_model(
        bf16_llama(),
        lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        base = layer.base_layer(x)
        update = (x.double() @ A.double().t() @ B.double().t()) * 2.0
        expected = base.double() + update
        actual = layer(x)
    assert actual.dtype == torch.bfloat16
    # One rounding of an fp32 sum: within unit roundoff (2^-8 relative: 8 significant bits).
    assert bool(((actual.double() - expected).abs() <= 2.0**-8 * expected.abs() + 1e-6).all())
