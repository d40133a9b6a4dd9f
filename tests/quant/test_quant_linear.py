"""QuantLinear and quantize_model_linears: dense references, state dicts, training, storage."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnb_support import import_bitsandbytes
from lorakit.ops.nf4 import dequantize_4bit
from lorakit.quant import QuantConfig, QuantLinear, quantize_model_linears

bnb, BNB_MISSING = import_bitsandbytes("bitsandbytes")

# fp32 sums over 128-256 inputs in another order than the float64 reference; outputs of order 1.
FP32_TOLERANCE = 1e-5
# A Llama forward stacks ~20 such matmuls plus norms and softmax in fp32.
MODEL_TOLERANCE = 1e-4
LINEARS_PER_LLAMA_LAYER = 7  # q, k, v, o, gate, up, down


def make_linear(in_features: int = 256, out_features: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.bias.normal_()
    return linear


def dense_copy(model: nn.Module) -> nn.Module:
    """The model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize_weight(torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    return dense


def quantized_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.clone()
        for name, tensor in model.named_buffers()
        if name.rpartition(".")[2].startswith("weight_")
    }


# --- the layer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_equals_dense_matmul(quant_type: str, double_quant: bool) -> None:
    linear = make_linear()
    config = QuantConfig(quant_type=quant_type, double_quant=double_quant)  # type: ignore[arg-type]
    layer = QuantLinear.from_linear(linear, config)
    assert layer.bias is linear.bias  # the bias parameter is shared, not copied
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    weight = layer.dequantize_weight().double()
    expected = x.double() @ weight.T + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=FP32_TOLERANCE)


def test_bf16_compute_returns_the_input_dtype() -> None:
    layer = QuantLinear.from_linear(make_linear(), QuantConfig(compute_dtype=torch.bfloat16))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    result = layer(x)
    assert result.dtype == torch.float32
    x_bf16 = x.to(torch.bfloat16).double()
    weight = layer.dequantize_weight(torch.bfloat16).double()
    bias = layer.bias.to(torch.bfloat16).double()
    expected = x_bf16 @ weight.T + bias
    # bf16 outputs are rounded to 8 significant bits (relative 2^-8); the bias add rounds again.
    torch.testing.assert_close(result.double(), expected, rtol=2.0**-7, atol=2.0**-7)


def test_state_dict_round_trip() -> None:
    config = QuantConfig(quant_type="fp4", blocksize=128, double_quant=True)
    layer = QuantLinear.from_linear(make_linear(seed=3), config)
    state = layer.state_dict()
    assert set(state) == {
        "weight_packed",
        "weight_absmax",
        "weight_nested_absmax",
        "weight_offset",
        "bias",
    }
    fresh = QuantLinear(256, 48, bias=True, config=config)
    fresh.load_state_dict(state)
    for name, tensor in state.items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    x = torch.randn(2, 256)
    assert torch.equal(fresh(x), layer(x))


def test_half_cast_keeps_the_quantized_buffers_exact() -> None:
    layer = QuantLinear.from_linear(make_linear(seed=4), QuantConfig(double_quant=False))
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    layer.half()
    assert layer.bias is not None and layer.bias.dtype == torch.float16
    for name, buffer in layer.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name])
    x = torch.randn(2, 256).half()
    result = layer(x)
    assert result.dtype == torch.float16
    expected = x.double() @ layer.dequantize_weight(torch.float32).double().T
    expected += layer.bias.double()
    torch.testing.assert_close(result.double(), expected, rtol=2.0**-10, atol=2.0**-10)


def test_set_weight_requantizes_and_rejects_other_shapes() -> None:
    layer = QuantLinear.from_linear(make_linear(seed=5))
    other = make_linear(seed=6).weight
    layer.set_weight(other)
    fresh = QuantLinear.from_linear(make_linear(seed=6))
    assert torch.equal(layer.dequantize_weight(), fresh.dequantize_weight())
    with pytest.raises(ValueError, match=r"shape \(48, 128\).*expected \(48, 256\)"):
        layer.set_weight(torch.zeros(48, 128))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"quant_type": "int8"}, ValueError, "quant_type='int8'"),
        ({"blocksize": 48}, ValueError, "blocksize=48"),
        ({"compute_dtype": torch.float64}, ValueError, "compute_dtype=torch.float64"),
        ({"double_quant": 1}, TypeError, "double_quant must be True or False, got 1"),
    ],
)
def test_config_rejects_bad_values(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        QuantConfig(**options)


@pytest.mark.skipif(bnb is None, reason=BNB_MISSING)
def test_layer_equals_bitsandbytes_linear4bit() -> None:
    assert bnb is not None
    linear = make_linear(seed=7)
    theirs = bnb.nn.Linear4bit(
        256, 48, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4"
    )
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # quantizes the weight
    ours = QuantLinear.from_linear(linear, QuantConfig(double_quant=True))
    state = theirs.weight.quant_state
    assert torch.equal(ours.weight_packed, theirs.weight.data.view(-1))
    assert torch.equal(ours.weight_absmax, state.absmax)
    assert torch.equal(ours.weight_nested_absmax, state.state2.absmax)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=FP32_TOLERANCE)


# --- whole models --------------------------------------------------------------------------------


def test_quantize_model_replaces_linears_except_the_skipped(
    quant_llama: nn.Module, llama_tokens: torch.Tensor
) -> None:
    model = quantize_model_linears(quant_llama, QuantConfig(double_quant=True))
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * LINEARS_PER_LLAMA_LAYER
    assert type(model.get_submodule("lm_head")) is nn.Linear
    dense = dense_copy(model)
    with torch.no_grad():
        expected = dense(llama_tokens).logits
        result = model(llama_tokens).logits
    torch.testing.assert_close(result, expected, rtol=0, atol=MODEL_TOLERANCE)


def test_storage_per_parameter_with_double_quant(quant_llama: nn.Module) -> None:
    model = quantize_model_linears(quant_llama, QuantConfig(double_quant=True))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    parameters = sum(layer.in_features * layer.out_features for layer in layers)
    stored = sum(
        buffer.numel() * buffer.element_size()
        for layer in layers
        for name, buffer in layer.named_buffers()
        if name.startswith("weight_")
    )
    assert stored == sum(layer.storage_bytes() for layer in layers)
    assert stored / parameters <= 0.52


def test_training_other_parameters_leaves_codes_bit_identical(
    quant_llama: nn.Module, llama_tokens: torch.Tensor
) -> None:
    model = quantize_model_linears(quant_llama, QuantConfig(double_quant=True))
    dense = dense_copy(model)
    before = quantized_buffers(model)
    trained = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    for each in (model, dense):
        for name, parameter in each.named_parameters():
            parameter.requires_grad_(name in trained)
    model.train()
    loss = model(llama_tokens, labels=llama_tokens).loss
    loss.backward()
    dense(llama_tokens, labels=llama_tokens).loss.backward()
    # Gradients flow back through the quantized layers as through their dense equivalents.
    for name in trained:
        grad, dense_grad = model.get_parameter(name).grad, dense.get_parameter(name).grad
        assert grad is not None and dense_grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, dense_grad, rtol=0, atol=MODEL_TOLERANCE)
    embedding = model.get_parameter(trained[0]).detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    assert not torch.equal(model.get_parameter(trained[0]), embedding)
    after = quantized_buffers(model)
    assert after.keys() == before.keys() and len(after) == 4 * 2 * LINEARS_PER_LLAMA_LAYER
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_skip_entries_match_whole_name_parts(quant_llama: nn.Module) -> None:
    model = quantize_model_linears(quant_llama, skip_modules=("layers.0", "lm_head", "proj"))
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and all(name.startswith("model.layers.1.") for name in quantized)
    assert len(quantized) == LINEARS_PER_LLAMA_LAYER  # "proj" matches no whole part


def test_bad_calls_leave_the_model_unchanged(quant_llama: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"got the string 'lm_head'; write \('lm_head',\)"):
        quantize_model_linears(quant_llama, skip_modules="lm_head")
    quant_llama.get_submodule("model.layers.1.mlp.down_proj").double()
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj'.*torch.float64"):
        quantize_model_linears(quant_llama)
    assert not any(isinstance(m, QuantLinear) for m in quant_llama.modules())


def test_dequantize_weight_is_the_op_result() -> None:
    layer = QuantLinear.from_linear(make_linear(seed=9).to(torch.bfloat16))
    weight = layer.dequantize_weight()
    assert weight.dtype == torch.bfloat16 and weight.shape == (48, 256)
    assert torch.equal(weight, dequantize_4bit(layer.quantized, torch.bfloat16))
    assert layer.bias is not None and layer.bias.dtype == torch.bfloat16
