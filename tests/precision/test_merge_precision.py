"""Merging into half-precision weights: one rounding, and an unmerge that restores the bits."""

from __future__ import annotations

import pytest
import torch

from lorakit.ops.merge import merge_delta, unmerge_delta
from precision.precision_support import base_weights, llama_pair, logits

HALF_DTYPES = [torch.bfloat16, torch.float16]


def _weight_and_delta(
    dtype: torch.dtype, delta_std: float = 0.002
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights spread over many binades (some tiny, some zero) and a random delta."""
    generator = torch.Generator().manual_seed(0)
    magnitude = torch.exp(torch.empty(64, 48).uniform_(-12, -1, generator=generator))
    signs = torch.randint(0, 2, (64, 48), generator=generator) * 2 - 1
    weight = (magnitude * signs).to(dtype)
    weight[0, :5] = 0
    delta = torch.randn(64, 48, generator=generator) * delta_std
    return weight, delta


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_merge_rounds_the_fp32_sum_once(dtype: torch.dtype) -> None:
    weight, delta = _weight_and_delta(dtype)
    expected = (weight.float() + delta).to(dtype)
    merge_delta(weight, delta)
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32])
@pytest.mark.parametrize("delta_std", [0.002, 0.5])
def test_unmerge_restores_the_original_bits(dtype: torch.dtype, delta_std: float) -> None:
    weight, delta = _weight_and_delta(dtype, delta_std)
    original = weight.clone()
    record = merge_delta(weight, delta)
    plain = (weight.float() - delta).to(dtype)
    assert not torch.equal(plain, original)  # plain subtraction is not enough here
    record_bytes = record.values.numel() * record.values.element_size()
    if record.indices is not None:
        record_bytes += record.indices.numel() * record.indices.element_size()
    assert record_bytes <= original.numel() * original.element_size()  # never over one copy
    unmerge_delta(weight, delta, record)
    assert torch.equal(weight, original)
    assert not torch.signbit(weight[0, :5]).any()  # zeros come back as +0


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_a_delta_small_against_the_weights_needs_a_sparse_record(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(256, 128, generator=generator) * 0.02).to(dtype)
    delta = torch.randn(256, 128, generator=generator) * 0.002
    original = weight.clone()
    record = merge_delta(weight, delta)
    assert record.indices is not None
    assert 0 < record.indices.numel() < original.numel() // 5
    unmerge_delta(weight, delta, record)
    assert torch.equal(weight, original)


def test_unmerge_of_a_transposed_weight_is_exact() -> None:
    weight, delta = _weight_and_delta(torch.bfloat16)
    weight_t, delta_t = weight.t(), delta.t()  # non-contiguous, as a Conv1D-style view
    original = weight_t.clone()
    record = merge_delta(weight_t, delta_t)
    unmerge_delta(weight_t, delta_t, record)
    assert torch.equal(weight_t, original)


def test_merge_unmerge_on_a_bf16_llama_restores_every_weight() -> None:
    _, model = llama_pair()
    before = base_weights(model)
    model.merge_adapter()
    merged = base_weights(model)
    assert any(not torch.equal(merged[name], before[name]) for name in before)
    model.unmerge_adapter()
    after = base_weights(model)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_unmerging_out_of_order_is_within_two_roundings() -> None:
    """Unmerging an adapter merged under another: each entry off by <= 2 half-ulps + 1 ulp."""
    weight, delta_a = _weight_and_delta(torch.bfloat16)
    delta_b = torch.randn(64, 48, generator=torch.Generator().manual_seed(5)) * 0.002
    original = weight.clone()
    merge_delta(weight, delta_a)
    merge_delta(weight, delta_b)
    unmerge_delta(weight, delta_a, None)  # a is not on top: no record applies
    unmerge_delta(weight, delta_b, None)  # its record assumed a on the weight
    error = (weight.double() - original.double()).abs()
    # Four roundings into bf16 (eps 2^-8 relative), each at most half an ulp of a value of
    # size |W| + |ΔA| + |ΔB|.
    size = original.double().abs() + delta_a.double().abs() + delta_b.double().abs()
    assert bool((error <= 4 * 2.0**-8 * size + 1e-30).all())


def test_merged_error_is_at_most_peft_on_a_bf16_llama() -> None:
    peft_model, lorakit_model = llama_pair()
    reference = logits(lorakit_model)
    assert (reference - logits(peft_model)).abs().max() < 0.1  # same adapter in both
    peft_model.merge_adapter()
    lorakit_model.merge_adapter()
    peft_error = (logits(peft_model) - reference).abs().max().item()
    lorakit_error = (logits(lorakit_model) - reference).abs().max().item()
    assert lorakit_error <= peft_error


def test_a_record_from_before_a_cast_is_not_applied() -> None:
    """After `.to(dtype)` the record's values no longer fit; unmerge falls back to rounding."""
    weight, delta = _weight_and_delta(torch.bfloat16)
    original = weight.clone()
    record = merge_delta(weight, delta)
    weight_fp16 = weight.to(torch.float16)
    unmerge_delta(weight_fp16, delta, record)
    expected = (weight.to(torch.float16).float() - delta).to(torch.float16)
    assert torch.equal(weight_fp16, expected)
    assert not torch.equal(weight_fp16, original.to(torch.float16))
