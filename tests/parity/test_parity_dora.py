"""DoRA (use_dora=True) against peft 0.21.2 on the same weights, for every layer type."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.errors import ConfigError, MergeError
from parity.parity_support import (
    MERGE_TOL,
    Pair,
    build_pair,
    image_batch,
    max_abs_diff,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)

# Gradients: the same fp32 products summed in another order (the norm is computed without the
# dense update, so g = m / n differs by ulps), relative to the largest entry of each gradient;
# the sparse rows of an embedding's A gradient came to 1.5e-6 of its largest entry.
GRAD_RTOL = 1e-5
# ... and absolutely, the figure.
GRAD_ATOL = 1e-6
# Outputs: the same, relative to the largest output.
OUTPUT_RTOL = 1e-6


def _conv1d_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv1d(5, 4, 3)).eval()


def _conv3d_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1)).eval()


def _inputs(name: str) -> dict[str, Any] | torch.Tensor:
    if name == "cnn":
        return image_batch()
    generator = torch.Generator().manual_seed(5)
    if name == "conv1d":
        return torch.randn(2, 3, 10, generator=generator)
    if name == "conv3d":
        return torch.randn(2, 2, 5, 5, 5, generator=generator)
    return {"input_ids": token_batch()}


# name -> (base factory, target_modules): Linear, Embedding, transformers' Conv1D, Conv1d/2d/3d
CASES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "cnn": (tiny_cnn, ["0", "2"]),
    "conv1d": (_conv1d_net, ["0", "2"]),
    "conv3d": (_conv3d_net, ["0", "2"]),
}


def _pair(name: str, **options: Any) -> Pair:
    make_base, targets = CASES[name]
    config = {"r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": True}
    config.update({"init_lora_weights": False, **options})
    pair = build_pair(make_base, **config)
    pair.copy_peft_weights()  # strict: every key (lora_magnitude_vector too) must match
    return pair


def _output(model: nn.Module, inputs: dict[str, Any] | torch.Tensor) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        result: torch.Tensor = model(inputs)
        return result
    output: torch.Tensor = model(**inputs).logits
    return output


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> bool:
    return max_abs_diff(got, expected) <= rtol * max(float(expected.abs().max()), 1e-30)


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_gradients_and_trainable_counts_equal_peft(name: str) -> None:
    _check_outputs_gradients_and_counts(name)


@pytest.mark.usefixtures("onednn_everywhere")
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_with_every_base_product_on_onednn_outputs_and_gradients_equal_peft(name: str) -> None:
    _check_outputs_gradients_and_counts(name)


def _check_outputs_gradients_and_counts(name: str) -> None:
    pair = _pair(name)
    inputs = _inputs(name)
    results = []
    for model in (pair.peft_model, pair.lorakit_model):
        model.train()  # dropout 0: the DoRA forward of training, with its gradients
        torch.manual_seed(0)  # the same masks in the base model's own dropout (GPT-2)
        output = _output(model, inputs)
        output.square().mean().backward()
        grads = {key: p.grad for key, p in model.named_parameters() if p.requires_grad}
        results.append((output.detach(), grads))
    (peft_out, peft_grads), (out, grads) = results
    with torch.no_grad():
        base_out = _output(pair.base, inputs)
    assert max_abs_diff(peft_out, base_out) > 100 * OUTPUT_RTOL  # the adapters matter here
    assert _close(out, peft_out, OUTPUT_RTOL), max_abs_diff(out, peft_out)
    assert sorted(grads) == sorted(peft_grads)
    assert any("lora_magnitude_vector" in key for key in grads)
    for key, grad in peft_grads.items():
        assert _close(grads[key], grad, GRAD_RTOL), (key, max_abs_diff(grads[key], grad))
        assert max_abs_diff(grads[key], grad) <= GRAD_ATOL, key
    counts = pair.lorakit_model.get_nb_trainable_parameters()
    assert counts == pair.peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", ["llama", "gpt2", "cnn"])
def test_initial_magnitudes_are_peft_row_norms_and_the_model_starts_unchanged(name: str) -> None:
    make_base, targets = CASES[name]
    pair = build_pair(make_base, r=4, target_modules=targets, use_dora=True)
    lorakit_state = pair.lorakit_model.state_dict()
    magnitudes = {k: v for k, v in pair.peft_model.state_dict().items() if "magnitude" in k}
    assert magnitudes and set(magnitudes) <= set(lorakit_state)
    for key, value in magnitudes.items():
        assert lorakit_state[key].shape == value.shape
        assert _close(lorakit_state[key], value, OUTPUT_RTOL), key
    inputs = _inputs(name)
    with torch.no_grad():  # B = 0, so m = n and g = 1 exactly: the base's own output
        assert torch.equal(_output(pair.lorakit_model, inputs), _output(pair.base, inputs))


def test_files_load_both_ways_with_peft_keys(tmp_path: Path) -> None:
    pair = _pair("llama")
    inputs = _inputs("llama")
    pair.lorakit_model.save_pretrained(tmp_path / "lorakit")
    pair.peft_model.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert any(key.endswith("q_proj.lora_magnitude_vector") for key in ours)
    expected = _output(pair.peft_model.eval(), inputs).detach()
    peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pair.base), tmp_path / "lorakit")
    lorakit_loaded = lorakit.PeftModel.from_pretrained(copy.deepcopy(pair.base), tmp_path / "peft")
    for model in (peft_loaded, lorakit_loaded):
        assert _close(_output(model.eval(), inputs).detach(), expected, OUTPUT_RTOL)


@pytest.mark.parametrize("name", ["llama", "gpt2", "cnn"])
def test_merge_unmerge_and_merge_and_unload_equal_peft(name: str) -> None:
    pair = _pair(name)
    inputs = _inputs(name)
    model = pair.lorakit_model.eval()
    original = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with torch.no_grad():
        unmerged = _output(model, inputs)
        model.merge_adapter()
        merged = _output(model, inputs)
        pair.peft_model.merge_adapter()
    assert _close(merged, unmerged, MERGE_TOL)
    peft_state = pair.peft_model.get_base_model().state_dict()
    for key, value in model.get_base_model().state_dict().items():
        if "base_layer.weight" in key:
            assert _close(value, peft_state[key], OUTPUT_RTOL), key
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, original[key]), key  # bit for bit (the merge's record)
    unloaded = model.merge_and_unload()
    peft_unloaded = pair.peft_model.merge_and_unload()
    with torch.no_grad():
        assert _close(_output(unloaded, inputs), _output(peft_unloaded, inputs), MERGE_TOL)


def test_bf16_base_matches_peft_to_bf16_rounding() -> None:
    def bf16_llama() -> nn.Module:
        return tiny_llama().to(torch.bfloat16)

    pair = build_pair(bf16_llama, r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    pair.copy_peft_weights()
    inputs = _inputs("llama")
    exact_model = copy.deepcopy(pair.peft_model).double()
    with torch.no_grad():
        exact = _output(exact_model, inputs)
        peft_error = max_abs_diff(_output(pair.peft_model, inputs), exact)
        error = max_abs_diff(_output(pair.lorakit_model, inputs), exact)
    assert {p.dtype for n, p in pair.lorakit_model.named_parameters() if "lora_" in n} == {
        torch.float32
    }
    assert error <= 2 * peft_error, (error, peft_error)


def test_add_weighted_adapter_and_mixed_batches_refuse_dora() -> None:
    model = _pair("llama").lorakit_model
    with pytest.raises(ConfigError, match=r"DoRA"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")
    with pytest.raises(MergeError, match=r"DoRA adapters \['default'\]"):
        model(input_ids=token_batch(), adapter_names=["default", "__base__"])


def test_dora_with_an_init_that_changes_a_and_b_afterwards_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"use_dora=True with init_lora_weights='pissa'"):
        lorakit.LoraConfig(use_dora=True, init_lora_weights="pissa")


def test_unmerging_out_of_order_past_a_dora_merge_is_refused() -> None:
    model = _pair("cnn").lorakit_model
    model.add_adapter("second", lorakit.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    model.merge_adapter(["default"])
    model.merge_adapter(["second"])
    layer = model.get_base_model()[0]
    weight = layer.base_layer.weight.clone()
    with pytest.raises(MergeError, match=r"DoRA adapters \['default', 'second'\]"):
        layer.unmerge(["default"])
    assert torch.equal(layer.base_layer.weight, weight)
