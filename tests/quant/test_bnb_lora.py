"""LoRA on bitsandbytes' Linear4bit (a model loaded with BitsAndBytesConfig), peft as the oracle."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from bnb_support import import_bitsandbytes, load_bnb_llama
from lorakit.errors import MergeError
from lorakit.layers.bnb import LoraBnbLinear4bit
from lorakit.layers.packed import LoraPackedLinear
from tiny_models import token_batch

bnb, BNB_MISSING = import_bitsandbytes("bitsandbytes")

pytestmark = pytest.mark.skipif(bnb is None, reason=BNB_MISSING)

# Both libraries add the same fp32 LoRA branch to the same bitsandbytes output; they may round
# the (N, r) and (N, out) products in another order (logits of order 1).
PEFT_TOLERANCE = 1e-6
# merged x·(W + sBA)ᵀ against x·Wᵀ + s(xAᵀ)Bᵀ: fp32 sums in another order through 14 layers.
MERGE_TOLERANCE = 1e-5
# After a repack bitsandbytes restores the layout with bf16 scales (2^-9 relative) quantized to
# 8 bits again (as when it saves a state dict): measured 0.5% of max|W|; a layout read the
# wrong way would be off by the size of W itself.
REPACKED_SCALE_ERROR = 2.0**-6
QUANTIZED_LAYERS = 14  # 7 linear layers in each of 2 blocks; lm_head is not quantized
VOCAB = 128


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _pair(folder: Path) -> tuple[Any, Any]:
    """lorakit and peft on two loads of the same 4-bit model, with the same non-zero A and B."""
    import peft

    options: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    ours = lorakit.get_peft_model(load_bnb_llama(folder), lorakit.LoraConfig(**options))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    theirs = peft.get_peft_model(load_bnb_llama(folder), peft.LoraConfig(**options))
    adapters = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    result = theirs.load_state_dict(adapters, strict=False)
    assert not result.unexpected_keys and len(adapters) == 2 * QUANTIZED_LAYERS
    return ours, theirs


def _logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(tokens).logits
    return logits


def test_linear4bit_layers_are_wrapped_and_match_peft(saved_llama: Path) -> None:
    ours, theirs = _pair(saved_llama)
    layers = [m for m in ours.modules() if isinstance(m, LoraBnbLinear4bit)]
    assert len(layers) == QUANTIZED_LAYERS
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    assert (layers[0].in_features, layers[0].out_features) == (64, 64)
    assert layers[0].lora_A["default"].weight.dtype == torch.float32
    tokens = token_batch(vocab_size=VOCAB)
    for mode in ("train", "eval"):  # eval: bitsandbytes may switch to its CPU inference kernel
        getattr(ours, mode)()
        getattr(theirs, mode)()
        expected = _logits(theirs, tokens)
        torch.testing.assert_close(_logits(ours, tokens), expected, rtol=0, atol=PEFT_TOLERANCE)


def test_training_moves_only_adapters_and_matches_peft_gradients(saved_llama: Path) -> None:
    ours, theirs = _pair(saved_llama)
    frozen = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    tokens = token_batch(batch=4, length=12, vocab_size=VOCAB)
    for model in (ours, theirs):
        model.train()
        model(tokens, labels=tokens).loss.backward()
    their_grads = {k: p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 2 * QUANTIZED_LAYERS
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[key], rtol=1e-4, atol=1e-7)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = ours(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = ours.state_dict()
    assert any(k.endswith("q_proj.base_layer.weight") for k in frozen)
    for key, value in frozen.items():  # the 4-bit codes and their scales included
        assert torch.equal(after[key], value), key


def test_merge_and_unload_gives_dense_layers_with_the_unmerged_outputs(
    saved_llama: Path,
) -> None:
    ours, _ = _pair(saved_llama)
    ours.train()  # no CPU inference kernel: the forward dequantizes exactly
    tokens = token_batch(vocab_size=VOCAB)
    expected = _logits(ours, tokens)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, (LoraPackedLinear, bnb.nn.Linear4bit)) for m in merged.modules())
    projection = merged.model.layers[0].self_attn.q_proj
    assert type(projection) is nn.Linear and projection.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(merged, tokens), expected, rtol=0, atol=MERGE_TOLERANCE)


def test_requantize_equals_peft_merge_bit_for_bit(saved_llama: Path) -> None:
    ours, theirs = _pair(saved_llama)
    merged = ours.merge_and_unload(requantize=True)
    reference = theirs.merge_and_unload()  # peft re-quantizes into Linear4bit
    names = [n for n, m in reference.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(names) == QUANTIZED_LAYERS
    for name in names:
        layer, other = merged.get_submodule(name), reference.get_submodule(name)
        assert type(layer) is bnb.nn.Linear4bit
        state, other_state = layer.weight.quant_state, other.weight.quant_state
        assert torch.equal(layer.weight.data, other.weight.data), name
        assert torch.equal(state.absmax, other_state.absmax), name
        assert torch.equal(state.state2.absmax, other_state.state2.absmax), name
        assert (state.quant_type, state.blocksize, state.dtype) == ("nf4", 64, torch.float32)
    tokens = token_batch(vocab_size=VOCAB)
    merged.train()
    reference.train()
    assert torch.equal(_logits(merged, tokens), _logits(reference, tokens))


def test_merge_after_an_inference_forward_reads_the_repacked_weight(saved_llama: Path) -> None:
    """On CPUs with AVX512-BF16 an eval forward repacks the weight (bf16 scales) in place."""
    ours, _ = _pair(saved_llama)
    fresh = copy.deepcopy(ours)
    ours.eval()
    _logits(ours, token_batch(vocab_size=VOCAB))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    is_repacked = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert is_repacked == bool(layer.support_avx512bf16_for_cpu)  # repacked where it can be
    merged = ours.merge_and_unload()
    reference = fresh.merge_and_unload()
    for name, module in reference.named_modules():
        if type(module) is nn.Linear and name != "lm_head":
            error = (merged.get_submodule(name).weight - module.weight).abs().max()
            assert error <= REPACKED_SCALE_ERROR * module.weight.abs().max(), name


def test_merge_adapter_is_refused_naming_merge_and_unload(saved_llama: Path) -> None:
    ours, _ = _pair(saved_llama)
    with pytest.raises(MergeError, match=r"Linear4bit.*merge_and_unload\(\)"):
        ours.merge_adapter()


def test_lorakit_import_does_not_import_bitsandbytes() -> None:
    code = (
        "import sys, lorakit, lorakit.quant, lorakit.layers.registry;"
        "sys.exit(1 if 'bitsandbytes' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
