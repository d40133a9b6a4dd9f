"""`layer_replication` against peft 0.21.2 on the tiny Llama: a deeper model whose repeated
layers share the base weights, each layer with its own adapters."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, MergeError, TargetModuleError
from lorakit.functional import inject_adapter_in_model
from lorakit.layers import LoraLayer
from parity.parity_support import tiny_llama, token_batch, trainable_names

# Same fp32 sums in the same order in both libraries: agreement to a few ulps.
TOL = 1e-6
LAYER_MAP = [[0, 2], [1, 2]]  # layers 0, 1, 1: three layers from the base's two
OPTIONS: dict[str, Any] = {
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "layer_replication": LAYER_MAP,
    "init_lora_weights": False,  # random A and B: every adapter moves the output
}


def _pair() -> tuple[nn.Module, PeftModel]:
    base = tiny_llama()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**OPTIONS))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**OPTIONS))
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys, peft's random factors
    return theirs, ours


def _layers(model: nn.Module) -> nn.ModuleList:
    layers: nn.ModuleList = model.get_base_model().model.layers  # type: ignore[operator]
    return layers


def test_replicated_layers_share_the_base_weights_and_have_their_own_adapters() -> None:
    base = tiny_llama()
    original = {name: parameter.data_ptr() for name, parameter in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(**OPTIONS))
    layers = _layers(model)
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    first, copy_ = layers[1], layers[2]  # both repeat base layer 1
    assert first is not copy_
    for (name, mine), (_, other) in zip(
        first.named_parameters(), copy_.named_parameters(), strict=True
    ):
        if "lora_" in name:
            assert mine is not other  # each layer trains its own factors
        else:
            key = f"model.layers.1.{name.replace('.base_layer', '')}"
            assert mine.data_ptr() == other.data_ptr() == original[key]
    base_pointers = {p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    assert base_pointers == set(original.values())  # not one base tensor copied
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]


def test_outputs_gradients_keys_and_counts_equal_peft() -> None:
    theirs, ours = _pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable_names(ours) == trainable_names(theirs)
    ids = token_batch()
    for model in (theirs, ours):
        model.train()
        model(ids, labels=ids).loss.backward()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=TOL, rtol=0)
    gradients = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None
            assert torch.allclose(parameter.grad, gradients[name], atol=TOL, rtol=0), name
    unreplicated = tiny_llama()
    assert not torch.allclose(unreplicated(ids).logits, ours(ids).logits, atol=1e-3)


def test_generate_with_a_cache_equals_peft() -> None:
    theirs, ours = _pair()
    ids = token_batch(batch=1, length=5)
    options = {"max_new_tokens": 4, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    assert torch.equal(ours.generate(ids, **options), theirs.generate(ids, **options))


def test_files_load_both_ways(tmp_path: Path) -> None:
    theirs, ours = _pair()
    ours.save_pretrained(tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    for folder in ("lorakit", "peft"):
        saved = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert saved["layer_replication"] == LAYER_MAP
    ids = token_batch()
    expected = ours(ids).logits
    loaded_ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    loaded_theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lorakit")
    assert len(_layers(loaded_ours)) == 3
    assert loaded_ours.peft_config["default"].layer_replication == LAYER_MAP
    for model in (loaded_ours, loaded_theirs):
        assert torch.allclose(model(ids).logits, expected, atol=TOL, rtol=0)


def test_merging_is_refused_and_leaves_the_weights() -> None:
    _, ours = _pair()
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    with pytest.raises(MergeError, match=r"layer_replication=\[\[0, 2\], \[1, 2\]\]"):
        ours.merge_adapter()
    with pytest.raises(MergeError, match=r"replicated"):
        ours.merge_and_unload()
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    assert any(isinstance(module, LoraLayer) for module in ours.modules())


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"layer_replication": [[0, 3]]}, ConfigError, r"range \[0, 3\] is not \[start, end\)"),
        ({"target_modules": ["no_such"]}, TargetModuleError, r"'no_such'"),
    ],
    ids=["range-past-the-layers", "planning-fails"],
)
def test_a_failed_replication_leaves_the_base_as_it_was(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    base = tiny_llama()
    layers = base.model.layers
    with pytest.raises(error, match=message):
        get_peft_model(base, LoraConfig(**{**OPTIONS, **options}))
    assert base.model.layers is layers and base.config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "value",
    [[[1, 1]], [(0, 1, 2)], [[-1, 1]], "0-2", []],
    ids=["empty", "triple", "neg", "str", "none"],
)
def test_bad_values_raise_naming_the_field(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"layer_replication="):
        LoraConfig(target_modules=["q_proj"], layer_replication=value)


def test_further_adapters_reuse_the_replicated_layers() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(**OPTIONS))
    model.add_adapter("same", LoraConfig(**OPTIONS))
    model.add_adapter("plain", LoraConfig(target_modules=["q_proj"]))
    assert len(_layers(model)) == 3
    assert set(_layers(model)[2].self_attn.q_proj.lora_A) == {"default", "same", "plain"}
    with pytest.raises(ConfigError, match=r"already replicated with \[\[0, 2\], \[1, 2\]\]"):
        model.add_adapter("other", LoraConfig(**{**OPTIONS, "layer_replication": [[0, 2]]}))
    plain = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"already holds adapters"):
        plain.add_adapter("deeper", LoraConfig(**OPTIONS))
    assert len(_layers(plain)) == 2


def test_inject_adapter_in_model_replicates_as_peft() -> None:
    base = tiny_llama()
    torch.manual_seed(0)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**OPTIONS), copy.deepcopy(base))
    ours = inject_adapter_in_model(LoraConfig(**OPTIONS), copy.deepcopy(base))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ids = token_batch()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=TOL, rtol=0)
