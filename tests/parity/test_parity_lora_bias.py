"""`lora_bias=True` (a trained bias on lora_B, scaled by s) against peft on the same weights.

peft is the oracle for outputs, gradients, trainable counts, merged weights and files (both
ways); the float64 hand computation of the branch with its bias is in tests/ops.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError, MergeError
from lorakit.quant import QuantConfig, QuantLinear
from parity.parity_support import (
    MERGE_TOL,
    build_pair,
    image_batch,
    max_abs_diff,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)
from tiny_models import tiny_bert_classifier

# fp32 outputs of the same tiny networks summed in another order: the bound.
PARITY_TOL = 1e-6
# Gradients reach ~6 here and pass back through the whole network, so fp32 rounding alone
# moves them by more than 1e-6 (GPT-2's lora_A gradients: 2e-6 between peft and lorakit).
# As in parity_support.assert_forward_matches_peft, peft run in float64 gives the exact
# gradients and peft's own fp32 error sets the limit: lorakit may be this many times as far.
FP32_ERROR_FACTOR = 4.0
FP32_ERROR_FLOOR_ULPS = 4.0


def _within_peft_error(got: torch.Tensor, peft_fp32: torch.Tensor, exact: torch.Tensor) -> bool:
    floor = FP32_ERROR_FLOOR_ULPS * torch.finfo(torch.float32).eps * float(exact.abs().max())
    limit = FP32_ERROR_FACTOR * max(max_abs_diff(peft_fp32, exact), floor)
    return max_abs_diff(got, exact) <= limit


def _randomise_biases(model: nn.Module) -> None:
    """Give every lora_B bias (and B) non-zero values, so that a dropped or unscaled bias shows."""
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], Callable[[], Any]]] = {
    # nn.Linear with biases (BERT), transformers' Conv1D (GPT-2), nn.Conv2d and nn.Linear.
    "bert-linear": (
        tiny_bert_classifier,
        {"target_modules": ["query", "value", "dense"]},
        lambda: {"input_ids": token_batch()},
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        {"target_modules": ["c_attn", "c_fc"]},
        lambda: {"input_ids": token_batch()},
    ),
    "cnn-conv2d": (tiny_cnn, {"target_modules": ["0", "2", "4"]}, lambda: {"x": image_batch()}),
}


def _output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(inputs["x"]) if "x" in inputs else model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits


def _pair(case: str) -> tuple[Any, Any, Any]:
    make_base, options, make_inputs = CASES[case]
    pair = build_pair(
        make_base, r=4, lora_alpha=6, lora_bias=True, init_lora_weights=False, **options
    )
    _randomise_biases(pair.peft_model)
    pair.copy_peft_weights()
    return pair.peft_model, pair.lorakit_model, make_inputs()


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_gradients_and_counts_equal_peft(case: str) -> None:
    peft_model, lorakit_model, inputs = _pair(case)
    assert lorakit_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    keys = [k for k in lorakit_model.state_dict() if k.endswith("lora_B.default.bias")]
    assert keys and keys == [
        k for k in peft_model.state_dict() if k.endswith("lora_B.default.bias")
    ]
    exact_model = copy.deepcopy(peft_model).double()
    exact_inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    runs = []
    for model, model_inputs in (
        (peft_model, inputs),
        (lorakit_model, inputs),
        (exact_model, exact_inputs),
    ):
        model.train()
        torch.manual_seed(4)  # the base's own dropout draws the same masks in every run
        out = _output(model, model_inputs)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        named = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        runs.append((out.detach(), named))
    (peft_out, peft_grads), (ours, our_grads), (_, exact_grads) = runs
    assert max_abs_diff(ours, peft_out) <= PARITY_TOL
    assert peft_grads.keys() == our_grads.keys() == exact_grads.keys()
    for key, grad in peft_grads.items():
        assert grad is not None and our_grads[key] is not None, key
        assert _within_peft_error(our_grads[key], grad, exact_grads[key]), key
    assert any(k.endswith("lora_B.default.bias") for k in our_grads)


def _all_outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return _output(model, inputs)


def test_files_load_both_ways(tmp_path: Path) -> None:
    """lorakit writes peft's keys (`lora_B.bias`) and config; each library reads the other's."""
    peft_model, lorakit_model, inputs = _pair("gpt2-conv1d")
    expected = _all_outputs(peft_model, inputs)
    lorakit_model.save_pretrained(tmp_path / "lorakit")
    peft_model.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and any(k.endswith("lora_B.bias") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "lorakit")
    assert in_peft.peft_config["default"].lora_bias is True
    in_lorakit = lorakit.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft")
    assert in_lorakit.peft_config["default"].lora_bias is True
    for model in (in_peft, in_lorakit):
        assert max_abs_diff(_all_outputs(model, inputs), expected) <= PARITY_TOL


@pytest.mark.parametrize("case", ["bert-linear", "cnn-conv2d"])
def test_merge_unmerge_exact_and_merge_and_unload_equals_peft(case: str) -> None:
    """Merging adds s·b to the base bias (as peft); unmerging restores weights and biases bit
    for bit; merge_and_unload gives peft's merged model."""
    peft_model, lorakit_model, inputs = _pair(case)
    unmerged = _all_outputs(lorakit_model, inputs)
    before = {k: v.clone() for k, v in lorakit_model.state_dict().items()}
    layers = [m for m in lorakit_model.modules() if isinstance(m, lorakit.layers.LoraLayer)]
    biases = [layer.base_layer.bias.detach().clone() for layer in layers]
    lorakit_model.merge_adapter()
    assert max_abs_diff(_all_outputs(lorakit_model, inputs), unmerged) <= MERGE_TOL
    for layer, bias in zip(layers, biases, strict=True):
        expected_bias = bias + layer.scaling["default"] * layer.lora_B["default"].bias.detach()
        assert max_abs_diff(layer.base_layer.bias, expected_bias) <= 1e-6  # one fp32 rounding
    lorakit_model.unmerge_adapter()
    after = lorakit_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = peft_model.merge_and_unload()
    merged = lorakit_model.merge_and_unload()
    assert max_abs_diff(_all_outputs(merged, inputs), _all_outputs(peft_merged, inputs)) <= (
        MERGE_TOL
    )


def test_a_base_without_bias_runs_but_refuses_to_merge() -> None:
    """Llama's projections have no bias: the adapter computes as peft's, and merging raises
    before any layer changes (peft raises too)."""
    pair = build_pair(
        tiny_llama, r=4, lora_bias=True, init_lora_weights=False, target_modules=["q_proj"]
    )
    _randomise_biases(pair.peft_model)
    pair.copy_peft_weights()
    inputs = {"input_ids": token_batch()}
    expected = _all_outputs(pair.peft_model, inputs)
    assert max_abs_diff(_all_outputs(pair.lorakit_model, inputs), expected) <= PARITY_TOL
    before = {k: v.clone() for k, v in pair.lorakit_model.state_dict().items()}
    for merge in (pair.lorakit_model.merge_adapter, pair.lorakit_model.merge_and_unload):
        with pytest.raises(MergeError, match=r"lora_bias=True.*has no bias"):
            merge()
        state = pair.lorakit_model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        pair.peft_model.merge_adapter()


def test_a_4bit_base_takes_lora_bias_in_the_node_and_merges_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    model[0] = QuantLinear.from_linear(model[0], QuantConfig())
    config = lorakit.LoraConfig(
        r=4, target_modules=["0"], lora_bias=True, init_lora_weights=False, lora_dropout=0.1
    )
    peft_model = lorakit.get_peft_model(model, config).train()
    layer = peft_model.base_model.model[0]
    x = torch.randn(5, 64, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_LoraNodeBackward"
    grads = torch.autograd.grad(out.pow(2).sum(), [x, layer.lora_B["default"].bias])
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: None)
    torch.manual_seed(3)
    reference = layer(x)  # the plain-autograd path, same mask
    handle.remove()
    ref_grads = torch.autograd.grad(reference.pow(2).sum(), [x, layer.lora_B["default"].bias])
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    s, b = layer.scaling["default"], layer.lora_B["default"].bias.detach()
    base_bias = layer.base_layer.bias.detach().clone()
    requantized = copy.deepcopy(peft_model).merge_and_unload(requantize=True)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged[0], nn.Linear) and isinstance(requantized[0], QuantLinear)
    for module in (merged[0], requantized[0]):
        assert torch.allclose(module.bias, base_bias + s * b, atol=1e-6, rtol=0)


def test_init_true_starts_at_zero_and_false_as_nn_linear() -> None:
    for init, check in ((True, lambda b: not b.any()), (False, lambda b: 0 < b.abs().max() <= 0.5)):
        config = lorakit.LoraConfig(
            r=4, target_modules=["c_attn"], lora_bias=True, init_lora_weights=init
        )
        model = lorakit.get_peft_model(tiny_gpt2(), config)
        biases = [p for k, p in model.named_parameters() if k.endswith("lora_B.default.bias")]
        assert biases and all(b.requires_grad and check(b) for b in biases), init


def test_refusals_name_lora_bias() -> None:
    with pytest.raises(ConfigError, match=r"lora_bias=True with init_lora_weights='gaussian'"):
        lorakit.LoraConfig(target_modules=["q_proj"], lora_bias=True, init_lora_weights="gaussian")
    with pytest.raises(ConfigError, match=r"lora_bias=True with .*use_dora=True"):
        lorakit.LoraConfig(target_modules=["q_proj"], lora_bias=True, use_dora=True)
    base = tiny_llama()
    config = lorakit.LoraConfig(target_modules=["q_proj", "embed_tokens"], lora_bias=True)
    with pytest.raises(ConfigError, match=r"lora_bias=True targets 'model.embed_tokens'"):
        lorakit.get_peft_model(base, config)
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in base.modules())
    model = lorakit.get_peft_model(
        tiny_gpt2(), lorakit.LoraConfig(target_modules=["c_attn"], lora_bias=True)
    )
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=r"cannot combine adapters \['default'\].*lora_bias"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "blend", "linear")
    assert "blend" not in model.peft_config
