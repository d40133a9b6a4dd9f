"""`replace_lora_weights_loftq` on a bitsandbytes 4-bit Llama, peft's function as the oracle.

peft computes its fit on "cuda" (hard-coded); on this CPU-only machine the oracle runs with
`Tensor.to(device="cuda")` sent to the CPU, the only change to its code path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from bnb_support import import_bitsandbytes, load_bnb_llama
from lorakit.errors import AdapterStateError, ConfigError
from lorakit.layers.packed import LoraPackedLinear
from tiny_models import tiny_llama, token_batch

bnb, BNB_MISSING = import_bitsandbytes("bitsandbytes")
pytestmark = pytest.mark.skipif(bnb is None, reason=BNB_MISSING)

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYERS = 6  # 3 targets in each of 2 blocks
# Both fit the same fp32 residual with the same fp32 SVD; the factors are formed with another
# product (diag matmul vs broadcast), exact up to fp32 rounding of each entry.
FACTOR_TOL = 1e-6
PEFT_TOLERANCE = 1e-6  # as in test_bnb_lora.py: the same branch summed in another order


def _llama(hidden_size: int = 64) -> nn.Module:
    """A seeded Llama wide enough for bitsandbytes' CPU kernels (blocks of 64 inputs)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    _llama().save_pretrained(folder)
    return folder


def _lorakit(folder: Path, **options: Any) -> lorakit.PeftModel:
    config = lorakit.LoraConfig(target_modules=TARGETS, **options)
    return lorakit.get_peft_model(load_bnb_llama(folder), config)


def _peft(folder: Path, **options: Any) -> Any:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(
            load_bnb_llama(folder), peft.LoraConfig(target_modules=TARGETS, **options)
        )


@contextlib.contextmanager
def _cuda_on_cpu() -> Iterator[None]:
    original = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") in ("cuda", "xpu"):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    torch.Tensor.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.to = original  # type: ignore[method-assign]


def _peft_replaced(folder: Path, callback: Any = None, **options: Any) -> Any:
    from peft import replace_lora_weights_loftq as peft_replace

    model = _peft(folder, **options)
    with _cuda_on_cpu():
        peft_replace(model, model_path=str(folder), callback=callback)
    return model


def _pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A, B) of the default adapter, for lorakit and peft models alike."""
    pairs = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            pairs[key] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return pairs


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch()).logits.double()


def test_public_import_paths() -> None:
    assert lorakit.replace_lora_weights_loftq is lorakit.utils.replace_lora_weights_loftq


def test_scale_one_gives_peft_factors_and_outputs(saved_llama: Path) -> None:
    # No forward before the replacement: on CPUs with AVX512-BF16 bitsandbytes' first
    # inference forward repacks the 4-bit weight with bf16 scales, another dequantization.
    model = _lorakit(saved_llama, r=4, lora_alpha=4)  # s = 1
    lorakit.replace_lora_weights_loftq(model, model_path=saved_llama)
    oracle = _peft_replaced(saved_llama, r=4, lora_alpha=4)
    mine, theirs = _pairs(model), _pairs(oracle)
    assert mine.keys() == theirs.keys() and len(mine) == LAYERS
    for key, (A, B) in mine.items():
        assert (A - theirs[key][0]).abs().max() <= FACTOR_TOL
        assert (B - theirs[key][1]).abs().max() <= FACTOR_TOL
    assert (_logits(model) - _logits(oracle)).abs().max() <= PEFT_TOLERANCE
    before = _logits(_lorakit(saved_llama, r=4, lora_alpha=4))  # B = 0: the 4-bit model
    assert (_logits(model) - before).abs().max() > 1e-4  # the fit changed the output


def test_the_scale_is_divided_out_so_the_adapter_adds_the_fit(saved_llama: Path) -> None:
    """s = 8/4 = 2: s · B A is the fit of W − dequant(Q) (peft's B A), closer to W than peft's."""
    from safetensors.torch import load_file

    weights = load_file(saved_llama / "model.safetensors")
    model = _lorakit(saved_llama, r=4, lora_alpha=8)
    lorakit.replace_lora_weights_loftq(model, model_path=saved_llama)
    oracle = _peft_replaced(saved_llama, r=4, lora_alpha=8)
    theirs = _pairs(oracle)
    for key, layer in model._lora_layers():
        assert isinstance(layer, LoraPackedLinear)
        A, B = layer._adapter_pair("default")
        fit = theirs[key][1].double() @ theirs[key][0].double()  # peft stores the fit unscaled
        mine = 2.0 * B.double() @ A.double()
        assert (mine - fit).abs().max() <= 1e-5 * fit.abs().max()
        W = weights[f"{key}.weight"].double()
        residual = W - layer.dequantized_weight().double()
        truncated = torch.linalg.svdvals(residual)[4:].norm()  # Eckart–Young: the best error
        assert torch.isclose((residual - mine).norm(), truncated, rtol=1e-5)
        # peft's s · B A is twice the fit: its error is ‖R − 2F‖² = ‖R − F‖² + ‖F‖².
        peft_error = (residual - 2.0 * fit).norm()
        assert torch.isclose(peft_error**2, truncated**2 + fit.norm() ** 2, rtol=1e-5)
        assert fit.norm() > 0.1 * truncated


def test_callback_names_and_rollback_as_in_peft(saved_llama: Path) -> None:
    seen: dict[str, list[str]] = {"lorakit": [], "peft": []}

    def keep_all_but_v_proj(library: str) -> Any:
        def callback(model: nn.Module, name: str) -> bool:
            seen[library].append(name)
            return not name.endswith("v_proj")

        return callback

    model = _lorakit(saved_llama, r=4, lora_alpha=4, init_lora_weights=False)
    torch.manual_seed(5)
    for A, B in _pairs(model).values():
        A.data.normal_()
        B.data.normal_()
    before = {key: (A.clone(), B.clone()) for key, (A, B) in _pairs(model).items()}
    lorakit.replace_lora_weights_loftq(model, saved_llama, callback=keep_all_but_v_proj("lorakit"))
    oracle = _peft_replaced(saved_llama, callback=keep_all_but_v_proj("peft"), r=4, lora_alpha=4)
    assert seen["lorakit"] == seen["peft"] and len(seen["lorakit"]) == LAYERS
    theirs = _pairs(oracle)
    for key, (A, B) in _pairs(model).items():
        if key.endswith("v_proj"):  # rolled back: the weights from before, bit for bit
            assert torch.equal(A, before[key][0]) and torch.equal(B, before[key][1])
        else:
            assert (A - theirs[key][0]).abs().max() <= FACTOR_TOL
            assert (B - theirs[key][1]).abs().max() <= FACTOR_TOL


def test_model_path_from_the_config_and_sharded_checkpoints(
    saved_llama: Path, tmp_path: Path
) -> None:
    explicit = _lorakit(saved_llama, r=4, lora_alpha=4)
    lorakit.replace_lora_weights_loftq(explicit, model_path=saved_llama)
    inferred = _lorakit(saved_llama, r=4, lora_alpha=4)  # config._name_or_path is the folder
    lorakit.replace_lora_weights_loftq(inferred)
    sharded = tmp_path / "sharded"
    _llama().save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    from_shards = _lorakit(saved_llama, r=4, lora_alpha=4)
    lorakit.replace_lora_weights_loftq(from_shards, model_path=sharded)
    expected = explicit.state_dict()
    for model in (inferred, from_shards):
        assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())


def test_refusals_change_nothing(saved_llama: Path, tmp_path: Path) -> None:
    model = _lorakit(saved_llama, r=4, lora_alpha=4, init_lora_weights=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"holds no model.safetensors"):
        lorakit.replace_lora_weights_loftq(model, model_path=tmp_path)
    other = tmp_path / "other"
    _llama(hidden_size=128).save_pretrained(other)
    with pytest.raises(ConfigError, match=r"q_proj.weight has shape \(128, 128\).*\(64, 64\)"):
        lorakit.replace_lora_weights_loftq(model, model_path=other)
    with pytest.raises(lorakit.errors.AdapterNameError, match=r"'missing'"):
        lorakit.replace_lora_weights_loftq(model, saved_llama, adapter_name="missing")
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    dense = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=TARGETS))
    with pytest.raises(AdapterStateError, match=r"no 4-bit LoRA layer holding adapter 'default'"):
        lorakit.replace_lora_weights_loftq(dense, saved_llama)
    with pytest.raises(TypeError, match=r"needs a lorakit PeftModel, got LlamaForCausalLM"):
        lorakit.replace_lora_weights_loftq(tiny_llama(), saved_llama)


def test_lorakit_quant_linear_bases_get_the_fit_too(saved_llama: Path) -> None:
    from safetensors.torch import load_file

    from lorakit.quant import load_quantized

    weights = load_file(saved_llama / "model.safetensors")
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    model = lorakit.get_peft_model(load_quantized(saved_llama), config)
    lorakit.replace_lora_weights_loftq(model, saved_llama)
    layers = list(model._lora_layers())
    assert len(layers) == LAYERS
    for key, layer in layers:
        assert isinstance(layer, LoraPackedLinear)
        A, B = layer._adapter_pair("default")
        residual = weights[f"{key}.weight"].double() - layer.dequantized_weight().double()
        U, S, Vh = torch.linalg.svd(residual)
        fit = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]  # the best rank-4 fit, by hand
        adapter = layer.scaling["default"] * B.double() @ A.double()
        # lorakit's SVD runs in fp32: errors of a few fp32 ulps of the residual's size.
        assert (adapter - fit).abs().max() <= 1e-5 * residual.abs().max()
