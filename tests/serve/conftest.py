"""Fixtures for the serving tests: a tiny Llama with a tokenizer and adapters saved to folders.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few sentences, the
models are built from configs (tests/tiny_models.py), the adapters are lorakit adapters with
non-zero A and B saved in PEFT format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tiny_models import tiny_llama

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat ran too",
    "select name from users where id = 7",
    "please answer politely: thank you very much",
]
PAD = "<pad>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Positions of the served Llama: long generations (streams cut mid-way, shutdown under load).
MAX_POSITIONS = 4096
# name -> (rank, alpha, target modules) of the saved adapters: ranks and targets differ.
ADAPTERS = {
    "sql": (4, 8, ["q_proj", "v_proj"]),
    "polite": (2, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def build_serve_tokenizer() -> Any:
    """A byte-level BPE tokenizer with a chat template, a pad token and no end-of-sequence.

    Without an EOS token (and none in the model's configs) every completion runs to its
    max_tokens, so token counts and stream lengths are known in advance.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def serve_llama(vocab_size: int) -> torch.nn.Module:
    """The tiny Llama with room for long generations and no end-of-sequence token."""
    model = tiny_llama(vocab_size=vocab_size)
    model.config.max_position_embeddings = MAX_POSITIONS  # RoPE: positions are computed
    for config in (model.config, model.generation_config):
        config.eos_token_id = None
        config.bos_token_id = None
        config.pad_token_id = None
    return model


@dataclass(frozen=True)
class ServedFolders:
    """The folders a server is started with.

    Attributes:
        base: The tiny Llama and its tokenizer (save_pretrained).
        adapters_root: Holds one folder per entry of ADAPTERS.
        names: The adapters' names, sorted.
    """

    base: Path
    adapters_root: Path
    names: tuple[str, ...] = tuple(sorted(ADAPTERS))

    def adapter(self, name: str) -> Path:
        return self.adapters_root / name


def save_adapter(
    base: torch.nn.Module, folder: Path, rank: int, alpha: int, targets: list[str]
) -> None:
    """A lorakit LoRA adapter with random non-zero A and B, saved in PEFT format."""
    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(rank)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # larger updates, so adapters change greedy tokens
                parameter.mul_(8.0)
    model.save_pretrained(folder)


@pytest.fixture(scope="session")
def serve_tokenizer() -> Any:
    """`build_serve_tokenizer()`, built once."""
    return build_serve_tokenizer()


@pytest.fixture(scope="session")
def served_folders(tmp_path_factory: pytest.TempPathFactory) -> ServedFolders:
    """The tiny Llama, its tokenizer and the ADAPTERS, saved once per session."""
    root = tmp_path_factory.mktemp("served")
    tokenizer = build_serve_tokenizer()
    model = serve_llama(len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for name, (rank, alpha, targets) in ADAPTERS.items():
        save_adapter(serve_llama(len(tokenizer)), root / "adapters" / name, rank, alpha, targets)
    return ServedFolders(base=root / "base", adapters_root=root / "adapters")
