"""diffusers' LoRA file: what a pipeline's `load_lora_weights` reads, written from lorakit.

diffusers keeps the LoRA of a whole pipeline in one `pytorch_lora_weights.safetensors`: each
tensor under `<component>.<module path>.lora_A.weight` / `.lora_B.weight` (`unet`,
`transformer`, `text_encoder`), and, in the safetensors header under `lora_adapter_metadata`,
each component's `LoraConfig` fields with the same `<component>.` prefix. Without that
metadata diffusers takes lora_alpha = r (scale 1), so an adapter trained with another alpha
would load at the wrong scale; lorakit always writes it, describing each adapted module
exactly: its path in `target_modules`, its rank and alpha (the most common ones in `r` and
`lora_alpha`, the others in `rank_pattern` / `alpha_pattern` anchored with `^`).

diffusers itself is not imported: the file is plain safetensors.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..config import LoraConfig
from ..constants import DEFAULT_ADAPTER_NAME
from ..errors import AdapterStateError, ConfigError, UnsupportedOptionError
from ..functional import PEFT_CONFIG_ATTRIBUTE, get_peft_model_state_dict
from ..inject import iter_wrappers
from ..io import atomic
from ..io.files import SAFETENSORS_METADATA
from ..layers.base import LoraLayer
from ..model import PeftModel
from ..persistence import MODEL_PREFIX

PathLike = str | os.PathLike[str]

# diffusers' names (diffusers.loaders.lora_base): the file a pipeline looks for first, and the
# safetensors header entry holding the adapters' LoraConfig fields as JSON.
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# Every key of diffusers' LoRA format names a LoRA tensor (its loader refuses other keys).
LORA_KEY_MARK = "lora_"


def diffusers_lora_state_dict(
    model: nn.Module, prefix: str, adapter_name: str = DEFAULT_ADAPTER_NAME
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One component's adapter in diffusers' layout: prefixed tensors and prefixed metadata.

    Args:
        model: A lorakit `PeftModel` around a diffusers model (or text encoder), or a model
            changed by `lorakit.inject_adapter_in_model`.
        prefix: The pipeline component it is: "unet", "transformer" or "text_encoder".
        adapter_name: The adapter to take.

    Returns:
        `<prefix>.<module path>.lora_A.weight`-style key -> tensor (the model's own tensors),
        and `<prefix>.<LoraConfig field>` -> value for the file's metadata.

    Raises:
        AdapterNameError: No adapter `adapter_name`.
        AdapterStateError: `model` holds no lorakit adapters.
        ConfigError: The adapter has tensors diffusers' format cannot hold (`bias` other than
            "none", `modules_to_save`, whole embedding weights).
    """
    tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
    others = sorted(key for key in tensors if LORA_KEY_MARK not in key)
    if others:
        raise ConfigError(
            f"Adapter {adapter_name!r} holds tensors that are not LoRA factors ({others[:3]}, "
            f"{len(others)} in all), which diffusers' LoRA format cannot hold (its loader "
            "refuses them). They come from bias='all'/'lora_only', modules_to_save or a resized "
            "embedding. Fix: train the adapter with bias='none' and no modules_to_save, or save "
            "it with save_pretrained (PEFT's format) instead."
        )
    config = getattr(model, PEFT_CONFIG_ATTRIBUTE)[adapter_name]
    assert isinstance(config, LoraConfig)  # get_peft_model_state_dict found the adapter
    metadata = _exact_config(_lora_layers(model), adapter_name, config.use_rslora)
    metadata["lora_dropout"] = config.lora_dropout
    return (
        {f"{prefix}.{key.removeprefix(MODEL_PREFIX)}": value for key, value in tensors.items()},
        {f"{prefix}.{field}": value for field, value in metadata.items()},
    )


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Path (in the user's model, as in the file keys) -> LoRA layer."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {path: layer for path, layer in iter_wrappers(base) if isinstance(layer, LoraLayer)}


def _exact_config(
    layers: Mapping[str, LoraLayer], adapter_name: str, use_rslora: bool
) -> dict[str, Any]:
    """peft `LoraConfig` fields that adapt exactly these layers with their ranks and alphas.

    diffusers builds a `peft.LoraConfig(**fields)` from them and injects by it. Module paths
    rather than the config's own targets, so "all-linear", lorakit's default targets or
    `layers_to_transform` need no support on peft's side; `^` anchors a pattern at the path's
    start, so it cannot also match a deeper module whose path ends the same way.
    """
    held = {path: layer for path, layer in layers.items() if adapter_name in layer.r}
    if not held:
        raise AdapterStateError(
            f"Adapter {adapter_name!r} adapts no module of this model, so there is nothing to "
            "save. Fix: pass the model that holds the adapter."
        )
    ranks = {path: layer.r[adapter_name] for path, layer in held.items()}
    alphas = {path: layer.lora_alpha[adapter_name] for path, layer in held.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "target_modules": sorted(held),
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {_anchored(path): value for path, value in ranks.items() if value != r},
        "alpha_pattern": {
            _anchored(path): value for path, value in alphas.items() if value != lora_alpha
        },
        "use_rslora": use_rslora,
        "bias": "none",
    }


def _anchored(path: str) -> str:
    return "^" + re.escape(path)


def save_lora_weights(
    save_directory: PathLike,
    *,
    unet: nn.Module | None = None,
    transformer: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    weight_name: str = LORA_WEIGHT_NAME_SAFE,
    is_main_process: bool = True,
) -> Path | None:
    """Write adapters as the LoRA file a diffusers pipeline's `load_lora_weights` reads.

    The file holds each given component's adapter `adapter_name` with its ranks and alphas
    (see the module docstring), written atomically. `pipeline.load_lora_weights(folder)`
    then gives the pipeline's models the same outputs as the lorakit models they came from.

    Args:
        save_directory: The folder to write into; created if missing.
        unet: The pipeline's UNet (e.g. `UNet2DConditionModel`) holding lorakit adapters.
        transformer: The pipeline's diffusion transformer (SD3, Flux, ...) holding adapters.
        text_encoder: The pipeline's text encoder (e.g. `CLIPTextModel`) holding adapters.
        adapter_name: The adapter to save from each component.
        weight_name: The file name; diffusers looks for the default first.
        is_main_process: False writes nothing (the other processes of a distributed run).

    Returns:
        The file written, or None when `is_main_process` is False.

    Raises:
        UnsupportedOptionError: No component given, or `weight_name` is not a `.safetensors`
            name (a pickle cannot carry the alphas: diffusers would load at scale 1).
        AdapterNameError, AdapterStateError, ConfigError: As `diffusers_lora_state_dict`.
    """
    components = {
        name: model
        for name, model in (
            ("unet", unet),
            ("transformer", transformer),
            ("text_encoder", text_encoder),
        )
        if model is not None
    }
    if not components:
        raise UnsupportedOptionError(
            "save_lora_weights() got no model. Fix: pass unet=..., transformer=... and/or "
            "text_encoder=..., each holding lorakit adapters."
        )
    if not weight_name.endswith(".safetensors"):
        raise UnsupportedOptionError(
            f"weight_name={weight_name!r}: lorakit writes diffusers' LoRA file as safetensors "
            "only, whose header carries lora_alpha (diffusers would load a pickle at scale 1). "
            f"Fix: a name ending in .safetensors, e.g. {LORA_WEIGHT_NAME_SAFE!r}."
        )
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, Any] = {}
    for prefix, model in components.items():
        component_tensors, component_metadata = diffusers_lora_state_dict(
            model, prefix, adapter_name
        )
        tensors.update(component_tensors)
        metadata.update(component_metadata)
    if not is_main_process:
        return None
    header = {
        **SAFETENSORS_METADATA,
        LORA_ADAPTER_METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True),
    }
    writable = {key: value.detach().contiguous() for key, value in tensors.items()}
    return atomic.write_file(
        Path(save_directory) / weight_name,
        lambda temp: safetensors.torch.save_file(writable, str(temp), metadata=header),
    )
