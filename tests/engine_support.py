"""Helpers for the serving engine's tests: a byte-level tokenizer, adapters on disk, references.

The tokenizer maps each UTF-8 byte to one token (ids 0-255, GPT-2's byte alphabet, no merges),
plus <eos> (256) and <pad> (257), so a tiny model built with `VOCAB_SIZE` decodes any ids to
text and multi-byte characters span several tokens.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import lorakit

VOCAB_SIZE = 258
EOS_ID = 256
PAD_ID = 257
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _byte_char(byte: int) -> str:
    """GPT-2's printable character for a byte (printable Latin-1 bytes stand for themselves)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if byte in printable:
        return chr(byte)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(byte))


def byte_tokenizer() -> Any:
    """A transformers fast tokenizer: one token per byte, <eos> and <pad>, a chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # GPT-2's printable stand-in of each byte
    vocab = {_byte_char(byte): byte for byte in range(256)}
    assert set(vocab) == set(alphabet)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.add_special_tokens({"eos_token": "<eos>", "pad_token": "<pad>"})
    assert (fast.eos_token_id, fast.pad_token_id) == (EOS_ID, PAD_ID)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def byte_llama() -> torch.nn.Module:
    """The tiny Llama of tiny_models with the byte tokenizer's vocabulary and <eos>."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = EOS_ID
    return model


def save_adapter(
    base_factory: Callable[[], torch.nn.Module], folder: Path, seed: int, **config: Any
) -> Path:
    """Save a lorakit adapter with random A and B (init_lora_weights=False) on a fresh base."""
    torch.manual_seed(seed)
    lora_config = lorakit.LoraConfig(init_lora_weights=False, **config)
    model = lorakit.get_peft_model(base_factory(), lora_config)
    with torch.no_grad():  # larger B than the default init: adapters change greedy tokens
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


def hand_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Module path -> s · B A in float64, from the adapter's files (s from its config)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    deltas = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = A.shape[0]
        alpha = config["lora_alpha"]
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if path == pattern or path.endswith("." + pattern):
                alpha = value
        scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r
        deltas[path] = scale * (B.double() @ A.double())
    return deltas


def merged_by_hand(
    base: torch.nn.Module, blend: Mapping[Path, float], transpose: bool = False
) -> torch.nn.Module:
    """A copy of `base` with Σ wᵢ · sᵢ BᵢAᵢ added to its weights (float64 sum, then cast)."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    total: dict[str, torch.Tensor] = {}
    for folder, weight in blend.items():
        for path, delta in hand_deltas(folder).items():
            total[path] = total.get(path, 0) + weight * delta
    with torch.no_grad():
        for path, delta in total.items():
            parameter = modules[path].weight
            update = delta.t() if transpose else delta
            parameter.copy_((parameter.double() + update).to(parameter.dtype))
    return model.eval()


def greedy_reference(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy `generate` of `prompt`, cut after the first end-of-sequence token."""
    output = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=PAD_ID
    )
    tokens = output[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def reference_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> list[float]:
    """Log-probabilities of `tokens` following `prompt`, teacher-forced in one forward."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i, token]) for i, token in enumerate(tokens)]
