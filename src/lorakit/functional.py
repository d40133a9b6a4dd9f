"""PEFT's functional API: adapters on a plain model, and adapter state dicts in and out.

`inject_adapter_in_model` puts LoRA layers into a model without a `PeftModel` around it;
`get_peft_model_state_dict` / `set_peft_model_state_dict` move one adapter's tensors in
PEFT's file keys (no adapter name) for either kind of model; `load_peft_weights` reads an
adapter folder's tensors. The keys themselves are `lorakit.io`'s business.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .config import ConfigSource, LoraConfig
from .constants import DEFAULT_ADAPTER_NAME
from .errors import AdapterNameError, AdapterStateError, ConfigError
from .hub import resolve_adapter_folder
from .inject import apply_injection, iter_wrappers, plan_injection
from .inject.layer_init import apply_layer_init_injection
from .inject.parameters import apply_parameter_injection, plan_parameter_injection
from .inject.replication import layers_replicated
from .inject.trainable import refresh_trainable
from .inject.trainable_tokens import apply_trainable_tokens, plan_trainable_tokens
from .io import AdapterMismatch, AdapterMismatchError, find_mismatches, load_adapter_files
from .io.keys import describe_mismatch, display_name, lora_module_paths, remap_keys
from .keywords import check_load_keywords, split_hub_options
from .layers.init import layer_init_name
from .layers.routing import AdapterRouting
from .model import PeftModel
from .persistence import MODEL_PREFIX, _load_tensor, adapter_tensors_of

logger = logging.getLogger(__name__)

PEFT_CONFIG_ATTRIBUTE = "peft_config"
COMPILED_MODEL_ATTRIBUTE = "_orig_mod"  # torch.compile's wrapper keeps the model here


def inject_adapter_in_model(
    peft_config: ConfigSource,
    model: nn.Module,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    low_cpu_mem_usage: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put LoRA layers for `peft_config` into `model` itself and return it (no `PeftModel`).

    As in PEFT, the base parameters are frozen, the adapter trains (unless the config's
    `inference_mode`), and `model.peft_config` maps the adapter name to its config. The first
    adapter injected is the active one; later ones are added inactive.

    Args:
        peft_config: A lorakit or peft `LoraConfig`, or a dict of its fields.
        model: The model to change in place.
        adapter_name: The new adapter's name.
        low_cpu_mem_usage: Create the adapter tensors on the meta device (nothing allocated);
            load them with `set_peft_model_state_dict(..., low_cpu_mem_usage=True)`.
        state_dict: Adapt the modules that hold LoRA tensors in this PEFT state dict (file or
            model keys) instead of the config's `target_modules`; only its keys are read.

    Returns:
        `model`.

    Raises:
        AdapterNameError: `model` already holds an adapter named `adapter_name`.
        ConfigError: The config is invalid or uses a feature lorakit does not implement.
    """
    if isinstance(model, PeftModel):
        raise AdapterStateError(
            "inject_adapter_in_model() got a PeftModel; it changes plain models. Fix: call "
            f"model.add_adapter({adapter_name!r}, config) on a PeftModel."
        )
    configs: dict[str, LoraConfig] = getattr(model, PEFT_CONFIG_ATTRIBUTE, None) or {}
    if adapter_name in configs:
        raise AdapterNameError(
            f"Adapter {adapter_name!r} is already injected in this model; pick another name."
        )
    config = LoraConfig.from_config(peft_config)
    if state_dict is not None and config.target_parameters:
        raise ConfigError(
            f"inject_adapter_in_model(state_dict=...) with target_parameters="
            f"{config.target_parameters!r}: the state dict's keys cannot say which parameter "
            "each nested wrapper adapts (PEFT refuses this too). Fix: pass state_dict=None."
        )
    if state_dict is not None:
        config = _targets_from_state_dict(config, state_dict)
    with layers_replicated(model, config.layer_replication):  # undone if planning fails
        plan = plan_injection(model, config)
        tokens = plan_trainable_tokens(model, config, plan)
        parameters = plan_parameter_injection(model, config, plan, configs)
    routing = _routing_of(model) or AdapterRouting(active_adapters=(adapter_name,))
    if not configs:
        model.requires_grad_(False)
    if layer_init_name(config.init_lora_weights) and not low_cpu_mem_usage:
        apply_layer_init_injection(model, plan, config, adapter_name, routing)
    else:
        apply_injection(
            model, plan, config, adapter_name, routing, low_cpu_mem_usage=low_cpu_mem_usage
        )
    apply_parameter_injection(
        model, parameters, config, adapter_name, routing, low_cpu_mem_usage=low_cpu_mem_usage
    )
    apply_trainable_tokens(model, tokens, adapter_name, routing)
    configs[adapter_name] = config
    setattr(model, PEFT_CONFIG_ATTRIBUTE, configs)
    refresh_trainable(model, iter_wrappers(model), configs, routing.active_adapters)
    return model


def _targets_from_state_dict(
    config: LoraConfig, state_dict: Mapping[str, torch.Tensor]
) -> LoraConfig:
    """The config with `target_modules` set to the module paths of the state dict's LoRA keys."""
    paths = lora_module_paths(state_dict.keys())
    if not paths:
        raise AdapterStateError(
            "inject_adapter_in_model(state_dict=...) holds no LoRA tensor keys (`...lora_A...`); "
            "pass a PEFT adapter state dict, or state_dict=None to use target_modules."
        )
    if config.target_modules not in (None, paths):
        logger.warning(
            "Injecting into the %d modules the state_dict names instead of target_modules=%r.",
            len(paths),
            config.target_modules,
        )
    return dataclasses.replace(config, target_modules=paths)


def _routing_of(model: nn.Module) -> AdapterRouting | None:
    """The routing object the model's lorakit layers share, if it has any."""
    for _, wrapper in iter_wrappers(model):
        return wrapper.routing
    return None


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's file keys (the adapter name removed): what
    `save_pretrained` writes to `adapter_model.safetensors`.

    Args:
        model: A `PeftModel` or a model changed by `inject_adapter_in_model`.
        state_dict: Read these tensors instead of `model.state_dict()` (same keys).
        adapter_name: The adapter to take.
        unwrap_compiled: `model` is a `torch.compile` wrapper: read the model inside it.
        save_embedding_layers: Also the embedding weights: True, False, or "auto" (when an
            embedding layer is targeted or the vocabulary was resized), as `save_pretrained`.

    Returns:
        File key -> the model's own tensor (no copies).

    Raises:
        AdapterNameError: No adapter `adapter_name`.
        AdapterStateError: `model` holds no lorakit adapters, or is compiled and
            `unwrap_compiled` is False.
    """
    target = _unwrapped(model, unwrap_compiled)
    state = target.state_dict() if state_dict is None else state_dict
    if isinstance(target, PeftModel):
        base, configs, prefix = target.get_base_model(), target.peft_config, MODEL_PREFIX
    else:
        base, configs, prefix = target, _injected_configs(target), ""
    if adapter_name not in configs:
        raise AdapterNameError(
            f"Adapter {adapter_name!r} does not exist; existing adapters: {list(configs)}."
        )
    return adapter_tensors_of(base, configs, [adapter_name], save_embedding_layers, state, prefix)[
        adapter_name
    ]


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Load PEFT-keyed tensors (as `get_peft_model_state_dict` gives) into an existing adapter.

    The keys may carry `base_model.model.` or not, whichever kind of model this is. Nothing
    is written unless every tensor that matches a model key has that key's shape.

    Args:
        model: A `PeftModel` or a model changed by `inject_adapter_in_model`, already holding
            the adapter `adapter_name`.
        peft_model_state_dict: File key -> tensor.
        adapter_name: The adapter to fill (any name: the keys hold none).
        ignore_mismatched_sizes: Skip tensors whose shape differs from the model's (they keep
            their values and are listed in `missing_keys`) instead of raising.
        low_cpu_mem_usage: The adapter was created on the meta device
            (`low_cpu_mem_usage=True` when injecting): its tensors are replaced by the given
            ones, moved to their layer's device and dtype, without a copy when they fit.

    Returns:
        torch's `_IncompatibleKeys`: `missing_keys`, every model key not loaded (base weights
        included, as in PEFT), and `unexpected_keys`, the given keys that fit no tensor
        (with or without `base_model.model.` as the model's own keys).

    Raises:
        AdapterMismatchError: A shape differs and `ignore_mismatched_sizes` is False.
        AdapterStateError: The adapter's tensors are on the meta device and
            `low_cpu_mem_usage` is False.
    """
    target = _unwrapped(model, unwrap_compiled=True)
    model_state = target.state_dict(keep_vars=True)
    mapped, mismatch = find_mismatches(peft_model_state_dict, adapter_name, model_state)
    if mismatch.shapes and not ignore_mismatched_sizes:
        shapes_only = AdapterMismatch(shapes=mismatch.shapes)
        raise AdapterMismatchError(describe_mismatch(shapes_only, adapter_name, None), shapes_only)
    on_meta = [key for key in mapped if model_state[key].is_meta]
    if on_meta and not low_cpu_mem_usage:
        raise AdapterStateError(
            f"{len(on_meta)} tensors of adapter {adapter_name!r} are on the meta device (e.g. "
            f"{on_meta[0]}), so there is nothing to copy into. Fix: pass low_cpu_mem_usage=True."
        )
    with torch.no_grad():
        for key, tensor in mapped.items():
            _load_tensor(target, key, model_state[key], tensor)
    if mismatch.shapes:
        logger.warning(
            "Skipped %d tensors whose shapes do not fit (ignore_mismatched_sizes=True): %s",
            len(mismatch.shapes),
            "; ".join(shape.describe() for shape in mismatch.shapes),
        )
    if mismatch.missing:
        logger.warning(
            "Adapter %r has %d tensors with no weights in the state dict; see missing_keys.",
            adapter_name,
            len(mismatch.missing),
        )
    unexpected_names = set(mismatch.unexpected)
    has_prefix = any(key.startswith(MODEL_PREFIX) for key in model_state)
    unexpected = [
        (MODEL_PREFIX if has_prefix else "") + key.removeprefix(MODEL_PREFIX)
        for key in peft_model_state_dict
        if display_name(key) in unexpected_names
    ]
    missing = [key for key in model_state if key not in mapped]
    return _IncompatibleKeys(missing, unexpected)


def load_peft_weights(
    model_id: str | os.PathLike[str],
    device: str | torch.device | None = None,
    key_mapping: Mapping[str, str] | None = None,
    *,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """An adapter folder's tensors, under their file keys.

    Args:
        model_id: The adapter folder (with `adapter_config.json`) or a Hub repo id, read
            as `PeftModel.load_adapter` reads it.
        device: Where to put the tensors; None means this machine's accelerator if it has
            one, else the CPU (as in PEFT).
        key_mapping: PEFT's regex -> replacement renaming of the keys (applied without the
            `base_model.model.` prefix; the first pattern that matches a key wins).
        allow_pickle: Read `adapter_model.bin` when there is no safetensors file.
        subfolder: Read `model_id/subfolder` instead.
        hf_hub_download_kwargs: `hf_hub_download`'s options for a Hub repo id (`revision`,
            `token`, ...).

    Raises:
        UnsupportedOptionError: A keyword lorakit does not implement, or a Hub option
            given with a local folder.
        AdapterNotFoundError, PickleAdapterRefusedError, CorruptAdapterFileError: As
            `PeftModel.load_adapter`.
    """
    hub_options, other_options = split_hub_options(hf_hub_download_kwargs)
    check_load_keywords("load_peft_weights", other_options)
    if device is None:
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        device = "cpu" if accelerator is None else accelerator.type
    folder = resolve_adapter_folder("load_peft_weights", model_id, subfolder, hub_options)
    tensors, _ = load_adapter_files(folder, allow_pickle=allow_pickle, device=device)
    return remap_keys(tensors, key_mapping) if key_mapping else tensors


def _unwrapped(model: nn.Module, unwrap_compiled: bool) -> nn.Module:
    """The model inside a `torch.compile` wrapper when asked for; a wrapper otherwise refused."""
    inner = getattr(model, COMPILED_MODEL_ATTRIBUTE, None)
    if not isinstance(inner, nn.Module):
        return model
    if not unwrap_compiled:
        raise AdapterStateError(
            "get_peft_model_state_dict() got a torch.compile'd model, whose state-dict keys "
            "carry its wrapper's '_orig_mod.' prefix. Fix: pass unwrap_compiled=True."
        )
    return inner


def _injected_configs(model: nn.Module) -> dict[str, LoraConfig]:
    configs = getattr(model, PEFT_CONFIG_ATTRIBUTE, None)
    if not isinstance(configs, dict) or _routing_of(model) is None:
        raise AdapterStateError(
            f"{type(model).__name__} holds no lorakit adapters. Fix: pass a PeftModel, or a "
            "model changed by lorakit.inject_adapter_in_model."
        )
    return configs
