"""The engine on other bases: GPT-2 (Conv1D) and Qwen2 families, bf16, 4-bit NF4, classifiers."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

import lorakit
from engine_support import (
    PAD_ID,
    byte_llama,
    byte_tokenizer,
    greedy_reference,
    merged_by_hand,
    save_adapter,
)
from lorakit.quant import QuantLinear, load_quantized
from lorakit.serve import Engine, SamplingParams
from tiny_models import tiny_causal_lm, tiny_gpt2

FP32_LOGITS_ATOL = 1e-4  # update added to the base output vs merged into the weights
# bf16 keeps 8 bits of mantissa: logits of size ~1 differ by a few 1e-3 between two bf16 orders.
BF16_LOGITS_ATOL = 3e-2
PROBS_ATOL = 1e-5  # softmax of fp32 classifier logits
PROMPTS = [[5, 17, 99, 3, 42], [7, 8], [100, 2, 64, 31, 12, 9, 77, 18]]


def tiny_qwen2() -> torch.nn.Module:
    return tiny_causal_lm("Qwen2").eval()


def tiny_mistral() -> torch.nn.Module:
    return tiny_causal_lm("Mistral").eval()


def tiny_qwen2_moe() -> torch.nn.Module:
    """Qwen2-MoE: its shared expert's Linear layers see the tokens flattened (rows * seq, in)."""
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("factory", "targets", "transpose"),
    [
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], True),
        (tiny_qwen2, "all-linear", False),
        (tiny_mistral, ["q_proj", "v_proj", "down_proj"], False),
        (tiny_qwen2_moe, ["q_proj", "gate_proj", "down_proj", "shared_expert_gate"], False),
    ],
    ids=["gpt2", "qwen2", "mistral", "qwen2_moe"],
)
def test_families_mixed_batch_greedy_tokens_equal_merged_models(
    tmp_path: Path, factory: object, targets: object, transpose: bool
) -> None:
    build = factory  # type: ignore[assignment]
    folders = {
        "a": save_adapter(
            build,
            tmp_path / "a",
            1,
            r=4,
            lora_alpha=8,
            target_modules=targets,
            fan_in_fan_out=transpose,
        ),
        "b": save_adapter(
            build,
            tmp_path / "b",
            2,
            r=2,
            lora_alpha=6,
            target_modules=targets,
            fan_in_fan_out=transpose,
        ),
    }
    engine = Engine.from_pretrained(build())
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    specs = ["a", None, {"a": 0.5, "b": 2.0}]
    handles = [
        engine.submit(prompt, spec, SamplingParams(max_tokens=10))
        for prompt, spec in zip(PROMPTS, specs, strict=True)
    ]
    engine._run_inline(handles)
    for prompt, spec, handle in zip(PROMPTS, specs, handles, strict=True):
        blend = {} if spec is None else {"a": 1.0} if spec == "a" else spec
        reference = merged_by_hand(build(), {folders[n]: w for n, w in blend.items()}, transpose)
        assert [e.token_id for e in handle] == greedy_reference(reference, prompt, 10), spec
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        got = engine.prompt_logits([prompt], [spec])[0]
        assert (got - expected).abs().max() < FP32_LOGITS_ATOL


def test_bf16_base_logits_match_lorakit_peft_model_in_bf16(tmp_path: Path) -> None:
    folder = save_adapter(
        byte_llama, tmp_path / "a", 1, r=8, lora_alpha=16, target_modules="all-linear"
    )
    engine = Engine.from_pretrained(byte_llama(), byte_tokenizer(), dtype=torch.bfloat16)
    engine.load_adapter("a", folder)
    assert engine.model.model.layers[0].self_attn.q_proj.A.dtype == torch.bfloat16
    reference = lorakit.PeftModel.from_pretrained(byte_llama().to(torch.bfloat16), folder)
    fp32 = merged_by_hand(byte_llama(), {folder: 1.0})
    got = engine.prompt_logits(PROMPTS, ["a"] * len(PROMPTS))
    for prompt, row in zip(PROMPTS, got, strict=True):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0].float()
            exact = fp32(torch.tensor([prompt])).logits[0]
        assert row.dtype == torch.bfloat16
        assert (row.float() - expected).abs().max() < BF16_LOGITS_ATOL
        assert (row.float() - exact).abs().max() < BF16_LOGITS_ATOL


def test_nf4_base_from_a_folder_equals_lorakit_qlora_model(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    byte_llama().save_pretrained(base_dir)
    byte_tokenizer().save_pretrained(base_dir)
    folder = save_adapter(
        byte_llama, tmp_path / "a", 1, r=8, lora_alpha=16, target_modules="all-linear"
    )
    engine = Engine.from_pretrained(base_dir, load_in_4bit=True)
    engine.load_adapter("a", folder)
    assert isinstance(engine.model.model.layers[0].mlp.up_proj.base_layer, QuantLinear)
    reference = lorakit.PeftModel.from_pretrained(load_quantized(base_dir), folder)
    completions = engine.generate(["hello", "ab"], ["a", "a"], SamplingParams(max_tokens=8))
    for text, completion in zip(["hello", "ab"], completions, strict=True):
        prompt = engine.tokenizer(text)["input_ids"]
        assert completion.token_ids == greedy_reference(reference, prompt, 8)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        got = engine.prompt_logits([prompt], ["a"])[0]
        assert (got - expected).abs().max() < FP32_LOGITS_ATOL


def tiny_byte_bert(num_labels: int = 3) -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=258,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=num_labels,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _randomized_heads(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def test_classifier_base_with_demo_style_adapters_equals_their_peft_models(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    tiny_byte_bert().save_pretrained(base_dir)
    byte_tokenizer().save_pretrained(base_dir)
    demo = lorakit.LoraConfig(
        task_type="SEQ_CLS",
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
        init_lora_weights=False,
    )
    model = lorakit.get_peft_model(tiny_byte_bert(), demo)
    _randomized_heads(model, 1)
    model.save_pretrained(tmp_path / "demo")
    peft_model = peft.get_peft_model(
        tiny_byte_bert(),
        peft.LoraConfig(
            task_type="SEQ_CLS",
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            init_lora_weights=False,
        ),
    )
    _randomized_heads(peft_model, 2)
    peft_model.save_pretrained(tmp_path / "peft")
    engine = Engine.from_pretrained(base_dir)
    assert engine.task == "seq_cls"
    engine.load_adapter("demo", tmp_path / "demo")
    engine.load_adapter("peft", tmp_path / "peft")
    texts = ["great film", "a dull, long evening", "ok"]
    encoded = engine.tokenizer(texts, padding=True, return_tensors="pt")
    references = {
        "demo": lorakit.PeftModel.from_pretrained(tiny_byte_bert(), tmp_path / "demo"),
        "peft": peft.PeftModel.from_pretrained(tiny_byte_bert(), tmp_path / "peft"),
        None: tiny_byte_bert(),
    }
    for adapter, reference in references.items():
        with torch.no_grad():
            expected = torch.softmax(reference.eval()(**encoded).logits, dim=-1)
        results = engine.classify(texts, adapter)
        for row, result in zip(expected, results, strict=True):
            probs = torch.tensor(list(result.scores.values()))
            assert list(result.scores) == ["negative", "neutral", "positive"]
            assert (probs - row).abs().max() < PROBS_ATOL
            assert result.label == ["negative", "neutral", "positive"][int(row.argmax())]
    with pytest.raises(lorakit.errors.ServeError, match="classifies"):
        engine.submit([1, 2], "demo")
