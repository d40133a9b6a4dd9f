"""Saving a PiSSA / OLoRA / CorDA adapter as a plain LoRA for the ORIGINAL base (PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`).

PiSSA, OLoRA and CorDA start from W_res = W - s·B0·A0, so the trained adapter only makes sense on
the residual base. Given the adapter saved right after initialisation (A0, B0), the trained
model W_res + s·B·A equals W + s·(B·A - B0·A0): a rank-2r LoRA with A' = [A ; A0] and
B' = [B | -B0] (`ops.init_svd.mutated_init_delta`) at the same scale, so r and lora_alpha
double (lora_alpha × √2 with rsLoRA) and the file loads on W as an ordinary adapter.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from .config import LoraConfig
from .errors import ConfigError, UnsupportedOptionError
from .io import load_adapter_files, save_adapter_files
from .io.errors import AdapterMismatch, AdapterMismatchError, ShapeMismatch
from .layers.init import BASE_CHANGING_INITS, layer_init_name
from .ops.init_svd import mutated_init_delta
from .persistence import adapter_tensors

if TYPE_CHECKING:
    from .model import PeftModel

LORA_A_PART = ".lora_A."
LORA_B_PART = ".lora_B."


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r plain LoRA: same scale, `init_lora_weights=True`."""
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    return dataclasses.replace(
        config,
        init_lora_weights=True,
        corda_config=None,  # it configured the initialisation only
        r=2 * config.r,
        lora_alpha=alpha_factor * config.lora_alpha,
        rank_pattern={key: 2 * rank for key, rank in config.rank_pattern.items()},
        alpha_pattern={key: 2 * alpha for key, alpha in config.alpha_pattern.items()},
    )


def _check_convertible(config: LoraConfig, adapter_name: str) -> None:
    option = config.init_lora_weights
    if layer_init_name(option) not in BASE_CHANGING_INITS:
        raise UnsupportedOptionError(
            f"save_pretrained(path_initial_model_for_weight_conversion=...) converts an adapter "
            f"initialised with 'pissa', 'pissa_niter_N', 'olora' or 'corda'; {adapter_name!r} has "
            f"init_lora_weights={option!r}, whose base was not changed. Fix: save it without "
            "path_initial_model_for_weight_conversion."
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            f"save_pretrained(path_initial_model_for_weight_conversion=...): {adapter_name!r} "
            "uses use_rslora with rank_pattern/alpha_pattern, whose per-module scales one "
            "doubled lora_alpha cannot keep. Fix: train without rsLoRA or without the patterns."
        )


def _delta_tensors(
    trained: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The trained file's tensors with each (lora_A, lora_B) pair made [A ; A0], [B | -B0]."""
    factor_keys = [key for key in trained if LORA_A_PART in key or LORA_B_PART in key]
    mismatch = AdapterMismatch(
        unexpected=sorted(set(initial) - set(factor_keys)),
        missing=sorted(set(factor_keys) - set(initial)),
        shapes=[
            ShapeMismatch(key, tuple(initial[key].shape), tuple(trained[key].shape))
            for key in sorted(set(factor_keys) & set(initial))
            if trained[key].shape != initial[key].shape
        ],
    )
    if mismatch:
        raise AdapterMismatchError(
            "path_initial_model_for_weight_conversion does not hold this adapter's initial "
            f"A and B (unexpected {mismatch.unexpected[:3]}, missing {mismatch.missing[:3]}, "
            f"other shapes {mismatch.shapes[:3]}). Fix: pass the folder saved right after "
            "get_peft_model, before training.",
            mismatch,
        )
    converted = dict(trained)
    for key_A in (key for key in factor_keys if LORA_A_PART in key):
        key_B = key_A.replace(LORA_A_PART, LORA_B_PART)
        A0, B0 = (initial[key].to(trained[key].device) for key in (key_A, key_B))
        converted[key_A], converted[key_B] = mutated_init_delta(
            trained[key_A], trained[key_B], A0, B0
        )
    return converted


def converted_contents(
    model: PeftModel,
    path_initial_model_for_weight_conversion: str | os.PathLike[str],
    selected_adapters: Sequence[str] | None,
    save_embedding_layers: bool | Literal["auto"],
    state_dict: Mapping[str, torch.Tensor] | None,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Adapter name -> (tensors, config dict) of the converted adapter, ready to save.

    As PEFT does, the initial folder's config is rewritten with `init_lora_weights=True`
    (its tensors unchanged, as safetensors: only they are read from it).

    Raises:
        UnsupportedOptionError: more than one adapter is selected, or the adapter's init
            did not change the base.
        ConfigError: rsLoRA with rank_pattern / alpha_pattern.
        AdapterMismatchError: the initial folder's A and B do not match the adapter's.
    """
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    if len(names) != 1:
        raise UnsupportedOptionError(
            f"save_pretrained(path_initial_model_for_weight_conversion=...) converts one "
            f"adapter against one initial folder; {names} are selected. Fix: pass "
            "selected_adapters=[name]."
        )
    (adapter_name,) = names
    config = model.peft_config[adapter_name]
    _check_convertible(config, adapter_name)
    trained = adapter_tensors(model, names, save_embedding_layers, state_dict)[adapter_name]
    initial, initial_config = load_adapter_files(path_initial_model_for_weight_conversion)
    tensors = _delta_tensors(trained, initial)
    save_adapter_files(
        path_initial_model_for_weight_conversion,
        "default",
        initial,
        {**initial_config, "init_lora_weights": True},
    )
    return {adapter_name: (tensors, converted_config(config).to_dict())}
