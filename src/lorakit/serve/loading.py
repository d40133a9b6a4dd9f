"""The engine's own copy of the base: loaded from a folder or copied, its task, its limits."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ServeError
from lorakit.extras import import_optional
from lorakit.layers.frozen import use_frozen_linears
from lorakit.serve.adapters import TASK_CAUSAL_LM, TASK_SEQ_CLS

SERVED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PURPOSE = "lorakit.serve.Engine"


def task_of(class_name: str) -> str:
    """ "causal_lm" or "seq_cls" for a transformers model class name.

    Raises:
        ServeError: The class is neither a causal LM nor a sequence classifier.
    """
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return TASK_CAUSAL_LM
    if class_name.endswith("ForSequenceClassification"):
        return TASK_SEQ_CLS
    raise ServeError(
        f"The engine serves causal language models (…ForCausalLM, …LMHeadModel) and sequence "
        f"classifiers (…ForSequenceClassification); the base is a {class_name}. Fix: load the "
        "base with AutoModelForCausalLM or AutoModelForSequenceClassification."
    )


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SERVED_DTYPES:
        raise ServeError(f"dtype={dtype!r} is not served; use one of {SERVED_DTYPES}.")


def _quantize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    from lorakit.quant import QuantConfig, quantize_model_linears

    return quantize_model_linears(
        model, QuantConfig(compute_dtype=dtype), skip_modules=("lm_head",)
    )


def _model_class(transformers: Any, folder: Path) -> tuple[Any, str]:
    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = config.architectures or []
    if not architectures:
        raise ServeError(
            f"{folder}/config.json names no architectures, so the engine cannot tell a causal "
            "LM from a classifier. Fix: save the base with save_pretrained, or pass the model."
        )
    task = task_of(architectures[0])
    auto = (
        "AutoModelForCausalLM" if task == TASK_CAUSAL_LM else "AutoModelForSequenceClassification"
    )
    return getattr(transformers, auto), task


def load_base(
    base: str | os.PathLike[str] | nn.Module,
    tokenizer: Any,
    dtype: torch.dtype,
    load_in_4bit: bool,
    device: torch.device,
) -> tuple[nn.Module, Any, str]:
    """(the engine's model in eval mode, its tokenizer or None, its task).

    A folder is loaded (4-bit through `lorakit.quant.load_quantized`, which never holds the
    full-precision weights); a model is deep-copied, so the caller's is not changed.
    """
    _check_dtype(dtype)
    transformers = import_optional("transformers", "serve", PURPOSE)
    if isinstance(base, nn.Module):
        task = task_of(type(base).__name__)
        model = copy.deepcopy(base).to(dtype)
        if load_in_4bit:
            model = _quantize(model, dtype)
    else:
        folder = Path(base)
        if not folder.is_dir():
            raise ServeError(
                f"Base folder {folder} does not exist. Fix: pass the folder save_pretrained "
                "wrote, or a transformers model."
            )
        model_class, task = _model_class(transformers, folder)
        if load_in_4bit:
            from lorakit.quant import load_quantized

            model = load_quantized(folder, model_class=model_class, torch_dtype=dtype)
        else:
            model = model_class.from_pretrained(folder, dtype=dtype)
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    use_frozen_linears(model)
    return model, tokenizer, task


def text_config(model: nn.Module) -> Any:
    """The decoder's config (the model's own for plain causal LMs)."""
    config: Any = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Tokens that end a completion: the generation config's, else the tokenizer's."""
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(text_config(model), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, if it says."""
    config = text_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
