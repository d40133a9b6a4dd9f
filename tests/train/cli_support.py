"""Helpers of the `lorakit train` subprocess tests: a tiny causal model folder, rows, a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tiny_models import tiny_llama
from train.conftest import CAUSAL_CORPUS, build_causal_tokenizer

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300


def save_tiny_causal_model(folder: Path) -> Path:
    """A seeded 2-layer Llama (random weights) and its BPE tokenizer, as save_pretrained writes."""
    tokenizer = build_causal_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_causal_rows(path: Path, copies: int = 3) -> Path:
    """The causal corpus as ``{"text": ...}`` rows, ``copies`` times (12 rows by default)."""
    rows = [{"text": text} for text in CAUSAL_CORPUS] * copies
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def lorakit_train(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m lorakit train ARGS`` in ``cwd`` (one OpenMP thread, this checkout's source)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorakit", "train", *args],
        cwd=cwd,
        env={**full_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def read_events(output_dir: Path) -> list[dict[str, object]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
