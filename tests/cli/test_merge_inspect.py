"""`lorakit merge` and `lorakit inspect` as real subprocesses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from lorakit import LoraConfig, get_peft_model
from lorakit.layers import LoraLayer
from tiny_models import tiny_llama, token_batch

MERGE_ATOL = 1e-5  # fp32 merged weights vs the two-matmul path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=300
    )


def test_merge_writes_a_model_transformers_loads_alone(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
    result = _run(
        "merge",
        "--base",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "adapter"),
        "--out",
        str(tmp_path / "merged"),
    )
    assert result.returncode == 0, result.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=MERGE_ATOL, rtol=0)


def test_inspect_counts_parameters_per_rank(minilm_dir: Path) -> None:
    result = _run("inspect", str(minilm_dir), "--max-depth", "2")
    assert result.returncode == 0, result.stderr
    assert "suggested target_modules: ['query', 'value']" in result.stdout
    # 6 layers x (query + value), each A (r, 384) and B (384, r): 6 * 2 * 768 = 9216 per rank
    rows = dict(re.findall(r"\|\s+(\d+) \|\s+([\d,]+) \|", result.stdout))
    assert {int(r): int(v.replace(",", "")) for r, v in rows.items()} == {
        r: 9216 * r for r in (1, 2, 4, 8, 16, 64)
    }
    all_linear = _run("inspect", str(minilm_dir), "--target-modules", "all-linear")
    # all linear layers: q, k, v, attention.output.dense (384->384), intermediate (384->1536),
    # output.dense (1536->384) in 6 layers, and the pooler (384->384)
    per_layer = 4 * 768 + 2 * (384 + 1536)
    assert f"|   1 | {6 * per_layer + 768:>16,d} |" in all_linear.stdout
