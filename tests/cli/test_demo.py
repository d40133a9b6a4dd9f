"""`lorakit demo` (the README's main job) as a real subprocess on the real MiniLM and data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import transformers

from lorakit import PeftModel

LORA_GAP_POINTS = 2.0  # the bar: LoRA within 2 accuracy points of full fine-tuning


def test_full_demo_lora_matches_full_fine_tuning(tmp_path: Path, minilm_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "demo", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    before = float(re.search(r"before training: ([\d.]+)%", out).group(1))  # type: ignore[union-attr]
    rows = re.findall(
        r"\| (LoRA r=16 all-linear|full fine-tuning) \| ([\d.]+)% \| ([\d,]+) \|", out
    )
    accuracy = {name: float(value) for name, value, _ in rows}
    trainable = {name: int(count.replace(",", "")) for name, _, count in rows}
    assert accuracy["full fine-tuning"] - accuracy["LoRA r=16 all-linear"] <= LORA_GAP_POINTS
    assert accuracy["LoRA r=16 all-linear"] > before + 20  # it learned the task
    # all-linear r=16 on MiniLM: 6 layers x (4 x 16 x 768 + 2 x 16 x 1920) + pooler 16 x 768,
    # plus the trained classifier head (384 x 2 + 2)
    assert trainable["LoRA r=16 all-linear"] == 6 * (4 * 16 * 768 + 2 * 16 * 1920) + 16 * 768 + 770
    difference = float(re.search(r"max abs difference ([\d.e+-]+)", out).group(1))  # type: ignore[union-attr]
    assert difference < 1e-4
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert any(p.abs().sum() > 0 for n, p in loaded.named_parameters() if "lora_B" in n)


def test_version_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True
    )
    assert result.stdout.strip() == "lorakit 0.1.0"
