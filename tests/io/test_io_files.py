"""Saving and loading adapter folders: layout, round trips, peft interop, refusals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit.io import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterConfigError,
    AdapterNotFoundError,
    CorruptAdapterFileError,
    PickleAdapterRefusedError,
    adapter_state_dict,
    load_adapter_files,
    save_adapter_files,
    save_adapters_together,
)

CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": {"v_proj", "q_proj"}, "bias": "none"}


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 4, generator=generator)
    return {
        "base_model.model.a.lora_A.weight": torch.randn(4, 8, generator=generator),
        "base_model.model.a.lora_B.weight": torch.randn(8, 4, generator=generator).t(),
        "base_model.model.e.lora_embedding_A": torch.randn(4, 6, generator=generator).half(),
        "base_model.model.h.weight": torch.randn(3, 3, generator=generator).bfloat16(),
        "base_model.model.wte.weight": shared,  # tied pair: same storage
        "base_model.model.lm_head.weight": shared,
        "base_model.model.counts": torch.arange(5),
    }


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    tensors = _tensors()
    save_adapter_files(tmp_path, "default", tensors, CONFIG)
    loaded, config = load_adapter_files(tmp_path)
    assert sorted(loaded) == sorted(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor), key
    assert config == {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "peft_type": "LORA",
        "inference_mode": True,
    }


def test_saving_does_not_touch_the_callers_tensors_or_config(tmp_path: Path) -> None:
    tensors = _tensors()
    before = {key: tensor.clone() for key, tensor in tensors.items()}
    config = dict(CONFIG)
    save_adapter_files(tmp_path, "default", tensors, config)
    assert tensors["base_model.model.wte.weight"] is tensors["base_model.model.lm_head.weight"]
    assert all(torch.equal(tensors[key], before[key]) for key in tensors)
    assert config == CONFIG


def test_layout_default_on_top_others_in_subfolders(tmp_path: Path) -> None:
    first = {"base_model.model.a.lora_A.weight": torch.ones(2, 3)}
    second = {"base_model.model.a.lora_A.weight": torch.full((2, 3), 2.0)}
    assert save_adapter_files(tmp_path, "default", first, CONFIG) == tmp_path
    assert save_adapter_files(tmp_path, "second", second, CONFIG) == tmp_path / "second"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, "second"]
    )
    loaded, _ = load_adapter_files(tmp_path, subfolder="second")
    assert torch.equal(loaded["base_model.model.a.lora_A.weight"], torch.full((2, 3), 2.0))
    loaded, _ = load_adapter_files(tmp_path)
    assert torch.equal(loaded["base_model.model.a.lora_A.weight"], torch.ones(2, 3))


def test_several_adapters_are_saved_together_or_not_at_all(tmp_path: Path) -> None:
    first = {"base_model.model.a.lora_A.weight": torch.ones(2, 3)}
    second = {"base_model.model.a.lora_A.weight": torch.full((2, 3), 2.0)}
    saved = save_adapters_together(tmp_path, {"default": (first, CONFIG), "b": (second, CONFIG)})
    assert saved == {"default": tmp_path, "b": tmp_path / "b"}
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert len(before) == 4
    with pytest.raises(AdapterConfigError, match=r"\['device'\] cannot be written"):
        save_adapters_together(
            tmp_path, {"default": (second, CONFIG), "b": (first, {**CONFIG, "device": object()})}
        )  # the second adapter is refused: the first is not written either
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_pickle_weights_replace_safetensors_and_back(tmp_path: Path) -> None:
    tensors = _tensors()
    save_adapter_files(tmp_path, "default", tensors, CONFIG)
    save_adapter_files(tmp_path, "default", tensors, CONFIG, safe_serialization=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == [CONFIG_NAME, PICKLE_WEIGHTS_NAME]
    loaded, _ = load_adapter_files(tmp_path, allow_pickle=True)
    assert sorted(loaded) == sorted(tensors)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in tensors.items())
    save_adapter_files(tmp_path, "default", tensors, CONFIG)  # a stale .bin must not stay
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        CONFIG_NAME,
        SAFETENSORS_WEIGHTS_NAME,
    ]


def test_config_json_is_peft_style_and_peft_reads_it(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    config = {**CONFIG, "task_type": "CAUSAL_LM", "lorakit_only_field": [1, 2]}
    save_adapter_files(tmp_path, "default", {"x.lora_A.weight": torch.ones(1, 1)}, config)
    text = (tmp_path / CONFIG_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
    with pytest.warns(UserWarning, match="lorakit_only_field"):
        peft_config = peft.LoraConfig.from_pretrained(tmp_path)
    assert (peft_config.r, peft_config.lora_alpha) == (4, 8)
    assert peft_config.target_modules == {"q_proj", "v_proj"}
    assert peft_config.peft_type == "LORA"


def test_lorakit_files_load_in_peft(oracle: Any, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    options = {"task_type": "SEQ_CLS", "r": 4, "target_modules": ["query"], "bias": "lora_only"}
    model = oracle.model("bert", {"default": options, "other": {**options, "bias": "none"}})
    with torch.no_grad():  # move every tensor a file carries off its initial value
        for key, parameter in model.named_parameters():
            if "lora_" in key or "modules_to_save" in key or key.endswith("base_layer.bias"):
                parameter.add_(0.01 * torch.randn_like(parameter))
    state = model.state_dict()
    for name in ("default", "other"):
        config = model.peft_config[name]
        tensors = adapter_state_dict(state, name, bias=config.bias)
        save_adapter_files(tmp_path, name, tensors, config.to_dict())
    reference = peft.PeftModel.from_pretrained(oracle.factories["bert"](0), tmp_path)
    reference.load_adapter(tmp_path / "other", adapter_name="other")
    reference_state = reference.state_dict()
    assert sorted(reference_state) == sorted(state)
    for key, tensor in state.items():
        assert torch.equal(reference_state[key], tensor), key


def _write_pickle_adapter(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    torch.save(state, folder / PICKLE_WEIGHTS_NAME)


def test_pickle_is_refused_with_a_conversion_that_works(tmp_path: Path) -> None:
    tensors = {"base_model.model.a.lora_A.weight": torch.randn(4, 8)}
    _write_pickle_adapter(tmp_path, tensors)
    with pytest.raises(PickleAdapterRefusedError, match=r"allow_pickle=True") as error:
        load_adapter_files(tmp_path)
    command = next(line for line in str(error.value).splitlines() if "python -c" in line)
    subprocess.run(command.strip(), shell=True, check=True, timeout=120)
    loaded, _ = load_adapter_files(tmp_path)
    assert torch.equal(loaded["base_model.model.a.lora_A.weight"], tensors[next(iter(tensors))])


def test_pickle_opt_in_reads_tensors_only(tmp_path: Path) -> None:
    tensors = {"base_model.model.a.lora_A.weight": torch.randn(4, 8)}
    _write_pickle_adapter(tmp_path / "plain", tensors)
    loaded, _ = load_adapter_files(tmp_path / "plain", allow_pickle=True)
    assert torch.equal(loaded["base_model.model.a.lora_A.weight"], tensors[next(iter(tensors))])

    _write_pickle_adapter(tmp_path / "hostile", {"w": torch.ones(1), "x": _Payload()})
    with pytest.raises(CorruptAdapterFileError, match="objects other than tensors"):
        load_adapter_files(tmp_path / "hostile", allow_pickle=True)


class _Payload:
    """Stands for a pickle that runs code when loaded: weights_only must refuse it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "damage",
    [lambda data: data[: len(data) // 2], lambda data: b"not a safetensors file", lambda _: b""],
    ids=["truncated", "garbage", "empty"],
)
def test_corrupt_safetensors_gets_a_clear_error(tmp_path: Path, damage: Any) -> None:
    save_adapter_files(tmp_path, "default", _tensors(), CONFIG)
    weights = tmp_path / SAFETENSORS_WEIGHTS_NAME
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CorruptAdapterFileError, match=r"truncated or corrupt") as error:
        load_adapter_files(tmp_path)
    assert str(weights) in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_invalid_json_config_gets_a_clear_error(tmp_path: Path) -> None:
    save_adapter_files(tmp_path, "default", _tensors(), CONFIG)
    (tmp_path / CONFIG_NAME).write_text('{"r": 4,')
    with pytest.raises(CorruptAdapterFileError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter_files(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(CorruptAdapterFileError, match=r"holds a JSON list, expected an object"):
        load_adapter_files(tmp_path)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match=r"does not exist") as error:
        load_adapter_files(tmp_path / "nowhere")
    assert isinstance(error.value, FileNotFoundError)

    save_adapter_files(tmp_path, "mine", _tensors(), CONFIG)
    with pytest.raises(AdapterNotFoundError, match=r"subfolders: \['mine'\]; pass subfolder"):
        load_adapter_files(tmp_path)

    (tmp_path / "mine" / SAFETENSORS_WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterNotFoundError, match=r"No adapter_model\.safetensors in"):
        load_adapter_files(tmp_path, subfolder="mine")


def test_other_peft_methods_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterConfigError, match=r"peft_type='IA3'.*allowed: 'LORA'"):
        save_adapter_files(tmp_path, "default", _tensors(), {**CONFIG, "peft_type": "IA3"})
    save_adapter_files(tmp_path, "default", _tensors(), CONFIG)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterConfigError, match=r"describes a 'IA3' adapter"):
        load_adapter_files(tmp_path)


def test_unwritable_config_fails_before_any_file_is_written(tmp_path: Path) -> None:
    with pytest.raises(AdapterConfigError, match=r"\['device'\] cannot be written"):
        save_adapter_files(tmp_path, "default", _tensors(), {**CONFIG, "device": object()})
    assert list(tmp_path.iterdir()) == []
