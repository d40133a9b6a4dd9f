"""Every script in examples/ runs as a real subprocess and prints the numbers it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_every_example_is_short() -> None:
    for script in EXAMPLES.glob("*.py"):
        assert len(script.read_text().splitlines()) <= 80, script.name


def test_lora_conv_digits_learns_new_classes_and_keeps_the_base() -> None:
    out = _run("lora_conv_digits.py")
    found = dict(re.findall(r"^(.+) accuracy ([\d.]+)$", out, flags=re.MULTILINE))
    assert float(found["base CNN: digits 5-9"]) == 0.0  # the head never saw them
    assert float(found["LoRA adapted: digits 5-9"]) >= 0.85
    # disabling the adapter gives back the base model exactly
    assert found["adapter disabled: digits 0-4"] == found["base CNN: digits 0-4"]
    assert float(found["base CNN: digits 0-4"]) >= 0.85
