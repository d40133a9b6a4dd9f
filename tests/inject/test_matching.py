"""Which modules a config selects, with which ranks: names, regexes, layers, patterns, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import TargetModuleError, UnsupportedModuleError
from lorakit.inject.matching import name_matcher
from lorakit.layers import LoraLayer
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama


def _ranks(config: LoraConfig, build: object = tiny_llama) -> dict[str, tuple[int, float]]:
    model = get_peft_model(build(), config)  # type: ignore[operator]
    return {
        key.removeprefix("base_model.model."): (module.r["default"], module.scaling["default"])
        for key, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _paths(layers: list[int], names: list[str]) -> set[str]:
    parents = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {
        f"model.layers.{i}.{parents.get(name, 'self_attn')}.{name}"
        for i in layers
        for name in names
    }


def test_names_match_last_dotted_parts() -> None:
    assert set(_ranks(LoraConfig(target_modules=["q_proj", "mlp.up_proj"]))) == _paths(
        [0, 1], ["q_proj"]
    ) | _paths([0, 1], ["up_proj"])


def test_regex_must_match_the_whole_path() -> None:
    selected = _ranks(LoraConfig(target_modules=r".*\.1\.self_attn\.(k|v)_proj"))
    assert set(selected) == _paths([1], ["k_proj", "v_proj"])


def test_all_linear_skips_the_output_head() -> None:
    assert set(_ranks(LoraConfig(target_modules="all-linear"))) == _paths([0, 1], LLAMA_LINEARS)


def test_default_targets_come_from_model_type() -> None:
    assert set(_ranks(LoraConfig())) == _paths([0, 1], ["q_proj", "v_proj"])
    assert set(_ranks(LoraConfig(), tiny_gpt2)) == {
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    }


def test_exclude_modules() -> None:
    config = LoraConfig(target_modules="all-linear", exclude_modules=["mlp.down_proj", "k_proj"])
    expected = _paths([0, 1], [n for n in LLAMA_LINEARS if n not in ("down_proj", "k_proj")])
    assert set(_ranks(config)) == expected


@pytest.mark.parametrize(("layers", "expected"), [(1, [1]), ([0], [0]), ([0, 1], [0, 1])])
def test_layers_to_transform(layers: int | list[int], expected: list[int]) -> None:
    config = LoraConfig(
        target_modules=["q_proj"], layers_to_transform=layers, layers_pattern="layers"
    )
    assert set(_ranks(config)) == _paths(expected, ["q_proj"])
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=layers)
    assert set(_ranks(config)) == _paths(expected, ["q_proj"])


def test_rank_and_alpha_patterns_by_name_and_regex() -> None:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 16},
        alpha_pattern={"down_proj": 32},
    )
    selected = _ranks(config)
    for i in (0, 1):
        assert selected[f"model.layers.{i}.self_attn.q_proj"] == (4, 2.0)
        assert selected[f"model.layers.{i}.self_attn.v_proj"] == (2, 4.0)
    assert selected["model.layers.0.mlp.down_proj"] == (4, 8.0)
    assert selected["model.layers.1.mlp.down_proj"] == (16, 2.0)


def test_rslora_scaling() -> None:
    selected = _ranks(LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert {scale for _, scale in selected.values()} == {2.0}


def test_unknown_target_lists_closest_names() -> None:
    with pytest.raises(TargetModuleError, match=r"'q_prj' is not in the base model.*'q_proj'"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_prj"]))


def test_config_that_matches_nothing_says_so() -> None:
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=[7])
    with pytest.raises(TargetModuleError, match="The config matches no module"):
        get_peft_model(tiny_llama(), config)
    with pytest.raises(TargetModuleError, match=r"regex 'nothing\.\*' matches no module path"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules="nothing.*"))


def test_unsupported_module_type_lists_supported_types() -> None:
    with pytest.raises(
        UnsupportedModuleError, match=r"LlamaAttention.*Supported types: \[.*'torch.nn.Linear'"
    ):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


def test_unknown_architecture_asks_for_target_modules() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(TargetModuleError, match="set target_modules"):
        get_peft_model(model, LoraConfig())


def test_failed_injection_leaves_the_model_untouched() -> None:
    model = tiny_llama()
    before = [(k, type(m)) for k, m in model.named_modules()]
    with pytest.raises(TargetModuleError, match="Target module 'missing' is not in the base model"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "missing"]))
    assert [(k, type(m)) for k, m in model.named_modules()] == before


def test_seq_cls_head_trains_and_is_saved() -> None:
    model = get_peft_model(
        tiny_bert_classifier(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"])
    )
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert "base_model.model.classifier.original_module.weight" not in trainable


_SEGMENTS = st.sampled_from(["model", "layers", "0", "1", "q_proj", "mlp", "xq_proj", "a.b"])
_PATHS = st.lists(_SEGMENTS, min_size=1, max_size=5).map(".".join)


@given(key=_PATHS, names=st.lists(_PATHS, max_size=4))
def test_name_matcher_agrees_with_the_list_definition(key: str, names: list[str]) -> None:
    # The reference: an entry equals the whole path or its last dotted parts.
    expected = any(key == name or key.endswith("." + name) for name in names)
    assert name_matcher(names)(key) is expected


def test_injection_restores_the_thread_count() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
