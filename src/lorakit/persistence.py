"""Saving and loading a `PeftModel`'s adapters in PEFT's format (the format lives in `io/`).

Loading validates the file against the freshly injected adapter before any weight is
written, and a failed load removes what it added, so the model is left as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterNameError, ConfigError
from .io import (
    CONFIG_NAME,
    adapter_state_dict,
    embedding_prefixes_to_save,
    load_adapter_files,
    model_keys_for,
    save_adapters_together,
)
from .io.keys import remap_keys
from .layers.base import LoraLayer

if TYPE_CHECKING:
    from .model import PeftModel

MODEL_PREFIX = "base_model.model."
PathLike = str | os.PathLike[str]


def adapter_tensors(
    model: PeftModel,
    selected_adapters: Sequence[str] | None = None,
    save_embedding_layers: bool | Literal["auto"] = "auto",
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter name -> (file key -> tensor): what `save_adapters` writes for each adapter.

    The tensors are `state_dict`'s own (default: the model's `state_dict()`), so a caller can
    tell which of them the files need, e.g. to gather only those from a sharded model.
    """
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    model._check_exist(names)
    state = model.state_dict() if state_dict is None else state_dict
    return adapter_tensors_of(
        model.get_base_model(), model.peft_config, names, save_embedding_layers, state, MODEL_PREFIX
    )


def adapter_tensors_of(
    base: nn.Module,
    configs: Mapping[str, LoraConfig],
    names: Sequence[str],
    save_embedding_layers: bool | Literal["auto"],
    state: Mapping[str, torch.Tensor],
    key_prefix: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """`adapter_tensors` for any model holding lorakit adapters in `base`.

    `state`'s keys are `key_prefix` + paths in `base`: `base_model.model.` for a `PeftModel`,
    "" for a model changed by `inject_adapter_in_model`.
    """
    embedding_paths = _embedding_paths(base, key_prefix)
    selected: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        config = configs[name]
        # As in PEFT, trainable tokens exist to keep the file small: "auto" then saves the
        # embeddings only for a resized vocabulary, never because an embedding is targeted.
        uses_tokens = config.trainable_token_indices is not None
        is_auto_with_tokens = uses_tokens and save_embedding_layers == "auto"
        prefixes = embedding_prefixes_to_save(
            save_embedding_layers,
            target_modules=None if is_auto_with_tokens else config.target_modules,
            embedding_paths=embedding_paths,
            model_state_keys=state.keys(),
            is_vocab_resized=_is_vocab_resized(base, config),
        )
        selected[name] = adapter_state_dict(
            state, name, bias=config.bias, embedding_prefixes=prefixes
        )
    return selected


def save_adapters(
    model: PeftModel,
    save_directory: PathLike,
    selected_adapters: Sequence[str] | None = None,
    save_embedding_layers: bool | Literal["auto"] = "auto",
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    safe_serialization: bool = True,
) -> None:
    """Write each selected adapter: "default" at the top of the folder, others in subfolders.

    `state_dict` replaces the model's own `state_dict()` as the source of the tensors (PEFT's
    `save_pretrained(state_dict=...)`: e.g. full tensors gathered from a sharded model). All
    selected adapters are written as one atomic save: every file is on disk before any
    replaces an old one. `safe_serialization=False` writes `adapter_model.bin` (`torch.save`)
    instead of `adapter_model.safetensors`.
    """
    selected = adapter_tensors(model, selected_adapters, save_embedding_layers, state_dict)
    contents = {
        name: (tensors, model.peft_config[name].to_dict()) for name, tensors in selected.items()
    }
    save_adapters_together(save_directory, contents, safe_serialization=safe_serialization)


def load_adapter_into(
    model: PeftModel,
    model_id: PathLike,
    adapter_name: str,
    is_trainable: bool = False,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    config: LoraConfig | None = None,
    inject: bool = True,
    torch_device: str | torch.device | None = None,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
    key_mapping: Mapping[str, str] | None = None,
) -> None:
    """Read an adapter folder into `model` under `adapter_name` (injecting it unless told not).

    The file is read onto `torch_device` (default: CPU); each tensor then goes to its layer's
    device and adapter dtype. With `low_cpu_mem_usage`, the injected tensors are meta
    placeholders and the file's tensors take their place, so no second copy is allocated.
    `key_mapping` renames the file's keys first (`remap_keys`); None means the base's
    `_checkpoint_conversion_mapping`, as in PEFT. A config that sets a feature lorakit does
    not implement raises before the model is touched.
    """
    if inject and adapter_name in model.peft_config:
        raise AdapterNameError(
            f"Adapter {adapter_name!r} is already loaded; choose another adapter_name."
        )
    tensors, config_dict = load_adapter_files(
        model_id,
        subfolder=subfolder,
        allow_pickle=allow_pickle,
        device="cpu" if torch_device is None else torch_device,
    )
    if config is None:
        config = config_from_file(config_dict, is_trainable, model_id)
    if key_mapping is None:
        key_mapping = getattr(model.get_base_model(), "_checkpoint_conversion_mapping", None)
    if key_mapping:
        tensors = remap_keys(tensors, key_mapping)
    if inject:
        model.add_adapter(
            adapter_name,
            config,
            low_cpu_mem_usage,
            init_weights=False,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
    try:
        state = model.state_dict(keep_vars=True)
        mapped = model_keys_for(tensors, adapter_name, state, source=str(model_id))
        with torch.no_grad():
            for key, tensor in mapped.items():
                _load_tensor(model, key, state[key], tensor)
    except BaseException:
        if inject:
            model.delete_adapter(adapter_name)
        raise
    model._refresh_trainable()


def _load_tensor(model: nn.Module, key: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy `tensor` into `target`, or put it in place of a meta `target` (no copy made)."""
    if not target.is_meta:
        target.copy_(tensor)
        return
    module_path, _, tensor_name = key.rpartition(".")
    device = _layer_device(model, module_path)
    value = tensor.to(device=device, dtype=target.dtype)  # the file's tensor itself if it fits
    module = model.get_submodule(module_path)
    module._parameters[tensor_name] = nn.Parameter(value, requires_grad=target.requires_grad)


def _layer_device(model: nn.Module, module_path: str) -> torch.device:
    """The device of the base layer of the LoRA layer that holds `module_path`."""
    parts = module_path.split(".")
    for end in range(len(parts), 0, -1):
        module = model.get_submodule(".".join(parts[:end]))
        if isinstance(module, LoraLayer):
            return module.base_dtype_and_device()[1]
    raise AssertionError(f"meta tensor {module_path!r} outside a LoRA layer")


def config_from_file(
    config_dict: dict[str, Any], is_trainable: bool, source: PathLike | None = None
) -> LoraConfig:
    """The adapter's config as saved, in inference mode unless it is loaded for training.

    Raises:
        ConfigError: The config sets a field lorakit does not implement (e.g. aLoRA);
            the message names the field and `source`'s adapter_config.json.
    """
    try:
        config = LoraConfig.from_dict(config_dict)
    except ConfigError as error:
        if source is None:
            raise
        raise ConfigError(f"{Path(source) / CONFIG_NAME}: {error}") from None
    config.inference_mode = not is_trainable
    return config


def _embedding_paths(base: nn.Module, key_prefix: str) -> list[str]:
    """State-dict paths (`key_prefix` + path) of the base's input and output embeddings."""
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        method = getattr(base, getter, None)
        module = method() if callable(method) else None
        if isinstance(module, nn.Module):
            wanted.append(module)
    paths = []
    for module in wanted:
        for key, candidate in base.named_modules():
            if candidate is module or getattr(candidate, "base_layer", None) is module:
                paths.append(key_prefix + key)
                break
    return paths


def _is_vocab_resized(base: nn.Module, config: LoraConfig) -> bool:
    """Whether the input embedding has another row count than the base's saved config says."""
    source = config.base_model_name_or_path
    if not source or not (Path(source) / "config.json").is_file():
        return False
    vocab_size = json.loads((Path(source) / "config.json").read_text()).get("vocab_size")
    get_embeddings = getattr(base, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = getattr(getattr(embeddings, "base_layer", None), "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and vocab_size is not None
        and weight.shape[0] != vocab_size
    )
