"""Tiny seeded transformers models and peft helpers for the adapter-file tests.

`peft` is the oracle: what it writes with `save_pretrained` is what lorakit must write.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HIDDEN = 32
VOCAB = 64


def _quiet() -> None:
    warnings.filterwarnings("ignore", module="peft")
    transformers.logging.set_verbosity_error()


def tiny_llama(seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    _quiet()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden + 5,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_bert(seed: int = 0) -> nn.Module:
    _quiet()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_roberta(seed: int = 0) -> nn.Module:
    _quiet()
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        num_labels=3,
    )
    return transformers.RobertaForSequenceClassification(config)


def tiny_gpt2_resized(seed: int = 0) -> nn.Module:
    """GPT-2 with tied input/output embeddings, vocabulary grown from 64 to 72 rows."""
    _quiet()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=HIDDEN, n_layer=2, n_head=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    model.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
    return model


def tiny_vit(seed: int = 0) -> nn.Module:
    """ViT: its patch embedding is a Conv2d, the adapter there has 4-D lora_A/lora_B."""
    _quiet()
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "gpt2_resized": tiny_gpt2_resized,
    "vit": tiny_vit,
}


def peft_model(
    model_name: str, adapters: dict[str, dict[str, object]], seed: int = 0, adapter_seed: int = 1
) -> nn.Module:
    """A peft model with the given adapters (name -> LoraConfig kwargs), non-zero B."""
    base = MODEL_FACTORIES[model_name](seed)
    torch.manual_seed(adapter_seed)
    model = None
    for name, options in adapters.items():
        config = peft.LoraConfig(init_lora_weights=False, **options)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    assert model is not None
    return model


def embedding_paths(model: nn.Module) -> list[str]:
    """State-dict paths of the input and output embedding modules, as a PeftModel finds them."""
    names = {id(module): name for name, module in model.named_modules()}
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [names[id(layer)] for layer in layers if layer is not None]


def read_peft_files(directory: Path, adapter_name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = directory if adapter_name == "default" else directory / adapter_name
    return load_file(folder / "adapter_model.safetensors")


class PeftOracle:
    """The helpers above, handed to tests as one fixture (conftest is not importable)."""

    model = staticmethod(peft_model)
    embedding_paths = staticmethod(embedding_paths)
    read_files = staticmethod(read_peft_files)
    factories = MODEL_FACTORIES


@pytest.fixture
def oracle() -> PeftOracle:
    return PeftOracle()
