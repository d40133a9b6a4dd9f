"""Where adapters live (device, dtype) and loading with low_cpu_mem_usage (meta tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit import PeftModel
from lorakit.io.errors import AdapterMismatchError
from precision.precision_support import TARGETS, logits
from tiny_models import tiny_llama


def _config(**options: object) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **options)  # type: ignore[arg-type]


def _placements(model: nn.Module) -> list[tuple[str, torch.device, torch.dtype, torch.dtype]]:
    """(layer, adapter device, adapter dtype, base dtype) for every LoRA tensor."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, lorakit.layers.LoraLayer):
            base = module.base_layer.weight
            for tensor_name, tensor in module.named_parameters():
                if ".lora_" in f".{tensor_name}":
                    assert tensor.device == base.device, (name, tensor_name)
                    rows.append((name, tensor.device, tensor.dtype, base.dtype))
    assert rows
    return rows


def _saved_adapter(folder: Path, dtype: torch.dtype = torch.float32) -> PeftModel:
    """A trained-looking adapter (B drawn too) saved in `folder`."""
    torch.manual_seed(7)
    model = lorakit.get_peft_model(tiny_llama().to(dtype), _config(init_lora_weights=False))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adapters_sit_beside_their_base_after_get_peft_model_and_load(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    _saved_adapter(tmp_path)
    model = lorakit.get_peft_model(tiny_llama().to(dtype), _config())
    model.load_adapter(tmp_path, "loaded", torch_device="cpu")
    expected = torch.float32  # fp32 adapters on every floating base by default
    assert {row[2] for row in _placements(model)} == {expected}
    model.to(torch.bfloat16)  # .to() moves and casts everything, adapters included
    assert {(row[2], row[3]) for row in _placements(model)} == {(torch.bfloat16,) * 2}


def test_load_adapter_passes_torch_device_to_the_file_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _saved_adapter(tmp_path)
    import lorakit.persistence as persistence

    seen: list[object] = []
    reader = persistence.load_adapter_files

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("device"))
        return reader(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(persistence, "load_adapter_files", spy)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path, torch_device="cpu")
    model.load_adapter(tmp_path, "second", torch_device=torch.device("cpu"))
    model.load_adapter(tmp_path, "third")
    assert seen == ["cpu", torch.device("cpu"), "cpu"]
    assert {row[1] for row in _placements(model)} == {torch.device("cpu")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_cpu_mem_usage_loads_bit_identical_adapters(dtype: torch.dtype, tmp_path: Path) -> None:
    _saved_adapter(tmp_path)
    normal = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    fast = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path, low_cpu_mem_usage=True)
    fast.load_adapter(tmp_path, "second", low_cpu_mem_usage=True)
    normal.load_adapter(tmp_path, "second")
    assert not any(tensor.is_meta for tensor in fast.parameters())
    assert _placements(fast) == _placements(normal)
    for name in ("default", "second"):
        normal.set_adapter(name)
        fast.set_adapter(name)
        assert torch.equal(logits(fast), logits(normal))
    assert logits(fast).abs().max() > 0


def test_low_cpu_mem_usage_takes_the_files_tensors_without_a_copy(tmp_path: Path) -> None:
    _saved_adapter(tmp_path)
    files: dict[str, torch.Tensor] = {}
    import lorakit.persistence as persistence

    reader = persistence.load_adapter_files

    def keep(*args: object, **kwargs: object) -> object:
        tensors, config = reader(*args, **kwargs)  # type: ignore[arg-type]
        files.update(tensors)
        return tensors, config

    persistence.load_adapter_files = keep  # type: ignore[assignment]
    try:
        model = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    finally:
        persistence.load_adapter_files = reader  # type: ignore[assignment]
    file_pointers = {tensor.data_ptr() for tensor in files.values()}
    adapter_pointers = {
        tensor.data_ptr() for name, tensor in model.named_parameters() if ".lora_" in name
    }
    assert adapter_pointers and adapter_pointers <= file_pointers


def test_get_peft_model_with_low_cpu_mem_usage_allocates_nothing() -> None:
    model = lorakit.get_peft_model(tiny_llama(), _config(), low_cpu_mem_usage=True)
    adapters = [tensor for name, tensor in model.named_parameters() if ".lora_" in name]
    assert adapters and all(tensor.is_meta for tensor in adapters)
    assert all(
        not tensor.is_meta for name, tensor in model.named_parameters() if ".lora_" not in name
    )


def test_a_failed_low_cpu_mem_usage_load_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _saved_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    missing = sorted(key for key in tensors if "layers.1.mlp.down_proj.lora_B" in key)
    assert len(missing) == 1
    del tensors[missing[0]]
    save_file(tensors, path)
    model = lorakit.get_peft_model(tiny_llama(), _config())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="down_proj"):
        model.load_adapter(tmp_path, "incomplete", low_cpu_mem_usage=True)
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
