"""The options of a `lorakit train` run: the config file's sections merged with the flags.

A config file holds the run's inputs (`model`, `train_data`, `eval_data`, `task`) and
`TrainConfig` fields at the top level, a ``lora:`` section of `LoraConfig` fields and a
``quantization:`` section (4-bit loading: `QuantConfig` fields, `load_quantized`'s
`skip_modules` and `torch_dtype`, and `load_in_4bit` to turn it on). The top-level LoRA keys
of earlier versions (`r`, `lora_alpha`, `lora_dropout`, `target_modules`) still work; a value
given both there and in ``lora:`` must agree. A flag given overrides the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import LoraConfig
from ..quant.linear import QuantConfig
from ..train.config import check_known_fields, field_names
from ..train.train_errors import TrainConfigError

INPUT_OPTIONS: tuple[str, ...] = ("model", "train_data", "eval_data", "task")
LORA_SECTION = "lora"
QUANT_SECTION = "quantization"
LEGACY_LORA_KEYS: tuple[str, ...] = ("r", "lora_alpha", "lora_dropout", "target_modules")
# `lorakit train`'s LoRA defaults where they differ from `LoraConfig`'s (kept from before the
# lora: section existed, so old config files train the same adapter).
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
LOAD_IN_4BIT = "load_in_4bit"
LOAD_OPTIONS: tuple[str, ...] = ("skip_modules", "torch_dtype")  # keywords of load_quantized


@dataclass
class RunOptions:
    """Everything `lorakit train` was given, split by where it goes.

    Attributes:
        inputs: `model`, `train_data`, `eval_data`, `task` (the last two may be absent).
        train: `TrainConfig` fields.
        lora: `LoraConfig` fields, `lorakit train`'s defaults filled in.
        quantization: `QuantConfig` fields and `load_quantized` keywords for a 4-bit base;
            None: the base loads in full precision.
    """

    inputs: dict[str, Any]
    train: dict[str, Any]
    lora: dict[str, Any]
    quantization: dict[str, Any] | None


def lora_fields() -> tuple[str, ...]:
    """The keys of the ``lora:`` section: every `LoraConfig` field."""
    return tuple(item.name for item in dataclasses.fields(LoraConfig))


def quantization_fields() -> tuple[str, ...]:
    """The keys of the ``quantization:`` section."""
    quant = tuple(item.name for item in dataclasses.fields(QuantConfig))
    return (LOAD_IN_4BIT, *quant, *LOAD_OPTIONS)


def top_level_fields() -> tuple[str, ...]:
    """The keys a config file may hold at the top level."""
    sections = (LORA_SECTION, QUANT_SECTION)
    return (*INPUT_OPTIONS, *LEGACY_LORA_KEYS, *field_names(), *sections)


def split_target_modules(value: Any) -> list[str] | str | None:
    """A flag's (or old top-level key's) comma-separated names as a list; all-linear stays."""
    if value is None or isinstance(value, list):
        return value
    text = str(value)
    return text if text == "all-linear" else [part.strip() for part in text.split(",") if part]


def gather_options(from_file: Mapping[str, Any], flags: Mapping[str, Any]) -> RunOptions:
    """Merge a parsed config file with the flags given (None values: flag not given).

    Raises:
        TrainConfigError: An unknown key (naming the closest ones), a LoRA or quantization
            key outside its section, a top-level key contradicting its ``lora:`` twin,
            quantization options without `load_in_4bit`, or no `model`/`train_data`.
    """
    _check_top_level(from_file)
    lora = _lora_from_file(from_file)
    quantization = _section(from_file, QUANT_SECTION)
    check_known_fields(quantization, quantization_fields(), f"{QUANT_SECTION} section")
    inputs = _pick(from_file, INPUT_OPTIONS)
    train = _pick(from_file, field_names())
    given = {key: value for key, value in flags.items() if value is not None}
    inputs.update(_pick(given, INPUT_OPTIONS))
    train.update(_pick(given, field_names()))
    lora.update(_pick(given, lora_fields()))
    quantization.update(_pick(given, quantization_fields()))
    _match_task(inputs, lora)
    for name in ("model", "train_data"):
        if not inputs.get(name):
            raise TrainConfigError(
                f"no {name} given; pass --{name.replace('_', '-')} or set {name!r} in --config."
            )
    return RunOptions(inputs, train, {**LORA_DEFAULTS, **lora}, _quantization(quantization))


def _pick(values: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if key in names}


def _check_top_level(from_file: Mapping[str, Any]) -> None:
    for key in from_file:
        for section, names in (
            (LORA_SECTION, lora_fields()),
            (QUANT_SECTION, quantization_fields()),
        ):
            if key in names and key not in LEGACY_LORA_KEYS:
                raise TrainConfigError(
                    f"config file option {key!r} belongs in the {section!r} section; write "
                    f"it under '{section}:' (indented), e.g. '{section}: {{{key}: ...}}'."
                )
    check_known_fields(from_file, top_level_fields(), "config file")


def _section(from_file: Mapping[str, Any], name: str) -> dict[str, Any]:
    section = from_file.get(name)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise TrainConfigError(
            f"config file section {name!r} holds {section!r}; it must be a mapping of option "
            f"names to values, e.g. '{name}: {{r: 16}}'."
        )
    return dict(section)


def _lora_from_file(from_file: Mapping[str, Any]) -> dict[str, Any]:
    """The ``lora:`` section with the old top-level keys merged in (they must agree)."""
    section = _section(from_file, LORA_SECTION)
    check_known_fields(section, lora_fields(), f"{LORA_SECTION} section")
    for key in LEGACY_LORA_KEYS:
        if key not in from_file:
            continue
        value = from_file[key]
        value = split_target_modules(value) if key == "target_modules" else value
        if key in section and section[key] != value:
            raise TrainConfigError(
                f"config file sets {key}: {from_file[key]!r} at the top level and "
                f"{LORA_SECTION}.{key}: {section[key]!r}; keep only the one under "
                f"'{LORA_SECTION}:'."
            )
        section[key] = value
    return section


def _match_task(inputs: dict[str, Any], lora: dict[str, Any]) -> None:
    """`task` and `lora.task_type` name one thing: take either, refuse two different ones."""
    task, task_type = inputs.get("task"), lora.get("task_type")
    if task_type is None:
        return
    task_type = getattr(task_type, "value", task_type)
    if task is not None and str(task) != str(task_type):
        raise TrainConfigError(
            f"task {task!r} and {LORA_SECTION}.task_type {task_type!r} differ; set only one "
            "of them."
        )
    inputs["task"] = str(task_type)


def _quantization(options: dict[str, Any]) -> dict[str, Any] | None:
    """The 4-bit loading options, or None when `load_in_4bit` is not set (nothing else may be)."""
    load_in_4bit = options.pop(LOAD_IN_4BIT, False)
    if not isinstance(load_in_4bit, bool):
        raise TrainConfigError(
            f"{QUANT_SECTION}.{LOAD_IN_4BIT} = {load_in_4bit!r} is not allowed; use true or false."
        )
    if load_in_4bit:
        return options
    if options:
        raise TrainConfigError(
            f"{QUANT_SECTION} options {sorted(options)} are set but {LOAD_IN_4BIT} is not true; "
            f"add '{LOAD_IN_4BIT}: true' to the {QUANT_SECTION!r} section or pass "
            "--load-in-4bit (or remove the section)."
        )
    return None
