"""peft as the oracle for the rest of its surface: status, functional API, task classes,
`LoraModel`, training preparation and config files, on the same weights in both libraries."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

import lorakit
from parity.parity_support import (
    FORWARD_TOL,
    MERGE_TOL,
    Pair,
    build_pair,
    changes_output,
    max_abs_diff,
    run,
    tiny_bert_classifier,
    tiny_llama,
    tiny_t5,
    token_batch,
)

# Adapters on q/v with lm_head trained in full: LoRA layers and a ModulesToSaveWrapper.
HEAD_CONFIG: dict[str, Any] = {
    "r": 4,
    "target_modules": ["q_proj", "v_proj"],
    "modules_to_save": ["lm_head"],
    "init_lora_weights": False,
}


def assert_same_status(peft_status: Any, lorakit_status: Any) -> None:
    """Every field of peft's status dataclass equals lorakit's field of the same name."""
    for item in dataclasses.fields(peft_status):
        expected = getattr(peft_status, item.name)
        assert getattr(lorakit_status, item.name) == expected, item.name


def assert_same_statuses(pair: Pair) -> None:
    peft_layers = pair.peft_model.get_layer_status()
    lorakit_layers = pair.lorakit_model.get_layer_status()
    assert len(lorakit_layers) == len(peft_layers)
    for peft_layer, lorakit_layer in zip(peft_layers, lorakit_layers, strict=True):
        assert_same_status(peft_layer, lorakit_layer)
    assert_same_status(pair.peft_model.get_model_status(), pair.lorakit_model.get_model_status())


def pair_with_two_adapters() -> Pair:
    pair = build_pair(tiny_llama, **HEAD_CONFIG)
    pair.copy_peft_weights()
    pair.peft_model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pair.lorakit_model.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    return pair


def both(pair: Pair, method: str, *args: Any, **kwargs: Any) -> None:
    for model in (pair.peft_model, pair.lorakit_model):
        getattr(model, method)(*args, **kwargs)


def test_status_matches_peft_field_by_field_through_switches_and_grads() -> None:
    pair = pair_with_two_adapters()
    assert_same_statuses(pair)
    both(pair, "set_adapter", "other")
    assert_same_statuses(pair)  # the lm_head copy belongs to "default" only: "irregular"
    both(pair, "set_adapter", "default", inference_mode=True)
    assert pair.lorakit_model.get_model_status().requires_grad == {"default": False, "other": False}
    assert_same_statuses(pair)
    both(pair, "set_requires_grad", ["default", "other"], True)
    assert_same_statuses(pair)
    both(pair, "set_requires_grad", "other", False)
    assert_same_statuses(pair)


def test_status_matches_peft_when_merged_disabled_and_enabled() -> None:
    pair = pair_with_two_adapters()
    x = token_batch()
    both(pair, "merge_adapter")
    assert_same_statuses(pair)
    for model in (pair.peft_model, pair.lorakit_model):
        model.base_model.disable_adapter_layers()
    # peft unmerges at the next forward, lorakit at once: compare after one forward.
    disabled = run(pair.lorakit_model, x)
    assert max_abs_diff(disabled, run(pair.base, x)) <= MERGE_TOL
    assert max_abs_diff(run(pair.peft_model, x), disabled) <= MERGE_TOL
    assert pair.lorakit_model.get_model_status().enabled is False
    assert pair.lorakit_model.get_model_status().trainable_params == 0
    assert_same_statuses(pair)
    for model in (pair.peft_model, pair.lorakit_model):
        model.base_model.enable_adapter_layers()
    assert_same_statuses(pair)
    enabled = run(pair.lorakit_model, x)
    assert changes_output(enabled, disabled)
    # peft's unmerge subtracts the delta again (not bit-exact): merge rounding remains.
    assert max_abs_diff(enabled, run(pair.peft_model, x)) <= MERGE_TOL


def test_status_of_injected_models_matches_peft() -> None:
    base = tiny_llama()
    config = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    peft_model = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(base))
    lorakit_model = lorakit.inject_adapter_in_model(
        lorakit.LoraConfig(**config), copy.deepcopy(base)
    )
    for peft_layer, lorakit_layer in zip(
        peft.get_layer_status(peft_model), lorakit.get_layer_status(lorakit_model), strict=True
    ):
        assert_same_status(peft_layer, lorakit_layer)
    assert_same_status(peft.get_model_status(peft_model), lorakit.get_model_status(lorakit_model))
    trainable = {name for name, p in lorakit_model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in peft_model.named_parameters() if p.requires_grad}


def test_status_of_a_plain_torch_model_names_it_other_as_peft() -> None:
    def cnn() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))

    config = {"r": 2, "target_modules": ["0", "2"]}
    peft_model = peft.inject_adapter_in_model(peft.LoraConfig(**config), cnn())
    lorakit_model = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**config), cnn())
    assert lorakit.get_model_status(lorakit_model).base_model_type == "other"
    assert lorakit.get_layer_status(lorakit_model)[0].module_type == "lora.Conv2d"
    assert_same_status(peft.get_model_status(peft_model), lorakit.get_model_status(lorakit_model))


@pytest.mark.parametrize(
    ("options", "save_embedding_layers"),
    [
        (HEAD_CONFIG, "auto"),
        ({**HEAD_CONFIG, "bias": "all"}, "auto"),
        ({**HEAD_CONFIG, "bias": "lora_only"}, False),
        ({"r": 2, "target_modules": ["q_proj", "embed_tokens"]}, "auto"),
        ({"r": 2, "target_modules": ["q_proj"], "init_lora_weights": False}, True),
    ],
)
def test_get_peft_model_state_dict_matches_peft(
    options: dict[str, Any], save_embedding_layers: bool | str
) -> None:
    pair = build_pair(tiny_llama, **options)
    pair.copy_peft_weights()
    expected = peft.get_peft_model_state_dict(
        pair.peft_model, save_embedding_layers=save_embedding_layers
    )
    got = lorakit.get_peft_model_state_dict(
        pair.lorakit_model, save_embedding_layers=save_embedding_layers
    )
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_set_peft_model_state_dict_matches_peft() -> None:
    source = build_pair(tiny_llama, **HEAD_CONFIG)
    source.copy_peft_weights()
    state = peft.get_peft_model_state_dict(source.peft_model)
    state["base_model.model.model.layers.0.no_such_module.weight"] = torch.zeros(2)
    target = build_pair(tiny_llama, **{**HEAD_CONFIG, "init_lora_weights": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.set_peft_model_state_dict(target.peft_model, state)
    got = lorakit.set_peft_model_state_dict(target.lorakit_model, state)
    assert got.missing_keys == expected.missing_keys
    assert got.unexpected_keys == expected.unexpected_keys
    x = token_batch()
    loaded = run(target.lorakit_model, x)
    assert changes_output(loaded, run(source.base, x))
    assert max_abs_diff(loaded, run(source.peft_model, x)) <= FORWARD_TOL
    assert max_abs_diff(loaded, run(target.peft_model, x)) <= FORWARD_TOL


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_injected_model_round_trip_matches_peft(low_cpu_mem_usage: bool) -> None:
    source = build_pair(
        tiny_llama, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    state = peft.get_peft_model_state_dict(source.peft_model)
    config = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    peft_model = peft.inject_adapter_in_model(
        peft.LoraConfig(**config), tiny_llama(), low_cpu_mem_usage=low_cpu_mem_usage
    )
    lorakit_model = lorakit.inject_adapter_in_model(
        lorakit.LoraConfig(**config), tiny_llama(), low_cpu_mem_usage=low_cpu_mem_usage
    )
    expected = peft.set_peft_model_state_dict(
        peft_model, state, low_cpu_mem_usage=low_cpu_mem_usage
    )
    got = lorakit.set_peft_model_state_dict(
        lorakit_model, state, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert got.missing_keys == expected.missing_keys
    assert got.unexpected_keys == expected.unexpected_keys == []
    x = token_batch()
    adapted = run(lorakit_model, x)
    assert changes_output(adapted, run(source.base, x))
    assert max_abs_diff(adapted, run(peft_model, x)) <= FORWARD_TOL
    assert max_abs_diff(adapted, run(source.peft_model, x)) <= FORWARD_TOL
    expected_state = peft.get_peft_model_state_dict(peft_model)
    got_state = lorakit.get_peft_model_state_dict(lorakit_model)
    assert sorted(got_state) == sorted(expected_state)
    assert all(torch.equal(got_state[key], expected_state[key]) for key in expected_state)


def test_inject_from_state_dict_keys_adapts_the_same_modules_as_peft() -> None:
    injected = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, target_modules=["k_proj"]), tiny_llama()
    )
    state = peft.get_peft_model_state_dict(injected)  # keys without base_model.model.
    config = {"r": 4, "target_modules": ["v_proj"]}  # the state dict wins, as in peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.inject_adapter_in_model(
            peft.LoraConfig(**config), tiny_llama(), state_dict=state
        )
    lorakit_model = lorakit.inject_adapter_in_model(
        lorakit.LoraConfig(**config), tiny_llama(), state_dict=state
    )
    expected = [layer.name for layer in peft.get_layer_status(peft_model)]
    assert [layer.name for layer in lorakit.get_layer_status(lorakit_model)] == expected
    assert all(name.endswith("k_proj") for name in expected)


def test_load_peft_weights_matches_peft(tmp_path: Path) -> None:
    pair = build_pair(tiny_llama, **HEAD_CONFIG)
    pair.peft_model.save_pretrained(tmp_path)
    mapping = {r"layers\.0\.": "layers.1."}
    for key_mapping in (None, mapping):
        expected = peft.load_peft_weights(str(tmp_path), device="cpu", key_mapping=key_mapping)
        got = lorakit.load_peft_weights(tmp_path, device="cpu", key_mapping=key_mapping)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert any("layers.1." in key for key in got) and not any("layers.0." in key for key in got)


def test_prepare_model_for_kbit_training_matches_peft_on_a_bf16_model() -> None:
    base = tiny_llama().to(torch.bfloat16)
    expected = peft.prepare_model_for_kbit_training(copy.deepcopy(base))
    parameter = base.model.embed_tokens.weight
    got = lorakit.prepare_model_for_kbit_training(base)
    assert got is base and base.model.embed_tokens.weight is parameter  # same objects
    for (name, p_peft), (_, p_lorakit) in zip(
        expected.named_parameters(), got.named_parameters(), strict=True
    ):
        assert (p_lorakit.dtype, p_lorakit.requires_grad) == (p_peft.dtype, p_peft.requires_grad)
        assert torch.equal(p_lorakit, p_peft), name
    assert parameter.dtype == torch.float32
    assert got.is_gradient_checkpointing == expected.is_gradient_checkpointing is False


def test_prepare_model_for_kbit_training_matches_peft_on_a_kbit_model() -> None:
    base = tiny_llama()
    base.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit model
    expected = peft.prepare_model_for_kbit_training(copy.deepcopy(base))
    got = lorakit.prepare_model_for_kbit_training(base)
    assert got.is_gradient_checkpointing == expected.is_gradient_checkpointing is True
    lorakit_model = lorakit.get_peft_model(got, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit_model.train()
    # checkpointed frozen blocks pass gradients to the adapters only if inputs require grad
    output = lorakit_model.get_input_embeddings()(token_batch())
    assert output.requires_grad


def test_cast_mixed_precision_params_matches_peft() -> None:
    pair = build_pair(tiny_llama, **HEAD_CONFIG)
    pair.lorakit_model.to(torch.float16)
    pair.peft_model.to(torch.float16)
    peft.cast_mixed_precision_params(pair.peft_model, torch.bfloat16)
    lorakit.cast_mixed_precision_params(pair.lorakit_model, torch.bfloat16)
    expected = {name: p.dtype for name, p in pair.peft_model.named_parameters()}
    got = {name: p.dtype for name, p in pair.lorakit_model.named_parameters()}
    assert got == expected
    assert set(got.values()) == {torch.float32, torch.bfloat16}


@pytest.mark.parametrize(
    ("make_base", "task_type"),
    [
        (tiny_llama, "CAUSAL_LM"),
        (tiny_bert_classifier, "SEQ_CLS"),
        (tiny_bert_classifier, "TOKEN_CLS"),
        (tiny_t5, "SEQ_2_SEQ_LM"),
        (tiny_bert_classifier, "QUESTION_ANS"),
        (tiny_bert_classifier, "FEATURE_EXTRACTION"),
        (tiny_llama, None),
    ],
)
def test_task_classes_are_chosen_as_in_peft(
    make_base: Any, task_type: str | None, tmp_path: Path
) -> None:
    targets = {"LlamaForCausalLM": "q_proj", "T5ForConditionalGeneration": "q"}
    target = targets.get(type(make_base()).__name__, "query")
    pair = build_pair(make_base, r=2, target_modules=[target], task_type=task_type)
    assert type(pair.lorakit_model).__name__ == type(pair.peft_model).__name__
    assert isinstance(pair.lorakit_model, lorakit.PeftModel)
    pair.lorakit_model.save_pretrained(tmp_path)
    # as in peft, the saved task_type decides, whatever class from_pretrained is called on
    peft_loaded = peft.PeftModelForTokenClassification.from_pretrained(make_base(), tmp_path)
    loaded = lorakit.PeftModelForTokenClassification.from_pretrained(make_base(), tmp_path)
    expected = (
        "PeftModelForTokenClassification" if task_type is None else type(peft_loaded).__name__
    )
    assert type(loaded).__name__ == type(peft_loaded).__name__ == expected


def test_lora_model_surface_matches_peft() -> None:
    pair = pair_with_two_adapters()
    peft_base, lorakit_base = pair.peft_model.base_model, pair.lorakit_model.base_model
    assert type(lorakit_base).__name__ == type(peft_base).__name__ == "LoraModel"
    assert lorakit_base.targeted_module_names == peft_base.targeted_module_names
    assert lorakit_base.peft_config is pair.lorakit_model.peft_config
    assert lorakit_base.model is pair.lorakit_model.get_base_model()
    for base in (peft_base, lorakit_base):
        base.set_adapter("other")
    assert pair.lorakit_model.active_adapters == pair.peft_model.active_adapters == ["other"]
    assert lorakit_base.active_adapters == peft_base.active_adapters
    assert_same_statuses(pair)
    for base in (peft_base, lorakit_base):
        base.set_adapter("default")
        base.delete_adapter("other")
    assert list(pair.lorakit_model.peft_config) == list(pair.peft_model.peft_config)
    assert_same_statuses(pair)
    x = token_batch()
    expected = run(peft_base.merge_and_unload(), x)
    merged = lorakit_base.merge_and_unload()
    assert type(merged) is type(pair.base)
    assert changes_output(expected, run(pair.base, x))
    assert max_abs_diff(run(merged, x), expected) <= MERGE_TOL


def test_peft_model_properties_match_peft() -> None:
    pair = build_pair(tiny_bert_classifier, r=2, task_type="SEQ_CLS")
    for model in (pair.peft_model, pair.lorakit_model):
        model.add_adapter("other", type(model.active_peft_config)(r=2, modules_to_save=["pooler"]))
    assert pair.lorakit_model.modules_to_save == pair.peft_model.modules_to_save
    assert pair.lorakit_model.active_peft_config is pair.lorakit_model.peft_config["default"]
    assert pair.lorakit_model.active_peft_config.r == pair.peft_model.active_peft_config.r
    plain = build_pair(tiny_llama, r=2, target_modules=["q_proj"])
    assert plain.lorakit_model.modules_to_save is plain.peft_model.modules_to_save is None


def test_lorakit_config_files_load_in_peft_and_back(tmp_path: Path) -> None:
    config = lorakit.LoraConfig(
        r=6,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 3},
        task_type="CAUSAL_LM",
        inference_mode=False,
    )
    config.save_pretrained(tmp_path / "lorakit")
    loaded_by_peft = peft.LoraConfig.from_pretrained(str(tmp_path / "lorakit"))
    assert (loaded_by_peft.r, loaded_by_peft.lora_alpha, loaded_by_peft.rank_pattern) == (
        6,
        12,
        {"v_proj": 3},
    )
    assert loaded_by_peft.target_modules == {"q_proj", "v_proj"}
    assert loaded_by_peft.task_type == "CAUSAL_LM" and loaded_by_peft.inference_mode is False
    loaded_by_peft.save_pretrained(str(tmp_path / "peft"))
    reloaded = lorakit.LoraConfig.from_pretrained(tmp_path / "peft")
    assert isinstance(reloaded.target_modules, list)  # peft writes its set in any order
    assert dataclasses.replace(reloaded, target_modules=sorted(reloaded.target_modules)) == config
    path = tmp_path / "peft" / "adapter_config.json"
    assert lorakit.LoraConfig.from_json_file(path) == peft.LoraConfig.from_json_file(str(path))
    assert lorakit.LoraConfig.from_json_file(path) == json.loads(path.read_text())
