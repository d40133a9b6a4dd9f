"""Reading and writing PEFT's adapter files: `adapter_config.json` + `adapter_model.safetensors`.

Layout (PEFT's): the adapter named `"default"` lives at the top of the save folder, any other
adapter in `<folder>/<adapter_name>/`. Writes go through `lorakit.io.atomic.replace_files`:
every file of a save is staged and flushed to disk before any replaces the old one, so a
process killed mid-save leaves the previous adapter intact. Reads accept only safetensors
unless the caller opts in to pickles, and turn every parse failure into an error naming the
file and the fix.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.io.atomic import is_temp_name, replace_files
from lorakit.io.errors import (
    AdapterConfigError,
    AdapterDeviceError,
    AdapterNotFoundError,
    CorruptAdapterFileError,
    PickleAdapterRefusedError,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
DEFAULT_ADAPTER_NAME = "default"
PEFT_TYPE_LORA = "LORA"
# PEFT marks its safetensors files as PyTorch tensors; other readers (vLLM, TGI) expect it.
SAFETENSORS_METADATA = {"format": "pt"}

PathLike = str | os.PathLike[str]
# One adapter's contents: file key -> tensor, and the config's `to_dict()`.
AdapterContents = tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]


def adapter_directory(directory: PathLike, adapter_name: str) -> Path:
    """Where PEFT's layout puts an adapter: `directory` for "default", else a subfolder."""
    if adapter_name == DEFAULT_ADAPTER_NAME:
        return Path(directory)
    return Path(directory) / adapter_name


def _config_json(config_dict: Mapping[str, Any]) -> str:
    """The config as PEFT writes it: sorted keys, sets as lists, `peft_type` and inference mode.

    PEFT refuses a config without `peft_type` and always saves `inference_mode: true`; the
    trainable state is chosen again when loading.
    """
    config = dict(config_dict)
    peft_type = config.setdefault("peft_type", PEFT_TYPE_LORA)
    if peft_type != PEFT_TYPE_LORA:
        raise AdapterConfigError(
            f"peft_type={peft_type!r} cannot be saved by lorakit, which writes LoRA adapters "
            f"only; allowed: {PEFT_TYPE_LORA!r}. Fix: pass a LoRA config."
        )
    config["inference_mode"] = True
    for key, value in config.items():
        if isinstance(value, set | frozenset):
            config[key] = sorted(value, key=str)
    try:
        return json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError):
        bad_fields = [key for key, value in config.items() if not _is_json_value(value)]
        raise AdapterConfigError(
            f"Config fields {bad_fields} cannot be written to {CONFIG_NAME}: allowed values are "
            "JSON types (str, int, float, bool, None, lists and dicts of them). Fix: convert "
            "them in the config's to_dict()."
        ) from None


def _is_json_value(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _writable_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared memory, as safetensors requires; copies only those.

    Tied weights (e.g. an input embedding and an output head saved together) share storage;
    the second and later ones are cloned, as PEFT does.
    """
    writable: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[torch.device, int]] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"Adapter tensor {key!r} is a {type(value).__name__}, not a torch.Tensor; only "
                "tensors can be saved to safetensors."
            )
        tensor = value.detach()
        if tensor.numel() > 0:
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            if storage in seen_storages:
                tensor = tensor.clone()
            seen_storages.add(storage)
        writable[key] = tensor.contiguous()
    return writable


def save_adapter_files(
    directory: PathLike,
    adapter_name: str,
    tensors: Mapping[str, torch.Tensor],
    config_dict: Mapping[str, Any],
    *,
    safe_serialization: bool = True,
) -> Path:
    """Writes one adapter in PEFT's layout, atomically (see `save_adapters_together`).

    Args:
        directory: The save folder; created if missing.
        adapter_name: "default" writes at the top of `directory`, other names in a subfolder.
        tensors: File key -> tensor, as returned by `adapter_state_dict`.
        config_dict: The adapter config's `to_dict()`; JSON values only.
        safe_serialization: Weights as safetensors (default), else as a `torch.save` pickle.

    Returns:
        The folder the adapter was written to.

    Raises:
        AdapterConfigError: The config cannot be written as PEFT's JSON.
        TypeError: A value in `tensors` is not a tensor.
        FileExistsError: The adapter's folder path is an existing file.
    """
    saved = save_adapters_together(
        directory,
        {adapter_name: (tensors, config_dict)},
        safe_serialization=safe_serialization,
    )
    return saved[adapter_name]


def save_adapters_together(
    directory: PathLike,
    adapters: Mapping[str, AdapterContents],
    *,
    safe_serialization: bool = True,
) -> dict[str, Path]:
    """Writes several adapters in PEFT's layout as one atomic save.

    Every config and tensor is checked before anything is written; then all files are staged
    and flushed to disk before any replaces an old one, so a crash while writing (the long
    part) leaves the previous adapters as they were. A weights file of the other format left
    by an earlier save is then deleted, since readers prefer safetensors and would load it.

    Args:
        directory: The save folder; created if missing.
        adapters: Adapter name -> (file key -> tensor, config `to_dict()`); "default" is
            written at the top of `directory`, other names in subfolders.
        safe_serialization: Weights as `adapter_model.safetensors` (default), else as
            `adapter_model.bin` written by `torch.save`, as PEFT does.

    Returns:
        Adapter name -> the folder it was written to.

    Raises:
        AdapterConfigError: A config cannot be written as PEFT's JSON.
        TypeError: A value in the tensors is not a tensor.
        FileExistsError: An adapter's folder path is an existing file.
    """
    prepared: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for adapter_name, (tensors, config_dict) in adapters.items():
        target = adapter_directory(directory, adapter_name)
        if target.exists() and not target.is_dir():
            raise FileExistsError(
                f"Cannot save adapter {adapter_name!r} to {target}: it is a file, not a folder. "
                "Fix: choose another save directory."
            )
        prepared[adapter_name] = (_config_json(config_dict), _writable_tensors(tensors))
    weights_name, other_name = SAFETENSORS_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME
    if not safe_serialization:
        weights_name, other_name = other_name, weights_name
    with replace_files(directory) as staging:
        for adapter_name, (config_text, writable) in prepared.items():
            folder = adapter_directory(staging, adapter_name)
            folder.mkdir(parents=True, exist_ok=True)
            if safe_serialization:
                save_file(writable, folder / weights_name, metadata=SAFETENSORS_METADATA)
            else:
                torch.save(writable, folder / weights_name)
            (folder / CONFIG_NAME).write_text(config_text, encoding="utf-8")
    saved = {adapter_name: adapter_directory(directory, adapter_name) for adapter_name in adapters}
    for folder in saved.values():
        (folder / other_name).unlink(missing_ok=True)
    return saved


def _adapters_in_subfolders(directory: Path) -> list[str]:
    return sorted(
        child.name
        for child in directory.iterdir()
        if (child / CONFIG_NAME).is_file() and not is_temp_name(child.name)
    )


def _missing_file_error(directory: Path, name: str) -> AdapterNotFoundError:
    hint = ""
    if directory.is_dir():
        subfolders = _adapters_in_subfolders(directory)
        if subfolders:
            hint = f" Adapters found in subfolders: {subfolders}; pass subfolder=<name>."
    return AdapterNotFoundError(
        f"No {name} in {directory}: an adapter folder holds {CONFIG_NAME} and "
        f"{SAFETENSORS_WEIGHTS_NAME} (written by save_pretrained).{hint}"
    )


def read_adapter_config(directory: PathLike) -> dict[str, Any]:
    """Reads `adapter_config.json` from an adapter folder.

    Raises:
        AdapterNotFoundError: The file does not exist.
        CorruptAdapterFileError: It is not valid JSON or not a JSON object.
        AdapterConfigError: It describes another PEFT method than LoRA.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise _missing_file_error(Path(directory), CONFIG_NAME)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptAdapterFileError(
            f"{path} is not valid JSON ({error}). Fix: restore the file from the original save, "
            "or save the adapter again."
        ) from None
    if not isinstance(config, dict):
        raise CorruptAdapterFileError(
            f"{path} holds a JSON {type(config).__name__}, expected an object of config fields. "
            "Fix: restore the file from the original save."
        )
    peft_type = config.get("peft_type", PEFT_TYPE_LORA)
    if peft_type != PEFT_TYPE_LORA:
        raise AdapterConfigError(
            f"{path} describes a {peft_type!r} adapter; lorakit loads {PEFT_TYPE_LORA!r} adapters "
            "only. Fix: load it with the library that supports that method."
        )
    return config


def available_devices() -> list[str]:
    """The devices adapter files can be read onto here: "cpu" and each accelerator."""
    devices = ["cpu"]
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None:
        devices += [f"{accelerator.type}:{i}" for i in range(torch.accelerator.device_count())]
    return devices


def reader_device(device: str | torch.device) -> str:
    """`device` as the file readers spell it ("cpu", "cuda:0"), checked against this machine.

    torch's spellings are accepted ("cpu:0", "cuda", `torch.device("cuda", 1)`); the
    safetensors reader itself takes only "cpu" and indexed accelerators.

    Raises:
        AdapterDeviceError: torch does not know the device, it is "meta" (which holds no
            data), or this machine has no such device.
    """
    accepted = available_devices()
    fix = (
        f"Accepted devices here: {accepted}, in any spelling torch.device takes (e.g. 'cpu:0'). "
        "Fix: pass one of them as torch_device/device."
    )
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise AdapterDeviceError(
            f"device={device!r} is not a torch device ({error}). {fix}"
        ) from None
    if parsed.type == "meta":
        raise AdapterDeviceError(
            f"device={device!r}: the meta device holds no data, so an adapter file cannot be "
            "read onto it. To create adapters without allocating them, pass "
            f"low_cpu_mem_usage=True instead. {fix}"
        )
    if parsed.type == "cpu":
        return "cpu"
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or parsed.type != accelerator.type:
        raise AdapterDeviceError(f"device={device!r}: this machine has no {parsed.type}. {fix}")
    index = torch.accelerator.current_device_index() if parsed.index is None else parsed.index
    if index >= torch.accelerator.device_count():
        raise AdapterDeviceError(f"device={device!r}: this machine has no {parsed}. {fix}")
    return f"{parsed.type}:{index}"


def _load_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError) as error:
        raise CorruptAdapterFileError(
            f"{path} is not a readable safetensors file ({error}); it is truncated or corrupt, "
            "e.g. from an interrupted copy or download. Fix: copy or save the adapter again."
        ) from None


def pickle_conversion_snippet(path: Path) -> str:
    """One line of shell that converts a pickle adapter to safetensors, reading it safely."""
    target = path.with_name(SAFETENSORS_WEIGHTS_NAME)
    return (
        'python -c "import torch; from safetensors.torch import save_file; '
        f"state = torch.load({str(path)!r}, map_location='cpu', weights_only=True); "
        f"save_file({{k: v.contiguous() for k, v in state.items()}}, {str(target)!r}, "
        "metadata={'format': 'pt'})\""
    )


def _load_pickle(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CorruptAdapterFileError(
            f"{path} holds objects other than tensors, which are not loaded even with "
            f"allow_pickle=True ({error}). Fix: use a safetensors adapter."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise CorruptAdapterFileError(
            f"{path} is not a readable PyTorch file ({error}); it is truncated or corrupt. "
            "Fix: copy or save the adapter again."
        ) from None
    is_state_dict = isinstance(state, dict) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    )
    if not is_state_dict:
        raise CorruptAdapterFileError(
            f"{path} holds a {type(state).__name__}, expected a dict of name -> tensor. "
            "Fix: save the adapter again."
        )
    return state


def load_adapter_files(
    directory: PathLike,
    *,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads one adapter folder: its tensors and its config.

    As in PEFT, the folder given is the adapter's own folder, whatever name the adapter gets
    when loaded; an adapter saved under another name than "default" sits in
    `<save folder>/<name>/`, reached with `subfolder=<name>`.

    Args:
        directory: The adapter folder.
        subfolder: A subfolder of `directory` to read instead.
        allow_pickle: Read `adapter_model.bin` when no safetensors file exists (with
            `torch.load(weights_only=True)`). Off by default: pickles can run code.
        device: Where to put the tensors: "cpu" or an accelerator of this machine, in any
            spelling `torch.device` accepts ("cpu:0", "cuda", "cuda:1").

    Returns:
        (file key -> tensor, config dict as saved).

    Raises:
        AdapterNotFoundError: The folder, config or weights file does not exist.
        PickleAdapterRefusedError: Only `adapter_model.bin` exists and `allow_pickle` is False.
        CorruptAdapterFileError: A file is truncated, corrupt or not valid JSON.
        AdapterConfigError: The config is for another PEFT method than LoRA.
        AdapterDeviceError: `device` is not a device this machine can read tensors onto.
    """
    reader = reader_device(device)
    folder = Path(directory) if subfolder is None else Path(directory) / subfolder
    if not folder.is_dir():
        raise AdapterNotFoundError(
            f"Adapter folder {folder} does not exist or is not a folder. Fix: pass the folder "
            "that save_pretrained wrote (it holds adapter_config.json)."
        )
    config = read_adapter_config(folder)
    safetensors_path, pickle_path = folder / SAFETENSORS_WEIGHTS_NAME, folder / PICKLE_WEIGHTS_NAME
    if safetensors_path.is_file():
        return _load_safetensors(safetensors_path, reader), config
    if not pickle_path.is_file():
        raise _missing_file_error(folder, SAFETENSORS_WEIGHTS_NAME)
    if not allow_pickle:
        raise PickleAdapterRefusedError(
            f"{pickle_path} is a pickle file, which can run arbitrary code when loaded, so "
            f"lorakit reads only {SAFETENSORS_WEIGHTS_NAME} by default. Fix: convert it once "
            f"with\n  {pickle_conversion_snippet(pickle_path)}\nor, if you trust the file, "
            "pass allow_pickle=True (it is then read with torch.load(weights_only=True))."
        )
    return _load_pickle(pickle_path, reader), config
