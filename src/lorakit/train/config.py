"""``TrainConfig``: every option of a training run, checked once, loadable from YAML or JSON.

Each option is documented once, in the class docstring's ``Attributes`` section; the command
line's help texts are read from there (``lorakit.cli.formatting.attribute_docs``). A config
file is a mapping of field names to values; flags override it with
``config.with_overrides(...)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import closest_names
from .train_errors import TrainConfigError

SchedulerName = Literal["constant", "linear", "cosine"]
PrecisionName = Literal["fp32", "bf16"]
StrategyName = Literal["ddp", "fsdp"]
SCHEDULERS: tuple[str, ...] = ("constant", "linear", "cosine")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")
CONFIG_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")


@dataclass
class TrainConfig:
    """Options of a training run.

    Each entry below is the one description of its option: `lorakit train --help` shows it
    word for word beside the option's flag (``--max-steps`` for `max_steps`, ...).

    Attributes:
        epochs: Passes over the training data (ignored when `max_steps` is set).
        max_steps: Optimizer steps to run; unset (null): run `epochs` epochs.
        batch_size: Examples per micro-batch (per process).
        gradient_accumulation_steps: Micro-batches per optimizer step. The loss of a step is
            weighted by label count, so it equals the loss of one batch k times larger.
        learning_rate: Peak AdamW learning rate.
        lr_scheduler: constant, linear (decay to 0) or cosine (to 0), each after a linear
            warmup from 0.
        warmup_steps: Warmup length in optimizer steps.
        warmup_ratio: Warmup length as a fraction of all steps (use this or `warmup_steps`).
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not to biases or
            other 1-D parameters such as norm scales).
        loraplus_lr_ratio: LoRA+: train the lora_B factors (and 1-D tensors) at this many
            times `learning_rate` (> 0; the paper uses 2 to 16) and LoRA embedding factors at
            1e-6, as peft's create_loraplus_optimizer; unset (null): one learning rate.
        max_grad_norm: Clip the global gradient norm to this; null or 0 disables clipping.
        max_length: Truncate inputs to this many tokens.
        seed: Seeds Python, NumPy and torch, the shuffle and dropout.
        precision: fp32, or bf16 (`torch.autocast`; weights stay fp32).
        gradient_checkpointing: Recompute activations in backward to save memory.
        eval_steps: Evaluate every this many steps; unset (null): only at the end.
        save_steps: Write a checkpoint every this many steps; unset (null): none.
        save_total_limit: Keep this many most recent checkpoints.
        logging_steps: Log training loss every this many steps.
        output_dir: Folder for `metrics.jsonl`, checkpoints, the adapter, plot and summary.
        resume: True resumes from the latest checkpoint in `output_dir` (starting afresh
            when there is none), a path resumes from that checkpoint, False starts afresh.
        strategy: How a torchrun launch splits the work (a single process ignores it): ddp
            keeps a whole model on every rank and all-reduces the adapter gradients; fsdp
            shards the model, frozen base included, over the ranks (for bases that do not fit
            one device). See docs/distributed.md.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: SchedulerName = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    loraplus_lr_ratio: float | None = None
    max_grad_norm: float | None = 1.0
    max_length: int = 512
    seed: int = 0
    precision: PrecisionName = "fp32"
    gradient_checkpointing: bool = False
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    logging_steps: int = 10
    output_dir: str = "lorakit-output"
    resume: bool | str = False
    strategy: StrategyName = "ddp"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            TrainConfigError: Naming the field, the value received and what is allowed.
        """
        _check_int(self, "epochs", minimum=1)
        _check_int(self, "batch_size", minimum=1)
        _check_int(self, "gradient_accumulation_steps", minimum=1)
        _check_int(self, "warmup_steps", minimum=0)
        _check_int(self, "max_length", minimum=1)
        _check_int(self, "seed", minimum=0)
        _check_int(self, "save_total_limit", minimum=1)
        _check_int(self, "logging_steps", minimum=1)
        for name in ("max_steps", "eval_steps", "save_steps"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1, note=", or null")
        _check_float(self, "learning_rate", low=0.0, low_open=True)
        _check_float(self, "weight_decay", low=0.0)
        _check_float(self, "warmup_ratio", low=0.0, high=1.0)
        if self.max_grad_norm is not None:
            _check_float(self, "max_grad_norm", low=0.0)
        if self.loraplus_lr_ratio is not None:
            _check_float(self, "loraplus_lr_ratio", low=0.0, low_open=True)
            if self.loraplus_lr_ratio == float("inf"):
                _fail("loraplus_lr_ratio", self.loraplus_lr_ratio, "a finite number > 0, or null")
        _check_choice(self, "lr_scheduler", SCHEDULERS)
        _check_choice(self, "precision", PRECISIONS)
        _check_choice(self, "strategy", STRATEGIES)
        if self.warmup_steps and self.warmup_ratio:
            raise TrainConfigError(
                f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio} are both "
                "set; set only one of them (the other to 0)."
            )
        if not isinstance(self.gradient_checkpointing, bool):
            _fail("gradient_checkpointing", self.gradient_checkpointing, "true or false")
        if not isinstance(self.resume, bool | str) or self.resume == "":
            _fail("resume", self.resume, "true, false, or a checkpoint folder path")
        if not isinstance(self.output_dir, str | os.PathLike) or str(self.output_dir) == "":
            _fail("output_dir", self.output_dir, "a folder path")
        self.output_dir = str(self.output_dir)

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of ``total_steps`` optimizer steps."""
        if self.warmup_ratio:
            return int(self.warmup_ratio * total_steps + 0.5)
        return self.warmup_steps

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a mapping of field names.

        Raises:
            TrainConfigError: An unknown field (with the closest names) or a bad value.
        """
        check_known_fields(data, field_names(), "TrainConfig")
        return cls(**dict(data))

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A copy with the non-``None`` values of ``overrides`` replacing fields (flags > file)."""
        check_known_fields(overrides, field_names(), "TrainConfig")
        changes = {key: value for key, value in overrides.items() if value is not None}
        return dataclasses.replace(self, **changes)


def field_names() -> tuple[str, ...]:
    """The names of ``TrainConfig``'s fields."""
    return tuple(field.name for field in dataclasses.fields(TrainConfig))


def check_known_fields(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Raise ``TrainConfigError`` for keys of ``data`` not in ``allowed``, with close names."""
    for key in data:
        if key not in allowed:
            hint = closest_names(str(key), allowed)
            raise TrainConfigError(
                f"unknown {where} option {key!r}"
                + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else ".")
                + f" Allowed options: {', '.join(allowed)}."
            )


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``, needs PyYAML) or JSON config file into a dict.

    Raises:
        FileNotFoundError: The file does not exist.
        TrainConfigError: An unknown extension, a parse error, or a top level that is not a
            mapping; or PyYAML is missing for a YAML file.
    """
    file = Path(path)
    if file.suffix.lower() not in CONFIG_SUFFIXES:
        raise TrainConfigError(
            f"config file {file} has extension {file.suffix!r}; use one of "
            f"{', '.join(CONFIG_SUFFIXES)}."
        )
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist; check the path.")
    text = file.read_text(encoding="utf-8")
    try:
        data = _parse_yaml(text) if file.suffix.lower() != ".json" else json.loads(text)
    except ValueError as error:  # json.JSONDecodeError and yaml.YAMLError (re-raised below)
        raise TrainConfigError(f"cannot parse config file {file}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainConfigError(
            f"config file {file} holds a {type(data).__name__}; it must be a mapping of option "
            "names to values, e.g. 'learning_rate: 0.0002'."
        )
    return data


def _parse_yaml(text: str) -> Any:
    try:
        import yaml
    except ImportError as error:
        raise TrainConfigError(
            "reading a YAML config needs PyYAML: pip install pyyaml (or use a .json file)."
        ) from error
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(str(error)) from error


def load_train_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A ``TrainConfig`` from a file (or the defaults) with ``overrides`` applied on top."""
    config = TrainConfig.from_dict(read_config_file(path)) if path is not None else TrainConfig()
    return config.with_overrides(overrides or {})


def _fail(name: str, value: object, allowed: str) -> None:
    raise TrainConfigError(f"TrainConfig.{name} = {value!r} is not allowed; use {allowed}.")


def _check_int(config: TrainConfig, name: str, minimum: int, note: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}{note}")


def _check_float(
    config: TrainConfig,
    name: str,
    low: float,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    value = getattr(config, name)
    if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            _fail(name, value, "a number")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or value != value or (value <= low if low_open else value < low):
        _fail(name, value, f"a number {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        _fail(name, value, f"a number between {low} and {high}")
    setattr(config, name, float(value))


def _check_choice(config: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(choice) for choice in choices))
