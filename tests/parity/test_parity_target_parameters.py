"""`target_parameters` against peft 0.21.2: LoRA on MoE expert stacks (3-D nn.Parameter).

Qwen3-MoE stores its experts (E, out, in), gpt-oss (E, in, out) (`is_transposed`); tiny
Llama's `mlp.up_proj.weight` is the 2-D case. Both libraries wrap deep copies of one base and
lorakit loads peft's adapter values with a strict `load_state_dict`, so every comparison is of
the same numbers through each library's code.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, TargetModuleError, UnsupportedOptionError
from lorakit.layers import LoraLayer
from lorakit.layers.parameter import LoraParameter
from parity.parity_support import (
    FORWARD_TOL,
    MERGE_TOL,
    STATE_TOL,
    Pair,
    adapted_names,
    assert_forward_matches_peft,
    build_pair,
    changes_output,
    layer_settings,
    max_abs_diff,
    run,
    tiny_llama,
    token_batch,
    trainable_names,
)
from tiny_models import tiny_gpt_oss, tiny_qwen3_moe

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Gradients of the same fp32 products summed in another order (measured: 2e-8 here).
GRAD_TOL = 1e-6
MOE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "qwen3_moe": tiny_qwen3_moe,
    "gpt_oss": tiny_gpt_oss,
}
# model -> (factory, target_parameters)
CASES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "qwen3_moe": (tiny_qwen3_moe, EXPERTS),
    "gpt_oss": (tiny_gpt_oss, EXPERTS),
    "llama_2d": (tiny_llama, ["mlp.up_proj.weight"]),
}


def _pair(make_base: Callable[[], nn.Module], **options: Any) -> Pair:
    """Both libraries with target_modules q_proj plus the parameters; lorakit holds peft's
    random (non-zero B) values."""
    config = {
        "r": 2,
        "lora_alpha": 3,
        "target_modules": ["q_proj"],
        "target_parameters": EXPERTS,
        "init_lora_weights": False,
        **options,
    }
    pair = build_pair(make_base, **config)
    pair.copy_peft_weights()
    return pair


def _loss_gradients(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }


def _expert_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The experts' own parameters by their path in the user's model, `base_layer` removed."""
    parameters = {}
    for name, parameter in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace("base_layer.", "")
        if ".experts." in name and "lora_" not in name:
            parameters[name] = parameter.detach().clone()
    return parameters


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_gradients_counts_and_keys_equal_peft(case: str) -> None:
    make_base, targets = CASES[case]
    pair = _pair(make_base, target_parameters=targets)
    ids = token_batch(batch=2, length=9)
    assert set(pair.lorakit_model.state_dict()) == set(pair.peft_model.state_dict())
    assert trainable_names(pair.lorakit_model) == trainable_names(pair.peft_model)
    counts = pair.lorakit_model.get_nb_trainable_parameters()
    assert counts == pair.peft_model.get_nb_trainable_parameters()
    got = run(pair.lorakit_model, ids)
    assert changes_output(got, run(pair.base, ids))
    assert_forward_matches_peft(got, pair.peft_model, ids)
    ours = _loss_gradients(pair.lorakit_model, ids)
    theirs = _loss_gradients(pair.peft_model, ids)
    assert set(ours) == set(theirs) == trainable_names(pair.peft_model)
    for name, gradient in theirs.items():
        assert gradient.abs().max() > 0, name  # every expert adapter is reached
        assert max_abs_diff(ours[name], gradient) <= GRAD_TOL, name


@pytest.mark.parametrize("model_name", sorted(MOE_MODELS))
def test_grouped_mm_experts_equal_peft(model_name: str) -> None:
    """transformers' default experts kernel (grouped_mm, fp32 only) reads the adapted stack."""
    base = MOE_MODELS[model_name]()
    base.config._experts_implementation = "grouped_mm"
    pair = _pair(base)
    ids = token_batch(batch=2, length=9)
    got = run(pair.lorakit_model, ids)
    assert changes_output(got, run(pair.base, ids))
    assert max_abs_diff(got, run(pair.peft_model, ids)) <= FORWARD_TOL
    ours = _loss_gradients(pair.lorakit_model, ids)
    theirs = _loss_gradients(pair.peft_model, ids)
    assert all(max_abs_diff(ours[name], g) <= GRAD_TOL for name, g in theirs.items())


def test_expert_stacks_get_one_block_of_rank_r_per_expert_nested_as_peft() -> None:
    pair = _pair(tiny_qwen3_moe)
    experts = pair.lorakit_model.get_base_model().model.layers[0].mlp.experts
    assert isinstance(experts, LoraParameter) and experts.parameter_name == "down_proj"
    inner = experts.base_layer
    assert isinstance(inner, LoraParameter) and inner.parameter_name == "gate_up_proj"
    assert type(inner.base_layer).__name__ == "Qwen3MoeExperts"
    # gate_up_proj (4, 48, 32) is (E, out, in): A (E·r, in), B (out, r·E)
    assert tuple(inner.lora_A["default"].weight.shape) == (8, 32)
    assert tuple(inner.lora_B["default"].weight.shape) == (48, 8)


@pytest.mark.parametrize("model_name", sorted(MOE_MODELS))
def test_files_load_both_ways_with_peft(model_name: str, tmp_path: Path) -> None:
    make_base = MOE_MODELS[model_name]
    pair = _pair(make_base)
    ids = token_batch(batch=2, length=9)
    pair.peft_model.save_pretrained(tmp_path / "peft")
    pair.lorakit_model.save_pretrained(tmp_path / "lorakit")
    files = [
        load_file(tmp_path / name / "adapter_model.safetensors") for name in ("peft", "lorakit")
    ]
    assert set(files[0]) == set(files[1])
    assert all(torch.equal(files[0][key], files[1][key]) for key in files[0])
    configs = [
        json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("peft", "lorakit")
    ]
    assert sorted(configs[1]["target_parameters"]) == sorted(configs[0]["target_parameters"])

    from_peft = PeftModel.from_pretrained(make_base(), tmp_path / "peft")
    assert_forward_matches_peft(run(from_peft, ids), pair.peft_model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_from_lorakit = peft.PeftModel.from_pretrained(make_base(), tmp_path / "lorakit")
    assert_forward_matches_peft(run(pair.lorakit_model, ids), peft_from_lorakit, ids)
    assert changes_output(run(from_peft, ids), run(pair.base, ids))


@pytest.mark.parametrize("model_name", sorted(MOE_MODELS))
def test_merge_unmerge_and_merge_and_unload_equal_peft(model_name: str) -> None:
    pair = _pair(MOE_MODELS[model_name])
    model, peft_model = pair.lorakit_model, pair.peft_model
    ids = token_batch(batch=2, length=9)
    adapted = run(model, ids)
    original = _expert_parameters(model)

    model.merge_adapter()
    peft_model.merge_adapter()
    merged = _expert_parameters(model)
    for name, value in _expert_parameters(peft_model).items():
        assert max_abs_diff(merged[name], value) <= STATE_TOL, name
        is_target = name.endswith(("gate_up_proj", "down_proj"))  # not gpt-oss' biases
        assert torch.equal(merged[name], original[name]) is not is_target, name
    assert max_abs_diff(run(model, ids), adapted) <= MERGE_TOL
    model.unmerge_adapter()
    restored = _expert_parameters(model)
    assert all(torch.equal(restored[name], value) for name, value in original.items())
    assert torch.equal(run(model, ids), adapted)

    peft_model.unmerge_adapter()
    plain = model.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_plain = peft_model.merge_and_unload()
    assert not any(isinstance(module, LoraLayer) for module in plain.modules())
    experts = plain.model.layers[0].mlp.experts
    assert type(experts) is type(pair.base.model.layers[0].mlp.experts)
    expected = dict(peft_plain.named_parameters())
    for name, value in plain.named_parameters():
        assert max_abs_diff(value, expected[name]) <= STATE_TOL, name
    assert max_abs_diff(run(plain, ids), adapted) <= MERGE_TOL


def test_several_adapters_switch_disable_delete_and_unload_as_peft() -> None:
    pair = _pair(tiny_qwen3_moe)
    model, peft_model = pair.lorakit_model, pair.peft_model
    ids = token_batch(batch=2, length=9)
    torch.manual_seed(4)
    options = {"r": 3, "lora_alpha": 5, "target_modules": [], "target_parameters": EXPERTS}
    peft_model.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **options))
    model.add_adapter("other", LoraConfig(**options))
    pair.copy_peft_weights()  # strict: same keys for both adapters
    base_output = run(pair.base, ids)
    for name in ("other", "default"):
        model.set_adapter(name)
        peft_model.set_adapter(name)
        assert_forward_matches_peft(run(model, ids), peft_model, ids)
    with model.disable_adapter():
        assert torch.equal(run(model, ids), base_output)
    model.base_model.set_adapter(["default", "other"])  # both act: W + ΔW_default + ΔW_other
    peft_model.base_model.set_adapter(["default", "other"])
    assert_forward_matches_peft(run(model, ids), peft_model, ids)

    model.delete_adapter("default")
    peft_model.delete_adapter("default")
    # (lorakit puts q_proj, left without adapters, back unwrapped; peft keeps an empty wrapper)
    experts_keys = [
        {key for key in m.state_dict() if ".experts." in key} for m in (model, peft_model)
    ]
    assert experts_keys[0] == experts_keys[1]
    model.set_adapter("other")
    peft_model.set_adapter("other")
    assert_forward_matches_peft(run(model, ids), peft_model, ids)
    assert trainable_names(model) == trainable_names(peft_model)

    plain = model.unload()
    assert not any(isinstance(module, LoraLayer) for module in plain.modules())
    assert torch.equal(run(plain, ids), base_output)


def test_without_target_modules_the_model_types_defaults_are_adapted_as_in_peft() -> None:
    for make_base, targets in ((tiny_qwen3_moe, EXPERTS), (tiny_llama, ["mlp.up_proj.weight"])):
        options = {"target_parameters": targets}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft.get_peft_model(make_base(), peft.LoraConfig(**options))
        model = get_peft_model(make_base(), LoraConfig(**options))
        assert adapted_names(model) == adapted_names(peft_model)
    assert "model.layers.0.self_attn.q_proj" in adapted_names(model)  # Llama's defaults


def test_inject_adapter_in_model_wraps_the_parameters_as_peft() -> None:
    config = {"r": 2, "target_modules": [], "target_parameters": EXPERTS}
    ours = lorakit.inject_adapter_in_model(LoraConfig(**config), tiny_qwen3_moe())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), tiny_qwen3_moe())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert trainable_names(ours) == trainable_names(theirs)


REFUSED_OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "lora_dropout": ({"lora_dropout": 0.1}, "lora_dropout"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    "use_dora": ({"use_dora": True}, "use_dora"),
    "lora_bias": ({"lora_bias": True}, "lora_bias"),
    "pissa": ({"init_lora_weights": "pissa"}, "weight"),
    "orthogonal": ({"init_lora_weights": "orthogonal"}, "weight"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_OPTIONS))
def test_options_peft_refuses_with_target_parameters_are_refused(name: str) -> None:
    options, peft_message = REFUSED_OPTIONS[name]
    config = {"target_modules": [], "target_parameters": EXPERTS, **options}
    with pytest.raises((ValueError, AttributeError), match=peft_message):
        peft.get_peft_model(tiny_qwen3_moe(), peft.LoraConfig(**config))
    base = tiny_qwen3_moe()
    field = "init_lora_weights" if "init_lora_weights" in options else name
    with pytest.raises(ConfigError, match=field):
        get_peft_model(base, peft.LoraConfig(**config))
    assert not any(isinstance(module, LoraLayer) for module in base.modules())


def test_another_adapter_must_name_the_same_parameters() -> None:
    model = get_peft_model(
        tiny_qwen3_moe(), LoraConfig(target_modules=[], target_parameters=EXPERTS)
    )
    with pytest.raises(ConfigError, match=r"must name the same parameters"):
        model.add_adapter("other", LoraConfig(target_modules=[], target_parameters=EXPERTS[:1]))
    assert list(model.peft_config) == ["default"]


def test_per_row_adapters_and_weighted_combination_are_refused() -> None:
    model = get_peft_model(
        tiny_qwen3_moe(), LoraConfig(target_modules=[], target_parameters=EXPERTS)
    )
    ids = token_batch(batch=2, length=9)
    with pytest.raises(UnsupportedOptionError, match=r"adapter_names"):
        model(ids, adapter_names=["default", "__base__"])
    with pytest.raises(ConfigError, match=r"target_parameters"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")


def test_unmatched_name_and_a_layer_also_in_target_modules_are_refused() -> None:
    with pytest.raises(TargetModuleError, match=r"'mlp.experts.up_proj' matches no parameter"):
        get_peft_model(
            tiny_qwen3_moe(),
            LoraConfig(target_modules=[], target_parameters=["mlp.experts.up_proj"]),
        )
    config = {"target_modules": ["up_proj"], "target_parameters": ["up_proj.weight"]}
    with pytest.raises(ValueError, match=r"not a valid target"):
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    base = tiny_llama()
    with pytest.raises(TargetModuleError, match=r"also adapted as a layer"):
        get_peft_model(base, LoraConfig(**config))
    assert not any(isinstance(module, LoraLayer) for module in base.modules())


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_biases_train_and_save_as_peft_beside_gpt_oss_expert_biases(
    bias: str, tmp_path: Path
) -> None:
    """gpt-oss' experts hold `gate_up_proj_bias` / `down_proj_bias`: not `.bias`, so with
    peft neither bias mode trains them (a `*bias` suffix rule would train and not save them)."""
    pair = _pair(tiny_gpt_oss, bias=bias)
    assert trainable_names(pair.lorakit_model) == trainable_names(pair.peft_model)
    assert not any("proj_bias" in name for name in trainable_names(pair.lorakit_model))
    assert any(name.endswith(".bias") for name in trainable_names(pair.lorakit_model))
    pair.peft_model.save_pretrained(tmp_path / "peft")
    pair.lorakit_model.save_pretrained(tmp_path / "lorakit")
    keys = [set(load_file(tmp_path / n / "adapter_model.safetensors")) for n in ("peft", "lorakit")]
    assert keys[0] == keys[1]


def test_bf16_experts_get_fp32_adapters_and_merging_changes_no_output_bit() -> None:
    """On a bf16 stack the adapters stay fp32 and W + ΔW is summed in fp32 and rounded once,
    in the forward as in the merge: merged and unmerged outputs are the same bits."""
    base = tiny_qwen3_moe().to(torch.bfloat16)
    config = LoraConfig(target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    model = get_peft_model(base, config)
    experts = model.get_base_model().model.layers[0].mlp.experts
    assert experts.lora_A["default"].weight.dtype == torch.float32
    ids = token_batch(batch=2, length=9)
    original = _expert_parameters(model)
    adapted = run(model, ids)
    model.merge_adapter()
    assert torch.equal(run(model, ids), adapted)
    model.unmerge_adapter()
    assert all(torch.equal(value, original[n]) for n, value in _expert_parameters(model).items())
    with model.disable_adapter():
        assert changes_output(adapted.float(), run(model, ids).float())


def test_compiled_hotswap_padding_keeps_outputs_and_the_file_loads_in_peft(
    tmp_path: Path,
) -> None:
    pair = _pair(tiny_qwen3_moe)
    model = pair.lorakit_model
    ids = token_batch(batch=2, length=9)
    adapted = run(model, ids)
    lorakit.prepare_model_for_compiled_hotswap(model, target_rank=5)
    experts = model.get_base_model().model.layers[0].mlp.experts
    assert experts.r["default"] == 5 and tuple(experts.lora_A["default"].weight.shape) == (20, 24)
    assert max_abs_diff(run(model, ids), adapted) <= FORWARD_TOL
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_qwen3_moe(), tmp_path)
    assert max_abs_diff(run(loaded, ids), adapted) <= FORWARD_TOL


def test_one_dimensional_parameter_and_inject_from_a_state_dict_are_refused() -> None:
    base = tiny_gpt_oss()
    config = LoraConfig(target_modules=["q_proj"], target_parameters=["mlp.router.bias"])
    with pytest.raises(TargetModuleError, match=r"'model.layers.0.mlp.router.bias' of shape"):
        get_peft_model(base, config)
    assert not any(isinstance(module, LoraLayer) for module in base.modules())
    state_dict = get_peft_model(
        tiny_qwen3_moe(), LoraConfig(target_modules=["q_proj"])
    ).state_dict()
    config = LoraConfig(target_modules=[], target_parameters=EXPERTS)
    with pytest.raises(ConfigError, match=r"state_dict=\.\.\.\) with target_parameters"):
        lorakit.inject_adapter_in_model(config, tiny_qwen3_moe(), state_dict=state_dict)


@pytest.mark.parametrize(
    "target_modules",
    ["all-linear", r"model\.layers\.0\.self_attn\.q_proj"],
    ids=["all-linear", "regex"],
)
def test_targets_peft_rewrites_into_target_parameters_are_refused(target_modules: str) -> None:
    """On Qwen3-MoE peft (with transformers 5) turns "all-linear" into expert stacks and the
    router's weight, and a regex into every layer of the names it matched."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(
            tiny_qwen3_moe(), peft.LoraConfig(target_modules=target_modules)
        )
    planned = {"model.layers.0.self_attn.q_proj"} if target_modules != "all-linear" else set()
    assert set(adapted_names(peft_model)) - planned  # peft adapts more than the spec says
    base = tiny_qwen3_moe()
    with pytest.raises(ConfigError, match=r"target_modules=.* peft rewrites such targets"):
        get_peft_model(base, LoraConfig(target_modules=target_modules))
    assert not any(isinstance(module, LoraLayer) for module in base.modules())


@pytest.mark.parametrize(
    ("make_base", "target_modules"),
    [(tiny_qwen3_moe, r".*\.q_proj"), (tiny_gpt_oss, "all-linear")],
    ids=["qwen3_moe-regex", "gpt_oss-all-linear"],
)
def test_targets_peft_leaves_as_they_are_adapt_the_same_layers(
    make_base: Callable[[], nn.Module], target_modules: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(
            make_base(), peft.LoraConfig(target_modules=target_modules)
        )
    model = get_peft_model(make_base(), LoraConfig(target_modules=target_modules))
    assert adapted_names(model) == adapted_names(peft_model)


def test_patterns_rslora_and_layer_selectors_act_as_in_peft() -> None:
    """rank/alpha patterns match parameter paths; layers_to_transform selects modules only
    (peft matches target_parameters by name alone); the default init starts at the base."""
    options = {
        "target_modules": ["q_proj"],
        "target_parameters": EXPERTS,
        "layers_to_transform": [0],
        "rank_pattern": {"gate_up_proj": 3},
        "alpha_pattern": {"down_proj": 7},
        "use_rslora": True,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(tiny_qwen3_moe(), peft.LoraConfig(**options))
    model = get_peft_model(tiny_qwen3_moe(), LoraConfig(**options))
    assert layer_settings(model) == layer_settings(peft_model)
    assert "model.layers.1.mlp.experts" in layer_settings(model)
    assert "model.layers.1.self_attn.q_proj" not in layer_settings(model)
    assert layer_settings(model)["model.layers.0.mlp.experts.base_layer"][0] == {"default": 3}
    ids = token_batch(batch=2, length=9)
    assert torch.equal(run(model, ids), run(tiny_qwen3_moe(), ids))  # B = 0: W + 0 is W
