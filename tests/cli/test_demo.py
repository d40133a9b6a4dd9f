"""`lorakit demo` runs as a real subprocess on the real MiniLM and checks merged = unmerged."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_trains_and_merges() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "demo", "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trainable params: 73,728 || all params: 22,786,944" in result.stdout
    losses = [float(v) for v in re.findall(r"paraphrase loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0]
    difference = float(re.search(r"max abs difference ([0-9.e+-]+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert difference < 1e-4


def test_version_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True
    )
    assert result.stdout.strip() == "lorakit 0.1.0"
