"""The adapters of a training checkpoint folder: found, checked, and put back in place.

A checkpoint written by `PeftModel.save_pretrained` holds PEFT's layout: the "default"
adapter at the top of the folder, any other adapter in `<folder>/<name>/`. Resuming puts the
saved weights back into the model's existing adapters (same tensors, so an optimizer built on
them stays valid); everything is checked before the first tensor is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import LoraConfig
from ..constants import DEFAULT_ADAPTER_NAME
from ..errors import AdapterStateError
from ..functional import get_peft_model_state_dict, set_peft_model_state_dict
from ..io.atomic import is_temp_name
from ..io.files import CONFIG_NAME, load_adapter_files
from ..model import PeftModel

# The config fields that decide what an adapter computes: a checkpoint whose values differ
# from the model's would resume into other math than it was trained with.
COMPUTING_FIELDS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "fan_in_fan_out",
    "bias",
)


def saved_adapter_folders(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Adapter name -> folder, for the adapters `save_pretrained` wrote into `folder`."""
    root = Path(folder)
    found: dict[str, Path] = {}
    if (root / CONFIG_NAME).is_file():
        found[DEFAULT_ADAPTER_NAME] = root
    for child in sorted(root.iterdir()):
        if child.is_dir() and not is_temp_name(child.name) and (child / CONFIG_NAME).is_file():
            found[child.name] = child
    return found


def load_checkpoint_adapters(model: PeftModel, folder: str | os.PathLike[str]) -> list[str]:
    """Put the adapter weights saved in a checkpoint folder back into `model`, in place.

    Every adapter of the model must be in the folder, with the same config fields that decide
    its output (`COMPUTING_FIELDS`), the same tensors and shapes; nothing is written unless
    all of them are.

    Args:
        model: The `PeftModel` being trained, built as for the run that wrote `folder`.
        folder: A checkpoint folder (or any folder `save_pretrained` wrote).

    Returns:
        The names of the adapters loaded.

    Raises:
        AdapterStateError: The folder holds other adapters than the model, or an adapter's
            config, tensor names or shapes differ from the model's (each difference named).
        AdapterFileError: A file is missing or unreadable (from `lorakit.io`).
    """
    saved = saved_adapter_folders(folder)
    if set(saved) != set(model.peft_config):
        raise AdapterStateError(
            f"Checkpoint {folder} holds adapters {sorted(saved)}, the model "
            f"{sorted(model.peft_config)}. Fix: resume with the model built as for the run "
            "that wrote the checkpoint (the same adapters under the same names)."
        )
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for name, adapter_folder in saved.items():
        tensors, config_dict = load_adapter_files(adapter_folder)
        problems = _config_differences(model.peft_config[name], config_dict)
        problems += _tensor_differences(
            get_peft_model_state_dict(model, adapter_name=name), tensors
        )
        if problems:
            raise AdapterStateError(
                f"Adapter {name!r} in {adapter_folder} does not fit the model: "
                + "; ".join(problems)
                + ". Fix: resume with the model built with the config of the run that wrote "
                "the checkpoint."
            )
        loaded[name] = tensors
    for name, tensors in loaded.items():
        set_peft_model_state_dict(model, tensors, name)
    return list(loaded)


def _config_differences(config: LoraConfig, saved: Mapping[str, Any]) -> list[str]:
    """`field: model value != saved value`, for each computing field that differs."""
    ours = config.to_dict()
    theirs = LoraConfig.from_dict(saved).to_dict()
    return [
        f"{field} is {ours[field]!r} in the model, {theirs[field]!r} in the checkpoint"
        for field in COMPUTING_FIELDS
        if _comparable(ours[field]) != _comparable(theirs[field])
    ]


def _comparable(value: object) -> object:
    """Names given as a list, tuple or set compare as sets (the file stores them as a list)."""
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    return value


def _tensor_differences(
    expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]
) -> list[str]:
    """Missing, unexpected and differently shaped tensors of the checkpoint, named."""
    problems = []
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensors missing from the checkpoint (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model lacks (e.g. {unexpected[0]})")
    problems += [
        f"{key} has shape {tuple(saved[key].shape)}, the model's {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(saved))
        if saved[key].shape != expected[key].shape
    ]
    return problems
