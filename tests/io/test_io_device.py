"""The device argument of adapter loading: torch's spellings work, others get a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.io import (
    PICKLE_WEIGHTS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterDeviceError,
    CorruptAdapterFileError,
    load_adapter_files,
    reader_device,
    save_adapter_files,
)
from tiny_models import tiny_llama

CONFIG = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
HAS_ACCELERATOR = torch.accelerator.is_available()


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "base_model.model.a.lora_A.weight": torch.randn(2, 5, generator=generator),
        "base_model.model.a.lora_B.weight": torch.randn(5, 2, generator=generator),
    }
    save_adapter_files(folder, "default", tensors, CONFIG)
    return tensors


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0), torch.device("cpu")])
def test_torch_spellings_of_cpu_load_the_file(tmp_path: Path, device: str | torch.device) -> None:
    tensors = _saved(tmp_path)
    loaded, _ = load_adapter_files(tmp_path, device=device)
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].device == torch.device("cpu")
        assert torch.equal(loaded[key], tensor)


def test_cpu_0_reads_pickle_files_too(tmp_path: Path) -> None:
    tensors = _saved(tmp_path)
    (tmp_path / SAFETENSORS_WEIGHTS_NAME).unlink()
    torch.save(tensors, tmp_path / PICKLE_WEIGHTS_NAME)
    loaded, _ = load_adapter_files(tmp_path, allow_pickle=True, device="cpu:0")
    assert all(torch.equal(loaded[key], tensor) for key, tensor in tensors.items())


def test_meta_is_refused_with_the_accepted_devices_not_as_a_corrupt_file(tmp_path: Path) -> None:
    _saved(tmp_path)
    with pytest.raises(AdapterDeviceError) as caught:
        load_adapter_files(tmp_path, device="meta")
    message = str(caught.value)
    assert "device='meta': the meta device holds no data" in message
    assert "low_cpu_mem_usage=True" in message
    assert "Accepted devices here: ['cpu'" in message
    assert not isinstance(caught.value, CorruptAdapterFileError)


def test_unknown_device_names_the_accepted_ones(tmp_path: Path) -> None:
    _saved(tmp_path)
    with pytest.raises(AdapterDeviceError, match=r"device='gpu0' is not a torch device.*'cpu'"):
        load_adapter_files(tmp_path, device="gpu0")


@pytest.mark.skipif(HAS_ACCELERATOR, reason="checks the error on a machine without one")
def test_missing_accelerator_is_named(tmp_path: Path) -> None:
    _saved(tmp_path)
    with pytest.raises(AdapterDeviceError, match=r"device='cuda:0': this machine has no cuda\."):
        load_adapter_files(tmp_path, device="cuda:0")


@pytest.mark.skipif(not HAS_ACCELERATOR, reason="needs an accelerator")
def test_accelerator_spellings_resolve_to_an_index(tmp_path: Path) -> None:
    accelerator = torch.accelerator.current_accelerator()
    assert accelerator is not None
    tensors = _saved(tmp_path)
    current = torch.accelerator.current_device_index()
    assert reader_device(accelerator.type) == f"{accelerator.type}:{current}"
    loaded, _ = load_adapter_files(tmp_path, device=accelerator.type)
    assert all(torch.equal(loaded[key].cpu(), tensor) for key, tensor in tensors.items())
    missing = f"{accelerator.type}:{torch.accelerator.device_count()}"
    with pytest.raises(AdapterDeviceError, match=rf"this machine has no {missing}\."):
        reader_device(missing)


def test_load_adapter_with_a_bad_device_leaves_the_model_unchanged(tmp_path: Path) -> None:
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    lorakit.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    model = lorakit.get_peft_model(tiny_llama(), config)
    keys = set(model.state_dict())
    with pytest.raises(AdapterDeviceError, match=r"meta device holds no data"):
        model.load_adapter(tmp_path, "second", torch_device="meta")
    assert set(model.state_dict()) == keys and list(model.peft_config) == ["default"]
    model.load_adapter(tmp_path, "second", torch_device="cpu:0")
    assert list(model.peft_config) == ["default", "second"]
