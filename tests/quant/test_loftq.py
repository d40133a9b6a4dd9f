"""LoftQ: the decomposition's error against plain 4-bit quantization, and the model surgery."""

from __future__ import annotations

import copy
import json
import math
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from lorakit import LoftQConfig, LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, TargetModuleError, UnsupportedModuleError
from lorakit.layers.linear import LoraLinear
from lorakit.layers.routing import AdapterRouting
from lorakit.ops.loftq import loftq_decompose, low_rank_fit
from lorakit.ops.nf4 import dequantize_4bit, quantize_4bit
from lorakit.quant import LoraQuantLinear, QuantConfig, QuantLinear, quantize_model_linears
from lorakit.quant.loftq import loftq_quant_linear
from tiny_models import tiny_gpt2, tiny_llama, token_batch, train_causal_lm

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
        from peft.utils import loftq_utils
    ORACLE_MISSING = ""
except Exception as error:  # a missing native library raises more than ImportError
    bnb = loftq_utils = None
    ORACLE_MISSING = f"bitsandbytes or peft cannot be imported here ({error!r}): no oracle"

# The reported error comes from the singular values the fp32 SVD leaves out; the direct fp64
# norm of W − (dequant(Q) + s·BA) differs by the SVD's fp32 rounding (~1e-6 relative).
ERROR_RTOL = 1e-4
# fp32 matmuls over <= 128 inputs, outputs of order 1, against an fp64 hand computation.
FP32_TOLERANCE = 1e-5
# The same iterates give the same numbers; only summation order in the check can differ.
MONOTONE_RTOL = 1e-9
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def direct_error(W: torch.Tensor, result: Any, scale: float) -> float:
    """‖W − (dequant(Q) + s · B A)‖_F in float64, computed here from the returned tensors."""
    approx = dequantize_4bit(result.quantized, torch.float64) + scale * (
        result.B.double() @ result.A.double()
    )
    return float((W.detach().double() - approx).norm())


def plain_error(W: torch.Tensor, **options: Any) -> float:
    """‖W − dequant(quantize(W))‖_F in float64."""
    q = quantize_4bit(W, **options)
    return float((W.detach().double() - dequantize_4bit(q, torch.float64)).norm())


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * 0.05


# --- the decomposition --------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    out_features=st.integers(2, 48),
    in_features=st.integers(2, 96),
    r=st.integers(1, 8),
    scale=st.sampled_from([0.25, 1.0, 2.0, 16.0]),
    num_iter=st.integers(1, 3),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_loftq_beats_plain_quantization_on_random_weights(
    out_features: int,
    in_features: int,
    r: int,
    scale: float,
    num_iter: int,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    seed: int,
) -> None:
    W = random_weight(out_features, in_features, seed)
    options: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
    }
    result = loftq_decompose(W, r, scale, num_iter, **options)
    assert result.A.shape == (r, in_features) and result.B.shape == (out_features, r)
    error, plain = direct_error(W, result, scale), plain_error(W, **options)
    assert error < plain
    # an exact fit (r >= rank) leaves only fp32 rounding of the reconstruction
    assert math.isclose(error, result.error, rel_tol=ERROR_RTOL, abs_tol=1e-6 * float(W.norm()))
    assert math.isclose(plain, result.quantization_error, rel_tol=1e-6)  # fp32 residual
    assert len(result.errors) == num_iter


def test_low_rank_fit_is_the_truncated_svd_with_the_scale_divided_out() -> None:
    R = random_weight(40, 24, seed=3)
    A, B, error = low_rank_fit(R, 5, scale=4.0)
    U, S, Vh = torch.linalg.svd(R.double(), full_matrices=False)
    best = (U[:, :5] * S[:5]) @ Vh[:5]  # Eckart–Young: the best rank-5 approximation
    assert torch.allclose(4.0 * B.double() @ A.double(), best, atol=1e-6, rtol=0)
    assert math.isclose(error, float(S[5:].square().sum().sqrt()), rel_tol=1e-5)
    # the scale is split evenly, so A and B have the same row / column norms
    assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-5)


def test_rank_above_the_matrix_rank_fits_exactly_with_zero_padding() -> None:
    W = random_weight(6, 4, seed=5)
    result = loftq_decompose(W, 7, 2.0)
    assert torch.equal(result.A[4:], torch.zeros(3, 4))
    assert torch.equal(result.B[:, 4:], torch.zeros(6, 3))
    assert direct_error(W, result, 2.0) < 1e-6 < result.quantization_error


def test_first_iteration_codes_are_what_quant_linear_holds() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    for config in (QuantConfig(), QuantConfig(blocksize=32, double_quant=False)):
        result = loftq_decompose(
            linear.weight, 4, 1.0, 1, "nf4", config.blocksize, config.double_quant
        )
        reference = QuantLinear.from_linear(linear, config).quantized
        assert torch.equal(result.quantized.packed, reference.packed)
        assert torch.equal(result.quantized.absmax, reference.absmax)
        assert result.quantized.is_double_quant == config.double_quant


def test_more_iterations_are_never_worse_and_do_improve() -> None:
    W = random_weight(64, 128, seed=7)
    errors = [direct_error(W, loftq_decompose(W, 4, 2.0, n), 2.0) for n in (1, 2, 4)]
    assert errors[1] <= errors[0] * (1 + MONOTONE_RTOL)
    assert errors[2] <= errors[1] * (1 + MONOTONE_RTOL)
    assert errors[2] < 0.99 * errors[0]  # the alternation itself helps on Gaussian weights


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"W": torch.zeros(8)}, r"2-D weight"),
        ({"W": torch.zeros(4, 4, dtype=torch.float64)}, r"torch.float64"),
        ({"r": 0}, r"r=0"),
        ({"scale": 0.0}, r"scale=0.0"),
        ({"num_iter": 0}, r"num_iter=0"),
        ({"blocksize": 48}, r"blocksize=48"),
    ],
)
def test_decompose_rejects_bad_input(bad: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"W": torch.ones(4, 4), "r": 2, "scale": 1.0, "num_iter": 1}
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        loftq_decompose(**arguments)


def _minilm_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    layers = model.encoder.layer  # type: ignore[union-attr]
    return {
        "layer.0.attention.self.query": layers[0].attention.self.query.weight,  # (384, 384)
        "layer.3.intermediate.dense": layers[3].intermediate.dense.weight,  # (1536, 384)
        "layer.5.output.dense": layers[5].output.dense.weight,  # (384, 1536)
    }


def test_loftq_beats_plain_quantization_on_minilm(minilm: nn.Module) -> None:
    for name, W in _minilm_weights(minilm).items():
        result = loftq_decompose(W, 16, 2.0, num_iter=1)
        error, plain = direct_error(W, result, 2.0), plain_error(W, double_quant=True)
        assert error < 0.97 * plain, name  # measured 0.87-0.95: a real reduction
        assert math.isclose(error, result.error, rel_tol=ERROR_RTOL), name


def test_more_iterations_never_worse_on_minilm(minilm: nn.Module) -> None:
    W = _minilm_weights(minilm)["layer.0.attention.self.query"]
    errors = [direct_error(W, loftq_decompose(W, 8, 1.0, n), 1.0) for n in (1, 2, 4)]
    assert errors[1] <= errors[0] * (1 + MONOTONE_RTOL)
    assert errors[2] <= errors[1] * (1 + MONOTONE_RTOL)


# --- peft as the oracle -------------------------------------------------------------------


def _peft_loftq_on_cpu(W: torch.Tensor, r: int, num_iter: int) -> float:
    """peft's LoftQ loop (loftq_utils.loftq_init) with its CUDA transfer left out.

    peft quantizes with bitsandbytes (NF4, blocks of 64, no double quantization) and fits the
    residual with its own `_low_rank_decomposition`; its factors carry no LoRA scale, so
    this equals lorakit with scale 1. Returns ‖W − (dequant(Q) + L R)‖_F in float64.
    """
    assert bnb is not None and loftq_utils is not None
    weight = W.float()
    residual = weight.clone()
    for step in range(num_iter):
        packed, state = bnb.functional.quantize_4bit(
            residual, blocksize=64, compress_statistics=False, quant_type="nf4"
        )
        dequantized = bnb.functional.dequantize_4bit(packed, state)
        fit = loftq_utils._low_rank_decomposition(weight - dequantized, reduced_rank=r)
        L, R = fit["L"], fit["R"]
        if step + 1 < num_iter:
            residual = weight - L @ R
    return float((weight.double() - dequantized.double() - L.double() @ R.double()).norm())


@pytest.mark.skipif(bnb is None, reason=ORACLE_MISSING)
def test_peft_loftq_init_as_oracle() -> None:
    assert loftq_utils is not None
    W = random_weight(128, 64, seed=11)
    try:
        dequantized, lora_A, lora_B = loftq_utils.loftq_init(
            W, num_bits=4, reduced_rank=8, num_iter=2
        )
    except (AssertionError, RuntimeError) as error:
        pytest.skip(
            f"peft 0.21's loftq_init moves the weight to CUDA/XPU unconditionally and fails "
            f"on this machine ({error}); test_peft_loftq_loop_on_cpu_as_oracle runs its loop "
            "on CPU instead."
        )
    peft_error = float((W.double() - dequantized.double() - lora_B @ lora_A).norm())
    ours = direct_error(W, loftq_decompose(W, 8, 1.0, 2, double_quant=False), 1.0)
    assert ours <= peft_error * (1 + ERROR_RTOL)


@pytest.mark.skipif(bnb is None, reason=ORACLE_MISSING)
@pytest.mark.parametrize("num_iter", [1, 3])
def test_peft_loftq_loop_on_cpu_as_oracle(minilm: nn.Module, num_iter: int) -> None:
    for W in (random_weight(96, 128, seed=13), _minilm_weights(minilm)["layer.5.output.dense"]):
        peft_error = _peft_loftq_on_cpu(W, 8, num_iter)
        ours = direct_error(W, loftq_decompose(W, 8, 1.0, num_iter, double_quant=False), 1.0)
        # same quantizer bytes, same alternation: equal up to fp32 SVD rounding, never worse
        assert ours <= peft_error * (1 + ERROR_RTOL)
        if num_iter == 1:
            assert math.isclose(ours, peft_error, rel_tol=ERROR_RTOL)


# --- model surgery ------------------------------------------------------------------------


def loftq_config(**overrides: Any) -> LoraConfig:
    options: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": LLAMA_LINEARS,
        "init_lora_weights": "loftq",
        "loftq_config": LoftQConfig(loftq_iter=2),
    }
    options.update(overrides)
    return LoraConfig(**options)


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        key: module.weight.detach().clone()
        for key, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def test_model_gets_4bit_bases_holding_the_loftq_factors(quant_llama: nn.Module) -> None:
    original = dense_weights(quant_llama)
    config = loftq_config(rank_pattern={"down_proj": 6}, alpha_pattern={"q_proj": 3.0})
    model = get_peft_model(quant_llama, config)
    layers = {k: m for k, m in model.get_base_model().named_modules() if isinstance(m, LoraLinear)}
    assert len(layers) == 14 and all(isinstance(m, LoraQuantLinear) for m in layers.values())
    assert isinstance(model.get_base_model().lm_head, nn.Linear)  # not targeted: untouched
    for key, layer in layers.items():
        base = layer.base_layer
        assert isinstance(base, QuantLinear) and base.config == QuantConfig()
        r = 6 if key.endswith("down_proj") else 4
        scale = (3.0 if key.endswith("q_proj") else 8.0) / r
        assert layer.scaling["default"] == scale and layer.r["default"] == r
        expected = loftq_decompose(original[key], r, scale, 2)
        assert torch.equal(base.weight_packed, expected.quantized.packed), key
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.allclose(A, expected.A, atol=1e-6) and torch.allclose(B, expected.B, atol=1e-6)
        assert A.requires_grad and B.requires_grad
        error = direct_error(original[key], expected, scale)
        assert error < plain_error(original[key], double_quant=True), key
        x = torch.randn(3, layer.in_features, dtype=torch.float64)
        bias = 0 if base.bias is None else base.bias.double()
        by_hand = x @ base.dequantize_weight(torch.float64).t() + bias
        by_hand = by_hand + scale * (x @ A.double().t()) @ B.double().t()
        with torch.no_grad():
            assert torch.allclose(layer(x.float()).double(), by_hand, atol=FP32_TOLERANCE), key


def test_model_output_closer_to_original_than_plain_qlora(
    quant_llama: nn.Module, llama_tokens: torch.Tensor
) -> None:
    with torch.no_grad():
        reference = quant_llama(llama_tokens).logits
    plain_config = loftq_config(init_lora_weights=True, loftq_config={})
    plain = get_peft_model(
        quantize_model_linears(copy.deepcopy(quant_llama), QuantConfig()), plain_config
    )
    loftq = get_peft_model(quant_llama, loftq_config())
    with torch.no_grad():
        plain_gap = (plain(llama_tokens).logits - reference).norm()
        loftq_gap = (loftq(llama_tokens).logits - reference).norm()
    assert loftq_gap < 0.95 * plain_gap  # measured 0.89


def test_each_full_precision_weight_is_freed_before_the_next_layer(
    quant_llama: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lorakit.inject.loftq as surgery

    alive = [
        weakref.ref(m.weight)
        for key, m in quant_llama.named_modules()
        if key.rsplit(".", 1)[-1] in LLAMA_LINEARS
    ]
    seen: list[int] = []
    convert: Callable[..., Any] = surgery.loftq_quant_linear

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(sum(ref() is not None for ref in alive))
        return convert(*args, **kwargs)

    monkeypatch.setattr(surgery, "loftq_quant_linear", counting)
    get_peft_model(quant_llama, loftq_config())
    assert seen == list(range(len(alive), 0, -1))  # one fewer live fp weight at each layer
    assert all(ref() is None for ref in alive)


def test_loftq_model_trains_and_keeps_codes_bit_identical() -> None:
    model = get_peft_model(tiny_llama(), loftq_config())
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    losses = train_causal_lm(model, steps=6)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert sum("weight_packed" in k for k in frozen) == 14
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in adapters.items())


def test_saved_adapter_reproduces_the_model_on_its_quantized_base(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), loftq_config())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    state = model.state_dict()
    assert len(saved) == 28
    for key, tensor in saved.items():
        assert ".lora_A.weight" in key or ".lora_B.weight" in key
        assert torch.equal(tensor, state[key.replace(".weight", ".default.weight")]), key
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] == "loftq"
    assert written["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
    quantized_base = model.unload()  # the 4-bit base the adapter was made for
    reloaded = PeftModel.from_pretrained(quantized_base, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_conv1d_targets_become_4bit_linears() -> None:
    gpt2 = tiny_gpt2()
    original = {k: m.weight.detach().clone() for k, m in gpt2.named_modules() if k.endswith("c_fc")}
    model = get_peft_model(gpt2, loftq_config(target_modules=["c_fc"], fan_in_fan_out=True))
    for key, W_conv in original.items():  # Conv1D stores (in, out)
        layer = model.get_base_model().get_submodule(key)
        assert isinstance(layer, LoraQuantLinear)
        W = W_conv.t()
        expected = loftq_decompose(W, 4, 2.0, 2)
        assert torch.equal(layer.base_layer.weight_packed, expected.quantized.packed)
        assert direct_error(W, expected, 2.0) < plain_error(W, double_quant=True)


def test_half_precision_layer_computes_in_its_dtype() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    layer, result = loftq_quant_linear(linear, 4, 1.0, 1)
    assert layer.config.compute_dtype == torch.bfloat16 and layer.weight_dtype == torch.bfloat16
    reference = QuantLinear.from_linear(linear, QuantConfig(compute_dtype=torch.bfloat16))
    assert torch.equal(layer.weight_packed, reference.weight_packed)
    assert layer.bias is linear.bias and result.A.dtype == torch.float32


# --- refusals -----------------------------------------------------------------------------


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == before.keys() and all(
        torch.equal(state[k], v) for k, v in before.items()
    )


def test_unsupported_target_is_refused_before_anything_changes(quant_llama: nn.Module) -> None:
    before = copy.deepcopy(quant_llama.state_dict())
    config = loftq_config(target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(UnsupportedModuleError, match=r"'model.embed_tokens', a Embedding"):
        get_peft_model(quant_llama, config)
    assert _unchanged(quant_llama, before)


def test_already_quantized_target_is_refused(quant_llama: nn.Module) -> None:
    quantized = quantize_model_linears(quant_llama, QuantConfig())
    with pytest.raises(UnsupportedModuleError, match=r"already quantized"):
        get_peft_model(quantized, loftq_config())


def test_loftq_on_layers_that_hold_adapters_is_refused(quant_llama: nn.Module) -> None:
    model = get_peft_model(quant_llama, loftq_config(init_lora_weights=True, loftq_config={}))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TargetModuleError, match=r"already holds adapters \['default'\]"):
        model.add_adapter("loftq", loftq_config())
    assert _unchanged(model, before) and list(model.peft_config) == ["default"]


def test_weight_without_data_is_refused() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TargetModuleError, match=r"on meta .* holding data"):
        get_peft_model(model, loftq_config(target_modules=["0"]))


def test_layer_level_loftq_names_what_works() -> None:
    layer = LoraLinear(nn.Linear(8, 8), AdapterRouting())
    with pytest.raises(ConfigError, match=r"'loftq' is applied by get_peft_model"):
        layer.add_adapter("a", 2, 2.0, 0.0, False, init_lora_weights="loftq")
