"""`load_checkpoint_adapters`: a checkpoint's adapters go back in place, all checked first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from lorakit.errors import AdapterStateError
from lorakit.integrations.checkpoints import load_checkpoint_adapters, saved_adapter_folders
from tiny_models import tiny_llama

WEIGHTS = "adapter_model.safetensors"


def _model(seed: int) -> PeftModel:
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    torch.manual_seed(seed + 100)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    return model


def _tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    return {
        f"{name}/{key}": value.detach().clone()
        for name in model.peft_config
        for key, value in get_peft_model_state_dict(model, adapter_name=name).items()
    }


def test_every_adapter_is_loaded_in_place(tmp_path: Path) -> None:
    trained, fresh = _model(seed=0), _model(seed=1)
    trained.save_pretrained(tmp_path)
    parameters = {name: p for name, p in fresh.named_parameters() if "lora_" in name}
    assert saved_adapter_folders(tmp_path) == {"default": tmp_path, "other": tmp_path / "other"}
    assert load_checkpoint_adapters(fresh, tmp_path) == ["default", "other"]
    expected = _tensors(trained)
    assert set(_tensors(fresh)) == set(expected)
    for key, value in _tensors(fresh).items():
        assert torch.equal(value, expected[key]), key
    for name, parameter in fresh.named_parameters():  # the very tensors an optimizer holds
        if "lora_" in name:
            assert parameter is parameters[name]


def test_a_checkpoint_of_other_adapters_is_refused(tmp_path: Path) -> None:
    saved = _model(seed=0)
    saved.delete_adapter("other")
    saved.save_pretrained(tmp_path)
    model = _model(seed=1)
    with pytest.raises(AdapterStateError, match=r"holds adapters \['default'\], the model "):
        load_checkpoint_adapters(model, tmp_path)


def test_a_broken_second_adapter_leaves_the_first_unloaded(tmp_path: Path) -> None:
    _model(seed=0).save_pretrained(tmp_path)
    other = load_file(tmp_path / "other" / WEIGHTS)
    first = sorted(other)[0]
    other[first] = torch.zeros(3, 3)
    dropped = sorted(other)[-1]
    del other[dropped]
    save_file(other, tmp_path / "other" / WEIGHTS, metadata={"format": "pt"})
    model = _model(seed=1)
    before = _tensors(model)
    with pytest.raises(
        AdapterStateError,
        match=rf"'other'.*1 tensors missing from the checkpoint \(e\.g\. {re.escape(dropped)}\); "
        rf"{re.escape(first)} has shape \(3, 3\)",
    ):
        load_checkpoint_adapters(model, tmp_path)
    for key, value in _tensors(model).items():
        assert torch.equal(value, before[key]), key
