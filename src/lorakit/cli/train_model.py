"""The base model of `lorakit train`: a folder or a hub id, in full precision or in 4 bits.

`--model` is resolved the way transformers resolves it: a local folder, else a hub model id,
read from the Hugging Face cache when offline (``HF_HUB_OFFLINE=1``). A 4-bit base is loaded by
`lorakit.quant.load_quantized` (each linear weight quantized as it is read); a task that needs
a new head (sequence or token classification) loads in full precision and is quantized after,
the head kept in full precision because it trains.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..constants import TASK_HEAD_MODULES
from ..extras import import_optional
from ..quant import QuantConfig, QuantLinear, load_quantized, quantize_model_linears
from ..train.train_errors import TrainConfigError

logger = logging.getLogger(__name__)

AUTO_CLASSES: dict[str, str] = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
AUTO_DTYPE = "auto"
# Files of a hub snapshot that 4-bit loading reads (config, safetensors weights, tokenizer).
SNAPSHOT_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "*.model", "*.txt")


def check_model(model: str) -> None:
    """Fail early, naming the fix, unless transformers resolves ``model`` to a config.

    Raises:
        TrainConfigError: A folder without ``config.json``, or neither a folder nor a model
            id found in the cache (offline) or on the Hub.
    """
    transformers = import_optional("transformers", "transformers", "lorakit train")

    folder = Path(model)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise TrainConfigError(
            f"model folder {model} has no config.json; pass a transformers model folder "
            "(config.json, weights and tokenizer files, as save_pretrained writes) or a hub "
            "model id such as 'org/name'."
        )
    try:
        transformers.AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise TrainConfigError(
            f"--model {model!r} is neither a local model folder nor a model id transformers can "
            f"resolve ({reason}). Pass a folder written by save_pretrained, or a hub id such "
            "as 'org/name'; offline (HF_HUB_OFFLINE=1) the id must already be in the Hugging "
            "Face cache (HF_HUB_CACHE): fetch it once online, e.g. 'hf download org/name'."
        ) from error


def load_base(
    model: str,
    task: str,
    id_to_label: Mapping[int, Any] | None,
    quantization: Mapping[str, Any] | None,
) -> nn.Module:
    """The base under the auto class of ``task`` (a new head sized to the labels if needed).

    Args:
        model: a folder or hub id (see `check_model`).
        task: a key of `AUTO_CLASSES`.
        id_to_label: class id -> label of the training rows (classification), else None.
        quantization: the ``quantization:`` options (`QuantConfig` fields, `skip_modules`,
            `torch_dtype`), or None for a full-precision base.
    """
    transformers = import_optional("transformers", "transformers", "lorakit train")

    auto_class = getattr(transformers, AUTO_CLASSES[task])
    options: dict[str, Any] = {}
    if id_to_label is not None and task in ("SEQ_CLS", "TOKEN_CLS"):
        id2label = {index: str(label) for index, label in id_to_label.items()}
        label2id = {label: index for index, label in id2label.items()}
        options = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    if quantization is None:
        base: nn.Module = auto_class.from_pretrained(model, **options)
        return base
    quant_config, load_options = quant_settings(quantization)
    if task in TASK_HEAD_MODULES:  # a new head: load_quantized builds only what the file holds
        skip = (*load_options.get("skip_modules", _default_skip()), *TASK_HEAD_MODULES[task])
        dtype = load_options.get("torch_dtype", AUTO_DTYPE)
        base = auto_class.from_pretrained(model, dtype=dtype, **options)
        base = quantize_model_linears(base, quant_config, skip)
    else:
        try:
            base = load_quantized(
                _local_folder(model), quant_config, model_class=auto_class, **load_options
            )
        except ValueError as error:  # pickled-only weights, weights the class leaves unset
            raise TrainConfigError(f"cannot load {model} in 4 bits: {error}") from error
    count = sum(isinstance(module, QuantLinear) for module in base.modules())
    logger.info(
        "%s: %d linear layers in 4 bits (%s, blocksize %d, double quantization %s, compute %s)",
        model,
        count,
        quant_config.quant_type,
        quant_config.blocksize,
        "on" if quant_config.double_quant else "off",
        str(quant_config.compute_dtype).removeprefix("torch."),
    )
    return base


def quant_settings(options: Mapping[str, Any]) -> tuple[QuantConfig, dict[str, Any]]:
    """(`QuantConfig`, `load_quantized` keywords) from the ``quantization:`` options.

    Raises:
        TrainConfigError: A value `QuantConfig` or `load_quantized` refuses, or a dtype name
            not in `DTYPES`.
    """
    values = dict(options)
    if "compute_dtype" in values:
        values["compute_dtype"] = _dtype("compute_dtype", values["compute_dtype"])
    if values.get("torch_dtype", AUTO_DTYPE) != AUTO_DTYPE:
        values["torch_dtype"] = _dtype("torch_dtype", values["torch_dtype"])
    skip = values.get("skip_modules")
    if skip is not None and (
        not isinstance(skip, list) or not all(isinstance(name, str) for name in skip)
    ):
        raise TrainConfigError(
            f"quantization.skip_modules = {skip!r} is not allowed; use a list of module "
            "names, e.g. [lm_head]."
        )
    if skip is not None:
        values["skip_modules"] = tuple(skip)
    quant_names = QuantConfig.__dataclass_fields__.keys()
    quant = {key: values.pop(key) for key in list(values) if key in quant_names}
    try:
        config = QuantConfig(**quant)
    except (ValueError, TypeError) as error:
        raise TrainConfigError(f"quantization section: {error}") from error
    return config, values


def _dtype(name: str, value: Any) -> torch.dtype:
    if value not in DTYPES:
        allowed = ", ".join(DTYPES) + (f" or {AUTO_DTYPE}" if name == "torch_dtype" else "")
        raise TrainConfigError(f"quantization.{name} = {value!r} is not allowed; use {allowed}.")
    return DTYPES[value]


def _default_skip() -> tuple[str, ...]:
    """`load_quantized`'s own default for `skip_modules` (one place decides it)."""
    default: tuple[str, ...] = inspect.signature(load_quantized).parameters["skip_modules"].default
    return tuple(default)


def _local_folder(model: str) -> Path:
    """The folder holding ``model``'s files: itself, or its hub snapshot (cached when offline)."""
    if Path(model).is_dir():
        return Path(model)
    snapshot_download = import_optional(
        "huggingface_hub", "transformers", "lorakit train with a hub id"
    ).snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=list(SNAPSHOT_PATTERNS)))
    except (OSError, ValueError) as error:
        raise TrainConfigError(
            f"cannot find the files of {model!r} for 4-bit loading ({error}); download the "
            "model once online, or pass its local folder."
        ) from error
