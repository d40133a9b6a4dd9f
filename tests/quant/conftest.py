"""A tiny Llama built from a config, wide enough (hidden 128) for realistic per-layer overheads."""

from __future__ import annotations

import pytest
import torch

SEED = 0


def tiny_llama(hidden_size: int = 128) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(SEED)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def quant_llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def llama_tokens() -> torch.Tensor:
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
