"""The PEFT surface lorakit adds beside the lifecycle: what each call does on its own, and the
errors for what it does not do (peft comparisons are in tests/parity/test_parity_surface.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
import lorakit.io.atomic
from lorakit.errors import AdapterNameError, AdapterStateError, UnsupportedOptionError
from lorakit.io import AdapterMismatchError, AdapterNotFoundError, CorruptAdapterFileError
from tiny_models import tiny_llama, token_batch

CONFIG = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def _llama_model(**options: object) -> lorakit.PeftModel:
    torch.manual_seed(0)
    return lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**{**CONFIG, **options}))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


# --- LoraModel: base_model speaks for the PeftModel -------------------------------------------
def test_base_model_calls_act_on_the_peft_model() -> None:
    model = _llama_model()
    model.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter("other")
    assert model.active_adapters == ["other"]
    model.base_model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert model.base_model.targeted_module_names == [
        f"model.layers.{i}.self_attn.{name}" for i in (0, 1) for name in ("q_proj", "v_proj")
    ]


def test_deep_copy_keeps_each_lora_model_with_its_own_peft_model() -> None:
    model = _llama_model()
    copied = copy.deepcopy(model)
    assert copied.base_model.peft_config is copied.peft_config
    assert copied.base_model.peft_config is not model.peft_config
    copied.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    copied.base_model.set_adapter("other")
    assert copied.active_adapters == ["other"] and model.active_adapters == ["default"]


def test_disable_adapter_layers_runs_the_base_until_enabled() -> None:
    model = _llama_model()
    base_logits = _logits(tiny_llama())
    adapted = _logits(model)
    model.merge_adapter()
    model.disable_adapter_layers()  # PeftModel passes it to base_model, as peft does
    assert not model.get_layer_status()[0].merged_adapters
    assert torch.allclose(_logits(model), base_logits, atol=1e-5)
    assert model.get_nb_trainable_parameters()[0] == 0
    model.enable_adapter_layers()
    assert torch.allclose(_logits(model), adapted, atol=1e-5)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    assert model.get_model_status().requires_grad == {"default": True}


# --- PeftModel methods ------------------------------------------------------------------------
def test_set_adapter_inference_mode_freezes_and_plain_set_adapter_trains_again() -> None:
    model = _llama_model()
    model.set_adapter("default", inference_mode=True)
    assert model.get_nb_trainable_parameters()[0] == 0
    assert model.peft_config["default"].inference_mode is True
    model.set_adapter("default")
    # two layers of q_proj (32 -> 32) and v_proj (32 -> 16) at r=4: A is r x in, B out x r
    assert model.get_nb_trainable_parameters()[0] == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))


def test_set_requires_grad_touches_only_the_named_adapters() -> None:
    model = _llama_model()
    model.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_requires_grad("other")
    assert model.get_model_status().requires_grad == {"default": True, "other": True}
    model.set_requires_grad(["default", "other"], requires_grad=False)
    assert model.get_nb_trainable_parameters()[0] == 0
    with pytest.raises(AdapterNameError, match=r"'missing' does not exist"):
        model.set_requires_grad(["default", "missing"])
    assert model.get_nb_trainable_parameters()[0] == 0  # nothing changed


def test_status_names_lorakit_4bit_layers() -> None:
    from lorakit.quant import quantize_model_linears

    base = quantize_model_linears(tiny_llama())
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.get_layer_status()[0]
    assert (layer.module_type, layer.quantization_backend) == ("lora.QuantLinear", "lorakit 4bit")
    assert model.get_model_status().quantization_backend == "lorakit 4bit"


def test_status_of_a_model_without_adapters_raises() -> None:
    with pytest.raises(AdapterStateError, match="holds no lorakit adapter layer"):
        lorakit.get_model_status(tiny_llama())


@pytest.mark.parametrize(
    ("task_type", "class_name"),
    [("CAUSAL_LM", "PeftModelForCausalLM"), (None, "PeftModel")],
)
def test_auto_classes_return_task_classes(
    tmp_path: Path, task_type: str | None, class_name: str
) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    model = lorakit.get_peft_model(
        tiny_llama(),
        lorakit.LoraConfig(
            r=2,
            target_modules=["q_proj"],
            task_type=task_type,
            base_model_name_or_path=str(tmp_path / "base"),
        ),
    )
    assert type(model).__name__ == class_name
    model.save_pretrained(tmp_path / "adapter")
    loaded = lorakit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is lorakit.PeftModelForCausalLM  # as peft's AutoPeftModelForCausalLM


# --- functional API ---------------------------------------------------------------------------
def test_inject_adapter_in_model_refuses_what_it_cannot_do() -> None:
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(AdapterStateError, match=r"call model.add_adapter\('default', config\)"):
        lorakit.inject_adapter_in_model(config, _llama_model())
    model = lorakit.inject_adapter_in_model(config, tiny_llama())
    with pytest.raises(AdapterNameError, match="'default' is already injected"):
        lorakit.inject_adapter_in_model(config, model)
    with pytest.raises(AdapterStateError, match="holds no LoRA tensor keys"):
        lorakit.inject_adapter_in_model(config, tiny_llama(), "x", state_dict={"a.weight": None})


def test_second_injected_adapter_is_inactive_and_frozen() -> None:
    model = lorakit.inject_adapter_in_model(
        lorakit.LoraConfig(r=2, target_modules=["q_proj"]), tiny_llama()
    )
    lorakit.inject_adapter_in_model(
        lorakit.LoraConfig(r=2, target_modules=["v_proj"]), model, adapter_name="other"
    )
    status = lorakit.get_model_status(model)
    assert status.active_adapters == ["default"]
    assert status.requires_grad == {"default": True, "other": False}
    assert sorted(model.peft_config) == ["default", "other"]


def test_compiled_model_state_dict_needs_unwrap_compiled() -> None:
    model = _llama_model()
    compiled = torch.compile(model)
    with pytest.raises(AdapterStateError, match="pass unwrap_compiled=True"):
        lorakit.get_peft_model_state_dict(compiled)
    unwrapped = lorakit.get_peft_model_state_dict(compiled, unwrap_compiled=True)
    expected = lorakit.get_peft_model_state_dict(model)
    assert unwrapped.keys() == expected.keys()
    assert all(unwrapped[key].data_ptr() == expected[key].data_ptr() for key in expected)


def test_get_peft_model_state_dict_reads_the_given_state_dict() -> None:
    model = _llama_model()
    state = {key: torch.full_like(value, 7.0) for key, value in model.state_dict().items()}
    got = lorakit.get_peft_model_state_dict(model, state_dict=state)
    assert got and all(torch.equal(t, torch.full_like(t, 7.0)) for t in got.values())
    with pytest.raises(AdapterNameError, match="'nope' does not exist"):
        lorakit.get_peft_model_state_dict(model, adapter_name="nope")


def test_set_peft_model_state_dict_shapes_raise_unless_ignored() -> None:
    source = lorakit.get_peft_model_state_dict(_llama_model())
    target = _llama_model(init_lora_weights=True)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong = {**source, key: torch.zeros(3, 32)}
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(AdapterMismatchError, match=r"q_proj.lora_A: adapter \[3, 32\]"):
        lorakit.set_peft_model_state_dict(target, wrong)
    assert all(torch.equal(value, target.state_dict()[k]) for k, value in before.items())
    result = lorakit.set_peft_model_state_dict(target, wrong, ignore_mismatched_sizes=True)
    model_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert model_key in result.missing_keys
    assert torch.equal(target.state_dict()[model_key], before[model_key])  # skipped
    other = model_key.replace("lora_A", "lora_B")
    assert torch.equal(target.state_dict()[other], source[key.replace("lora_A", "lora_B")])


def test_meta_adapter_needs_low_cpu_mem_usage() -> None:
    source = lorakit.get_peft_model_state_dict(_llama_model())
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = lorakit.inject_adapter_in_model(config, tiny_llama(), low_cpu_mem_usage=True)
    with pytest.raises(AdapterStateError, match="pass low_cpu_mem_usage=True"):
        lorakit.set_peft_model_state_dict(model, source)
    lorakit.set_peft_model_state_dict(model, source, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.allclose(_logits(model), _logits(_llama_model()), atol=1e-6)


def test_load_peft_weights_options(tmp_path: Path) -> None:
    model = _llama_model()
    model.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    other = lorakit.load_peft_weights(tmp_path, device="cpu", subfolder="other")
    assert len(other) == 4 and all(t.shape[0] == 2 or t.shape[1] == 2 for t in other.values())
    with pytest.raises(UnsupportedOptionError, match=r"load_peft_weights\(revision='main'\)"):
        lorakit.load_peft_weights(tmp_path, revision="main")
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        lorakit.load_peft_weights(tmp_path / "missing")


# --- training preparation ---------------------------------------------------------------------
def test_prepare_model_for_kbit_training_refuses_unused_options() -> None:
    with pytest.raises(UnsupportedOptionError, match=r"gradient_checkpointing_kwargs=.*no effect"):
        lorakit.prepare_model_for_kbit_training(
            tiny_llama(), gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    plain = nn.Sequential(nn.Linear(4, 4))
    plain.is_loaded_in_8bit = True
    with pytest.raises(UnsupportedOptionError, match="pass use_gradient_checkpointing=False"):
        lorakit.prepare_model_for_kbit_training(plain)
    assert lorakit.prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False) is plain
    assert not plain[0].weight.requires_grad


def test_prepare_model_for_kbit_training_checkpoints_lorakit_4bit_bases() -> None:
    from lorakit.quant import quantize_model_linears

    base = quantize_model_linears(tiny_llama())
    lorakit.prepare_model_for_kbit_training(
        base, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert base.is_gradient_checkpointing
    assert not any(parameter.requires_grad for parameter in base.parameters())


def test_cast_mixed_precision_params_keeps_integer_parameters() -> None:
    module = nn.Linear(4, 4)
    module.codes = nn.Parameter(torch.arange(4, dtype=torch.uint8), requires_grad=False)
    module.weight.requires_grad_(False)
    lorakit.cast_mixed_precision_params(module, torch.float16)
    assert (module.weight.dtype, module.bias.dtype) == (torch.float16, torch.float32)
    assert torch.equal(module.codes, torch.arange(4, dtype=torch.uint8))
    with pytest.raises(UnsupportedOptionError, match=r"dtype=torch.int8.*floating"):
        lorakit.cast_mixed_precision_params(module, torch.int8)


# --- LoraConfig files -------------------------------------------------------------------------
def test_config_from_pretrained_refuses_overrides_and_hub_options(tmp_path: Path) -> None:
    lorakit.LoraConfig(r=4).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedOptionError, match=r"set config.r on the returned config"):
        lorakit.LoraConfig.from_pretrained(tmp_path, r=8)
    with pytest.raises(UnsupportedOptionError, match=r"revision='v1'.*Hugging Face Hub"):
        lorakit.LoraConfig.from_pretrained(tmp_path, revision="v1")
    with pytest.raises(UnsupportedOptionError, match="unknown keyword colour"):
        lorakit.LoraConfig.from_pretrained(tmp_path, colour="red")
    with pytest.raises(UnsupportedOptionError, match="never uploads"):
        lorakit.LoraConfig(r=4).save_pretrained(tmp_path, push_to_hub=True)
    with pytest.raises(UnsupportedOptionError, match="encoding='utf-8'"):
        lorakit.LoraConfig.from_json_file(tmp_path / "adapter_config.json", encoding="utf-8")


def test_config_files_subfolder_and_bad_paths(tmp_path: Path) -> None:
    config = lorakit.LoraConfig(r=3, target_modules=["q_proj"], inference_mode=True)
    config.save_pretrained(tmp_path / "nested")
    assert lorakit.LoraConfig.from_pretrained(tmp_path, subfolder="nested") == config
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        config.save_pretrained(tmp_path / "file")
    with pytest.raises(AdapterNotFoundError, match=r"No adapter_config\.json"):
        lorakit.LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CorruptAdapterFileError, match="holds a JSON list"):
        lorakit.LoraConfig.from_json_file(tmp_path / "list.json")


def test_config_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lorakit.LoraConfig(r=4).save_pretrained(tmp_path)
    before = (tmp_path / "adapter_config.json").read_text()

    def fail(source: Path, target: Path) -> None:
        raise OSError("disk pulled out")

    monkeypatch.setattr(lorakit.io.atomic, "_put_in_place", fail)
    with pytest.raises(OSError, match="disk pulled out"):
        lorakit.LoraConfig(r=16).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").read_text() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter_config.json"]
    assert json.loads(before)["r"] == 4
