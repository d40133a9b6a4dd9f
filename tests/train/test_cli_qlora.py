"""QLoRA end to end through `lorakit train`: a 4-bit base from the quantization: section, an
adapter from the lora: section, and the saved adapter read by peft onto the dequantized base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from lorakit import PeftModel
from lorakit.quant import QuantConfig, QuantLinear, load_quantized
from lorakit.train.data import make_loader, prepare_datasets
from train.cli_support import lorakit_train, read_events, save_tiny_causal_model, write_causal_rows
from train.conftest import build_causal_tokenizer

peft = pytest.importorskip("peft")

ROWS = 12
# peft runs the dequantized weight through one fp32 matmul, lorakit's 4-bit node dequantizes
# in pieces and adds the branch in place: the same products summed in another order, on
# logits of order 1.
PEFT_ATOL = 1e-5
# The first logged loss is the 4-bit base's (B starts at zero): fp32 sums in another order.
LOSS_ATOL = 1e-5
CONFIG = """\
model: model
train_data: train.jsonl
max_steps: 3
batch_size: {rows}
learning_rate: 0.01
logging_steps: 1
output_dir: out
lora:
  r: 4
  lora_alpha: 8
  lora_dropout: 0.0
  use_rslora: true
  init_lora_weights: gaussian
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
quantization:
  load_in_4bit: true
  quant_type: fp4
  blocksize: 32
  double_quant: true
"""
QUANT_CONFIG = QuantConfig(quant_type="fp4", blocksize=32, double_quant=True)


def _dequantized(model: nn.Module) -> nn.Module:
    """``model`` with each `QuantLinear` replaced by an `nn.Linear` holding dequant(Q)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None
            )
            linear.weight = nn.Parameter(module.dequantize_weight(torch.float32))
            if module.bias is not None:
                linear.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def _mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def test_qlora_run_trains_a_4bit_base_and_peft_reads_the_adapter(tmp_path: Path) -> None:
    save_tiny_causal_model(tmp_path / "model")
    write_causal_rows(tmp_path / "train.jsonl")
    (tmp_path / "run.yaml").write_text(CONFIG.format(rows=ROWS))
    result = lorakit_train("--config", "run.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = tmp_path / "out" / "adapter"

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
    assert config["init_lora_weights"] == "gaussian"
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    tokenizer = build_causal_tokenizer()
    train, _ = prepare_datasets(tmp_path / "train.jsonl", tokenizer, max_length=512)
    (batch,) = list(make_loader(train, tokenizer, batch_size=ROWS, shuffle=False))

    # The run trained on the 4-bit base: its first loss (B = 0, every row in one batch) is the
    # quantized model's, not the full-precision one's.
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    quantized = load_quantized(tmp_path / "model", QUANT_CONFIG)
    first_loss = read_events(tmp_path / "out")[0]["loss"]
    assert first_loss == pytest.approx(_mean_loss(quantized, batch), abs=LOSS_ATOL)
    assert abs(_mean_loss(full, batch) - first_loss) > 10 * LOSS_ATOL

    ours = PeftModel.from_pretrained(quantized, adapter).eval()
    theirs = peft.PeftModel.from_pretrained(
        _dequantized(load_quantized(tmp_path / "model", QUANT_CONFIG)), adapter
    ).eval()
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    ids = batch["input_ids"]
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        actual = ours(input_ids=ids).logits
        with ours.disable_adapter():
            untrained = ours(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=PEFT_ATOL, rtol=0)
    assert (actual - untrained).abs().max() > 100 * PEFT_ATOL  # the adapter changes outputs
