"""merge_and_unload on 4-bit QuantLinear bases: dense layers by default, 4-bit with requantize."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import MergeError
from lorakit.layers.base import LoraLayer
from lorakit.ops import nf4
from lorakit.quant import LoraQuantLinear, QuantConfig, QuantLinear, quantize_model_linears

# fp32: the merged layer sums x·(W + sBA)ᵀ where the unmerged one sums x·Wᵀ + s(xAᵀ)Bᵀ; the
# orders differ, so logits of order 1 differ by a few fp32 ulps per layer (measured 4e-7).
FP32_MODEL_TOLERANCE = 1e-5
# One fp32 sum W + sBA of entries of order 0.1 against the float64 hand computation.
FP32_WEIGHT_TOLERANCE = 1e-7
# bf16 compute: the unmerged model rounds each linear's input, its dequantized weight and its
# output to 8 significant bits (2^-9 relative each) in 14 layers; the merged one (fp32 or bf16
# weights) rounds differently. Measured 0.8% of max|logit|; allowed 2^-5 (3.1%).
BF16_MODEL_RELATIVE = 2.0**-5
# fp32 rounding of w / absmax and of code · absmax: a few ulps of the block's absmax.
ROUNDING_SLACK = 1e-6
LORA_B_STD = 0.02  # a trained adapter's size: deltas a fraction of the weights
QUANTIZED_LAYERS = 14  # 7 linear layers in each of 2 blocks


def _qlora(
    model: nn.Module,
    config: QuantConfig,
    skip_modules: tuple[str, ...] = ("lm_head",),
    adapter_names: tuple[str, ...] = ("default",),
) -> PeftModel:
    """The model quantized, with seeded adapters whose B is non-zero."""
    quantized = quantize_model_linears(model, config, skip_modules)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    peft_model = get_peft_model(quantized, lora_config, adapter_names[0])
    for name in adapter_names[1:]:
        peft_model.add_adapter(name, lora_config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, parameter in peft_model.named_parameters(remove_duplicate=False):
            if "lora_B" in key:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * LORA_B_STD)
        for layer in peft_model.modules():  # A of the other adapters is random too
            if isinstance(layer, LoraLayer):
                for name in adapter_names:
                    layer.lora_A[name].weight.normal_(0, 0.1, generator=generator)
    return peft_model


def _hand_merged(layer: LoraQuantLinear, adapter_names: list[str]) -> torch.Tensor:
    """dequant(Q) + Σ s·BA in float64."""
    base = layer.base_layer
    assert isinstance(base, QuantLinear)
    weight = base.dequantize_weight(torch.float32).double()
    for name in adapter_names:
        A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        weight += layer.scaling[name] * B @ A
    return weight


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def test_merge_and_unload_returns_dense_linears_with_the_unmerged_outputs(
    quant_llama: nn.Module, llama_tokens: torch.Tensor
) -> None:
    # layer 0 stays dense (merged in place), layer 1 is 4-bit (replaced)
    model = _qlora(quant_llama, QuantConfig(), skip_modules=("lm_head", "layers.0"))
    layers = {k: m for k, m in model.named_modules() if isinstance(m, LoraQuantLinear)}
    assert len(layers) == QUANTIZED_LAYERS // 2
    expected_weights = {k: _hand_merged(layer, ["default"]) for k, layer in layers.items()}
    with torch.no_grad():
        expected = model(llama_tokens).logits
    merged = model.merge_and_unload()
    assert merged is model.get_base_model()
    assert not any(isinstance(m, (LoraLayer, QuantLinear)) for m in merged.modules())
    linears = _linears(merged)
    assert len(linears) == QUANTIZED_LAYERS + 1 and all(
        type(m) is nn.Linear for m in linears.values()
    )
    for key, weight in expected_weights.items():
        linear = merged.get_submodule(key.removeprefix("base_model.model."))
        assert isinstance(linear, nn.Linear) and linear.weight.dtype == torch.float32
        assert not linear.weight.requires_grad
        torch.testing.assert_close(
            linear.weight.double(), weight, rtol=0, atol=FP32_WEIGHT_TOLERANCE
        )
    with torch.no_grad():
        result = merged(llama_tokens).logits
    torch.testing.assert_close(result, expected, rtol=0, atol=FP32_MODEL_TOLERANCE)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_bf16_compute_merges_into_the_model_dtype(
    quant_llama: nn.Module, llama_tokens: torch.Tensor, model_dtype: torch.dtype
) -> None:
    model = _qlora(quant_llama.to(model_dtype), QuantConfig(compute_dtype=torch.bfloat16))
    with torch.no_grad():
        expected = model(llama_tokens).logits.double()
    merged = model.merge_and_unload()
    linears = _linears(merged)
    assert len(linears) == QUANTIZED_LAYERS + 1
    # the layers take the place of the 4-bit ones inside a model_dtype model
    assert all(type(m) is nn.Linear and m.weight.dtype == model_dtype for m in linears.values())
    with torch.no_grad():
        result = merged(llama_tokens).logits.double()
    scale = expected.abs().max()
    assert (result - expected).abs().max() <= BF16_MODEL_RELATIVE * scale


def test_bias_is_kept_and_merged_weight_is_the_hand_sum() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    biases = [model[0].bias, model[2].bias]
    peft_model = _qlora(model, QuantConfig(double_quant=False), skip_modules=())
    layer = peft_model.get_submodule("base_model.model.0")
    assert isinstance(layer, LoraQuantLinear)
    expected_weight = _hand_merged(layer, ["default"])
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peft_model(x)
    merged = peft_model.merge_and_unload()
    assert type(merged[0]) is nn.Linear and type(merged[2]) is nn.Linear
    assert merged[0].bias is biases[0] and merged[2].bias is biases[1]  # the same parameters
    torch.testing.assert_close(
        merged[0].weight.double(), expected_weight, rtol=0, atol=FP32_WEIGHT_TOLERANCE
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, rtol=0, atol=FP32_MODEL_TOLERANCE)


def test_merging_two_adapters_equals_both_active(
    quant_llama: nn.Module, llama_tokens: torch.Tensor
) -> None:
    model = _qlora(quant_llama, QuantConfig(), adapter_names=("first", "second"))
    model.set_adapter(["first", "second"])
    with torch.no_grad():
        expected = model(llama_tokens).logits
    merged = model.merge_and_unload(adapter_names=["first", "second"])
    with torch.no_grad():
        result = merged(llama_tokens).logits
    torch.testing.assert_close(result, expected, rtol=0, atol=FP32_MODEL_TOLERANCE)


def step_bound(quant_type: nf4.QuantType) -> float:
    """Half the largest gap between adjacent code values: the worst rounding of w / absmax."""
    code = sorted(nf4.code_book(quant_type).double().tolist())
    return max(b - a for a, b in itertools.pairwise(code)) / 2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_requantize_stays_within_the_step_bound_of_each_block(
    quant_llama: nn.Module, quant_type: nf4.QuantType
) -> None:
    config = QuantConfig(quant_type=quant_type, blocksize=64, double_quant=True)
    model = _qlora(quant_llama, config)
    layers = {k: m for k, m in model.named_modules() if isinstance(m, LoraQuantLinear)}
    expected = {k: _hand_merged(layer, ["default"]) for k, layer in layers.items()}
    merged = model.merge_and_unload(requantize=True)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert type(merged.get_submodule("lm_head")) is nn.Linear
    for key, weight in expected.items():
        layer = merged.get_submodule(key.removeprefix("base_model.model."))
        assert type(layer) is QuantLinear and layer.config == config
        assert layer.weight_dtype == torch.float32
        blocks = weight.reshape(-1, 64)
        absmax = blocks.abs().amax(dim=1)
        scales = nf4.block_scales(layer.quantized).double()
        error = (blocks - layer.dequantize_weight().double().reshape(-1, 64)).abs().amax(dim=1)
        # |w - code·s| <= |w - code·a| + |code|·|a - s| with |code| <= 1 (s: the 8-bit scale)
        bound = step_bound(quant_type) * absmax + (scales - absmax).abs()
        assert torch.all(error <= bound + ROUNDING_SLACK * absmax), key


def test_requantizing_an_untrained_adapter_gives_back_the_same_codes(
    quant_llama: nn.Module,
) -> None:
    quantized = quantize_model_linears(quant_llama, QuantConfig(double_quant=False))
    before = {k: b.clone() for k, b in quantized.named_buffers() if ".weight_" in k}
    model = get_peft_model(quantized, LoraConfig(r=4, target_modules="all-linear"))  # B = 0
    merged = model.merge_and_unload(requantize=True)
    after = {k: b for k, b in merged.named_buffers() if ".weight_" in k}
    assert after.keys() == before.keys() and len(after) == 2 * QUANTIZED_LAYERS
    assert all(torch.equal(after[k], before[k]) for k in before)  # dequant(Q) has the same codes


def test_merge_adapter_names_merge_and_unload_and_changes_nothing(
    quant_llama: nn.Module, llama_tokens: torch.Tensor
) -> None:
    model = _qlora(quant_llama, QuantConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=r"QuantLinear.*merge_and_unload\(\).*requantize=True"):
        model.merge_adapter()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(layer.merged_adapters for _, layer in model._lora_layers())


def test_safe_merge_refuses_nan_and_leaves_the_model_wrapped(quant_llama: nn.Module) -> None:
    model = _qlora(quant_llama, QuantConfig())
    layer = model.get_submodule("base_model.model.model.layers.1.mlp.up_proj")
    assert isinstance(layer, LoraQuantLinear)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(MergeError, match=r"'default' into '.*layers.1.mlp.up_proj'.*NaN/inf"):
        model.merge_and_unload(safe_merge=True)
    wrapped = [m for m in model.modules() if isinstance(m, LoraQuantLinear)]
    assert len(wrapped) == QUANTIZED_LAYERS


def test_unload_gives_back_the_quantized_layers(quant_llama: nn.Module) -> None:
    quantized = quantize_model_linears(quant_llama, QuantConfig())
    originals = {k: m for k, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    unloaded = get_peft_model(quantized, LoraConfig(target_modules="all-linear")).unload()
    assert all(unloaded.get_submodule(k) is m for k, m in originals.items())
