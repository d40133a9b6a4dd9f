"""Adapters saved and loaded through PeftModel: round trips, both ways with peft, bad files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from lorakit.io import AdapterMismatchError, CorruptAdapterFileError, PickleAdapterRefusedError
from lorakit.layers import LoraLayer
from tiny_models import tiny_bert_classifier, tiny_llama, token_batch

PEFT_TOLERANCE = 1e-6  # same weights, same math; only summation order may differ


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(ids).logits
    return out


def _trained_llama(**options: object) -> PeftModel:
    torch.manual_seed(0)
    config = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False, **options}
    return get_peft_model(tiny_llama(), LoraConfig(**config))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"target_modules": ["embed_tokens", "q_proj"]},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {r"layers\.1\..*": 32}},
        {"bias": "lora_only"},
    ],
    ids=["all-linear", "embedding", "patterns", "bias"],
)
def test_round_trip_is_bit_identical(tmp_path: Path, options: dict[str, object]) -> None:
    model = _trained_llama(**options)
    ids = token_batch()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(_logits(loaded, ids), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_conv_and_modules_to_save_round_trip(tmp_path: Path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))

    torch.manual_seed(4)
    model = get_peft_model(
        build(), LoraConfig(target_modules=["0"], modules_to_save=["3"], init_lora_weights=False)
    )
    with torch.no_grad():
        model.base_model.model[3].modules_to_save["default"].weight.add_(1.0)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    assert torch.equal(loaded(x), expected)


def test_several_named_adapters_round_trip(tmp_path: Path) -> None:
    model = _trained_llama()
    torch.manual_seed(9)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids = token_batch()
    outputs = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        outputs[name] = _logits(model, ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    for name, expected in outputs.items():
        loaded.set_adapter(name)
        assert torch.equal(_logits(loaded, ids), expected)


def test_lorakit_files_load_in_peft_and_back(tmp_path: Path) -> None:
    model = _trained_llama(target_modules=["q_proj", "v_proj", "embed_tokens"])
    ids = token_batch()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert torch.allclose(_logits(theirs, ids), expected, atol=PEFT_TOLERANCE, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    assert torch.allclose(_logits(back, ids), expected, atol=PEFT_TOLERANCE, rtol=0)


def test_peft_seq_cls_adapter_loads(tmp_path: Path) -> None:
    torch.manual_seed(5)
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False
    )
    theirs = peft.get_peft_model(tiny_bert_classifier(), config)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.mul_(3)
    theirs.save_pretrained(tmp_path)
    ids = token_batch()
    ours = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    assert torch.allclose(_logits(ours, ids), _logits(theirs, ids), atol=PEFT_TOLERANCE, rtol=0)


def test_mismatched_adapter_leaves_model_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ).save_pretrained(tmp_path)
    # Same names, other shapes: a rank-8 adapter under the rank-4 config.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 48)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = _trained_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(k, type(m)) for k, m in model.named_modules()]
    with pytest.raises(
        AdapterMismatchError,
        match=r"layers.0.self_attn.q_proj.lora_A: adapter \[4, 48\] vs base expects \[4, 32\]",
    ):
        model.load_adapter(tmp_path, "broken")
    assert "broken" not in model.peft_config
    assert [(k, type(m)) for k, m in model.named_modules()] == structure
    after = model.state_dict()
    assert after.keys() == before.keys() and all(
        torch.equal(after[k], v) for k, v in before.items()
    )
    base = tiny_llama()
    base_structure = [(k, type(m)) for k, m in base.named_modules()]
    with pytest.raises(
        AdapterMismatchError,
        match=r"layers.0.self_attn.q_proj.lora_A: adapter \[4, 48\] vs base expects \[4, 32\]",
    ):
        PeftModel.from_pretrained(base, tmp_path)
    assert [(k, type(m)) for k, m in base.named_modules()] == base_structure


def test_corrupt_file_and_pickle_are_refused(tmp_path: Path) -> None:
    model = _trained_llama()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptAdapterFileError, match=r"adapter_model\.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    weights.unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(PickleAdapterRefusedError, match="allow_pickle=True"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_auto_class_loads_base_and_adapter(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tmp_path / "base")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = token_batch()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert any(isinstance(m, LoraLayer) for m in loaded.modules())


def test_resized_vocabulary_saves_embeddings_and_reloads(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    base.resize_token_embeddings(130)
    with torch.no_grad():  # the new token rows were trained, as after adding special tokens
        base.get_input_embeddings().weight[128:].normal_()
    torch.manual_seed(2)
    config = LoraConfig(
        target_modules=["q_proj"],
        init_lora_weights=False,
        base_model_name_or_path=str(tmp_path / "base"),
    )
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].shape == (130, 32)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    fresh.resize_token_embeddings(130)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    ids = torch.tensor([[1, 129, 128, 5]])
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_generate_passes_through_with_per_row_adapters() -> None:
    model = _trained_llama()
    prompt = token_batch(batch=2, length=4)
    options = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    adapted = model.generate(input_ids=prompt, **options)
    with model.disable_adapter():
        plain = model.generate(input_ids=prompt, **options)
    mixed = model.generate(input_ids=prompt, adapter_names=["default", "__base__"], **options)
    assert not torch.equal(adapted, plain)  # the adapter changes what is generated
    assert torch.equal(mixed[0], adapted[0]) and torch.equal(mixed[1], plain[1])
