"""LoRA on 4-bit QuantLinear bases: the math, training that leaves the codes untouched, files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import MergeError
from lorakit.quant import LoraQuantLinear, QuantConfig, QuantLinear, quantize_model_linears
from tiny_models import tiny_llama, token_batch, train_causal_lm

EXACT = 1e-5  # fp32: the dequantized matmul runs in pieces, the hand computation in one


def _qlora(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    full = tiny_llama()
    quantized = quantize_model_linears(copy.deepcopy(full), QuantConfig(double_quant=True))
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return full, get_peft_model(quantized, config)


def test_quantized_layers_are_wrapped_and_match_hand_computation() -> None:
    _, model = _qlora()
    layers = [m for m in model.modules() if isinstance(m, LoraQuantLinear)]
    assert len(layers) == 14  # 7 linear layers in each of 2 blocks; lm_head stays full precision
    layer = layers[0]
    x = torch.randn(3, layer.in_features)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    assert isinstance(base, QuantLinear)
    bias = 0 if base.bias is None else base.bias
    expected = x @ base.dequantize_weight().t() + bias + 2.0 * (x @ A.t()) @ B.t()
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=EXACT, rtol=0)


def test_training_changes_only_adapters_and_keeps_codes_bit_identical() -> None:
    _, model = _qlora()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    losses = train_causal_lm(model, steps=6)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert any("weight_packed" in k for k in frozen)
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key


def test_adapter_trained_on_4bit_loads_onto_the_full_precision_base(tmp_path: Path) -> None:
    full, model = _qlora()
    model.save_pretrained(tmp_path)
    on_full = PeftModel.from_pretrained(full, tmp_path)
    for key, value in model.state_dict().items():
        if "lora_" in key:
            assert torch.equal(on_full.state_dict()[key], value), key
    ids = token_batch()
    with torch.no_grad():
        quantized_logits, full_logits = model(ids).logits, on_full(ids).logits
    # the two models differ only by the 4-bit rounding of the base weights
    assert (quantized_logits - full_logits).abs().max() < 0.1 * full_logits.abs().max()


def test_merging_into_4bit_is_refused_and_changes_nothing() -> None:
    _, model = _qlora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="re-quantize"):
        model.merge_adapter()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
