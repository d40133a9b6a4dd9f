"""DoRA on 4-bit QuantLinear bases (QDoRA) against DoRA on the dequantized dense weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bnb_support import import_bitsandbytes, load_bnb_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.quant import LoraQuantLinear, QuantConfig, QuantLinear, quantize_model_linears
from tiny_models import tiny_llama, token_batch

# fp32 on both sides; the 4-bit base runs its matmuls in pieces of rows, the dense one in one,
# relative to the largest entry.
RTOL = 1e-6
# Gradients against peft: m's gradient sums products of either sign (see
# tests/parity/test_parity_dora.py).
GRAD_RTOL = 1e-5
# merge_and_unload rounds g ⊙ (W + s·B A) once into fp32 weights, passed through 2 blocks.
MERGE_RTOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _models() -> tuple[nn.Module, nn.Module]:
    """(QDoRA on a 4-bit tiny Llama, DoRA on its dequantized dense copy, same A, B and m)."""
    quantized = quantize_model_linears(tiny_llama(), QuantConfig(double_quant=True))
    dense = copy.deepcopy(quantized)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantLinear):
            parent_name, _, child = name.rpartition(".")
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize_weight(torch.float32))
            dense.get_submodule(parent_name).register_module(child, linear)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "use_dora": True}
    torch.manual_seed(0)
    qdora = get_peft_model(quantized, LoraConfig(**options, init_lora_weights=False))
    reference = get_peft_model(dense, LoraConfig(**options))
    adapters = {k: v for k, v in qdora.state_dict().items() if "lora_" in k}
    reference.load_state_dict(adapters, strict=False)
    return qdora, reference


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> bool:
    return float((got - expected).abs().max()) <= rtol * float(expected.abs().max())


def test_qdora_outputs_and_gradients_equal_dora_on_the_dequantized_weights() -> None:
    qdora, reference = _models()
    assert sum(isinstance(m, LoraQuantLinear) for m in qdora.modules()) == 6
    ids = token_batch(vocab_size=96)
    results = []
    for model in (qdora, reference):
        model.train()
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    (out, grads), (expected, expected_grads) = results
    assert _close(out, expected, RTOL)
    assert sorted(grads) == sorted(expected_grads)
    assert sum("lora_magnitude_vector" in key for key in grads) == 6
    for key, grad in expected_grads.items():
        assert _close(grads[key], grad, RTOL), key


def test_qdora_magnitude_starts_at_the_dequantized_row_norms() -> None:
    quantized = quantize_model_linears(tiny_llama(), QuantConfig())
    model = get_peft_model(
        quantized,
        LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
    )
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantLinear)
    W = layer.base_layer.dequantize_weight(torch.float32).double()
    A, B = (
        t.detach().double()
        for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    )
    expected = (W + layer.scaling["default"] * (B @ A)).norm(dim=1)
    m = layer.lora_magnitude_vector["default"].weight.detach().double()
    assert _close(m, expected, RTOL)


def test_qdora_merge_and_unload_computes_the_unmerged_outputs() -> None:
    qdora, _ = _models()
    ids = token_batch(vocab_size=96)
    qdora.eval()
    with torch.no_grad():
        unmerged = qdora(input_ids=ids).logits
        merged_model = qdora.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    merged_layer = merged_model.model.layers[0].self_attn.q_proj
    assert type(merged_layer) is nn.Linear  # dequantized, with g ⊙ (W + s·B A) in it
    assert _close(merged, unmerged, MERGE_RTOL)


bnb, BNB_MISSING = import_bitsandbytes("bitsandbytes")


@pytest.mark.skipif(bnb is None, reason=BNB_MISSING)
def test_qdora_on_bitsandbytes_linear4bit_equals_peft(tmp_path: Path) -> None:
    import peft

    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    options: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    options.update(use_dora=True, init_lora_weights=False)
    torch.manual_seed(0)
    ours = get_peft_model(load_bnb_llama(folder), LoraConfig(**options))
    theirs = peft.get_peft_model(load_bnb_llama(folder), peft.LoraConfig(**options))
    adapters = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    result = theirs.load_state_dict(adapters, strict=False)
    assert not result.unexpected_keys and len(adapters) == 3 * 6  # A, B, m per layer
    ids = token_batch()
    results = []
    for model in (ours, theirs):
        model.train()
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    (out, grads), (expected, expected_grads) = results
    assert _close(out, expected, RTOL)
    assert sorted(grads) == sorted(expected_grads)
    for key, grad in expected_grads.items():
        assert _close(grads[key], grad, GRAD_RTOL), key
