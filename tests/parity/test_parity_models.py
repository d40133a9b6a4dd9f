"""lorakit against peft on whole models: Llama, GPT-2, BERT (SEQ_CLS), T5, ViT and real MiniLM.

For the same base and config, both libraries must adapt the same modules, train the same number
of parameters, produce the same state-dict keys and, with peft's A/B values copied into lorakit
(`init_lora_weights=False`, so B != 0 and the adapters really change the output), give the same
outputs in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from parity.parity_support import (
    adapted_names,
    assert_forward_matches_peft,
    build_pair,
    changes_output,
    image_batch,
    layer_settings,
    run,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    tiny_vit,
    token_batch,
    trainable_names,
)


@dataclass(frozen=True)
class Case:
    make_base: Callable[[], nn.Module]
    config: dict[str, Any]
    inputs: Callable[[], dict[str, torch.Tensor]]
    all_linear_config: dict[str, Any] = field(default_factory=dict)


def _tokens() -> dict[str, torch.Tensor]:
    return {"input_ids": token_batch()}


def _seq2seq_tokens() -> dict[str, torch.Tensor]:
    ids = token_batch()
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": image_batch()}


CASES: dict[str, Case] = {
    "llama": Case(
        tiny_llama, {"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}, _tokens
    ),
    # GPT-2 holds transformers' Conv1D (weight stored (in, out)); targets come from the default.
    "gpt2": Case(tiny_gpt2, {"task_type": "CAUSAL_LM", "fan_in_fan_out": True}, _tokens),
    # SEQ_CLS: the classifier head joins modules_to_save in both; targets from the default.
    "bert": Case(tiny_bert_classifier, {"task_type": "SEQ_CLS"}, _tokens),
    "t5": Case(
        tiny_t5,
        {"task_type": "SEQ_2_SEQ_LM", "target_modules": ["q", "k", "v", "o"]},
        _seq2seq_tokens,
    ),
    # transformers 5 names ViT's attention projections q_proj/k_proj/v_proj.
    "vit": Case(
        tiny_vit,
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"]},
        _pixels,
    ),
}

LORA: dict[str, Any] = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}


def _config(case: Case, all_linear: bool) -> dict[str, Any]:
    config = {**LORA, **case.config}
    if all_linear:
        config["target_modules"] = "all-linear"
    return config


def _check_structure(pair: Any) -> None:
    peft_model, lorakit_model = pair.peft_model, pair.lorakit_model
    assert adapted_names(lorakit_model) == adapted_names(peft_model)
    assert layer_settings(lorakit_model) == layer_settings(peft_model)
    assert lorakit_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    assert trainable_names(lorakit_model) == trainable_names(peft_model)
    assert set(lorakit_model.state_dict()) == set(peft_model.state_dict())


def _check_forward(pair: Any, inputs: dict[str, torch.Tensor]) -> None:
    pair.copy_peft_weights()
    expected = run(pair.peft_model, inputs)
    got = run(pair.lorakit_model, inputs)
    # The adapters must matter, or agreement would prove nothing.
    assert changes_output(expected, run(pair.base, inputs))
    assert_forward_matches_peft(got, pair.peft_model, inputs)


@pytest.mark.parametrize("all_linear", [False, True], ids=["targets", "all-linear"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_structure_matches_peft(name: str, all_linear: bool) -> None:
    case = CASES[name]
    pair = build_pair(case.make_base, **_config(case, all_linear))
    _check_structure(pair)


@pytest.mark.parametrize("all_linear", [False, True], ids=["targets", "all-linear"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_peft(name: str, all_linear: bool, request: pytest.FixtureRequest) -> None:
    case = CASES[name]
    pair = build_pair(case.make_base, **_config(case, all_linear))
    _check_forward(pair, case.inputs())


@pytest.fixture(scope="module")
def minilm_inputs(minilm_dir: Path) -> dict[str, torch.Tensor]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    sentences = ["LoRA adapts a frozen model.", "A longer sentence, padded to the longest one."]
    return dict(tokenizer(sentences, padding=True, return_tensors="pt"))


@pytest.mark.parametrize(
    "target_modules", [["query", "value"], "all-linear"], ids=["query-value", "all-linear"]
)
def test_real_minilm_matches_peft(
    minilm: nn.Module, minilm_inputs: dict[str, torch.Tensor], target_modules: Any
) -> None:
    pair = build_pair(minilm, **LORA, target_modules=target_modules)
    expected_count = 6 * 2 if target_modules != "all-linear" else 6 * 6 + 1  # + pooler.dense
    assert len(adapted_names(pair.peft_model)) == expected_count
    _check_structure(pair)
    _check_forward(pair, minilm_inputs)
