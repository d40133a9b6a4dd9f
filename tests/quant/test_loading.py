"""load_quantized: a saved transformers model loaded with its linears quantized on arrival."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.quant import QuantConfig, QuantLinear, load_quantized, quantize_model_linears

QUANT_CONFIG = QuantConfig(quant_type="nf4", blocksize=64, double_quant=True)
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _llama(tie_word_embeddings: bool) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    _llama(request.param).save_pretrained(folder)
    return folder


def _reference(folder: Path, skip: tuple[str, ...], dtype: torch.dtype) -> nn.Module:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    return quantize_model_linears(model, QUANT_CONFIG, skip).eval()


def _assert_identical(model: nn.Module, reference: nn.Module, tokens: torch.Tensor) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


@pytest.mark.parametrize("skip", [("lm_head",), ()], ids=["skip-lm_head", "skip-none"])
def test_equals_from_pretrained_then_quantize(
    saved: Path, skip: tuple[str, ...], llama_tokens: torch.Tensor
) -> None:
    model = load_quantized(saved, QUANT_CONFIG, skip_modules=skip)
    reference = _reference(saved, skip, torch.float32)
    assert type(model) is type(reference) and not model.training
    _assert_identical(model, reference, llama_tokens)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * LINEARS_PER_LAYER + (0 if skip else 1)
    embedding = model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and skip:
        assert model.lm_head.weight is embedding  # still tied: one parameter
    if not skip:
        assert isinstance(model.lm_head, QuantLinear) and embedding.dtype == torch.float32


def test_bf16_and_skip_entries(saved: Path, llama_tokens: torch.Tensor) -> None:
    skip = ("lm_head", "layers.0")
    model = load_quantized(saved, QUANT_CONFIG, skip_modules=skip, torch_dtype=torch.bfloat16)
    _assert_identical(model, _reference(saved, skip, torch.bfloat16), llama_tokens)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == LINEARS_PER_LAYER
    assert all(name.startswith("model.layers.1.") for name in quantized)
    dense = model.get_submodule("model.layers.0.mlp.down_proj")
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.bfloat16
    file_weight = load_file(saved / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(dense.weight, file_weight.to(torch.bfloat16))


def test_sharded_checkpoint(tmp_path: Path, llama_tokens: torch.Tensor) -> None:
    _llama(tie_word_embeddings=False).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_quantized(tmp_path, QUANT_CONFIG)
    _assert_identical(model, _reference(tmp_path, ("lm_head",), torch.float32), llama_tokens)


def test_a_base_model_class_drops_the_prefix_and_logs_the_head(
    saved: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import transformers

    with caplog.at_level(logging.WARNING, logger="lorakit.quant.loading"):
        model = load_quantized(saved, QUANT_CONFIG, model_class=transformers.LlamaModel)
    assert type(model) is transformers.LlamaModel
    if "lm_head.weight" in load_file(saved / "model.safetensors"):  # not saved when tied
        assert "1 tensors in" in caplog.text and "no place in LlamaModel" in caplog.text
        assert "lm_head.weight" in caplog.text
    else:
        assert caplog.text == ""
    file_weight = load_file(saved / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, file_weight)


def test_missing_folder_and_pickled_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere', which is not a folder"):
        load_quantized(tmp_path / "nowhere")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"only pickled weights \(pytorch_model.bin\).*safetensors"
    ):
        load_quantized(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*\['config.json'\]"):
        load_quantized(tmp_path)


def test_a_weight_missing_from_the_file_is_an_error(tmp_path: Path) -> None:
    _llama(tie_word_embeddings=False).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no value for 2 weights.*model.norm.weight.*v_proj"):
        load_quantized(tmp_path)


def test_bad_options_are_refused(saved: Path) -> None:
    with pytest.raises(ValueError, match=r"torch_dtype=torch.float64 is not supported"):
        load_quantized(saved, torch_dtype=torch.float64)
    with pytest.raises(TypeError, match=r"got the string 'lm_head'; write \('lm_head',\)"):
        load_quantized(saved, skip_modules="lm_head")


def test_auto_dtype_follows_the_config(tmp_path: Path) -> None:
    _llama(tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_quantized(tmp_path, QUANT_CONFIG)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, QuantLinear) and layer.weight_dtype == torch.bfloat16
