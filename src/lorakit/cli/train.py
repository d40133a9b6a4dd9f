"""`lorakit train`: fine-tune a local transformers model with LoRA from a config file and flags.

    lorakit train --config run.yaml --max-steps 200   # flags override the file

The config file (YAML or JSON) holds ``TrainConfig`` options plus the run's inputs: ``model``,
``train_data``, ``eval_data``, ``task``, ``target_modules``, ``r``, ``lora_alpha``,
``lora_dropout``. Errors a person can fix (a missing file, a bad row or option) are printed
without a traceback and exit with status 2; a run stopped by a non-finite loss exits with 1.
Under ``torchrun`` every process is one rank of a data-parallel run (``docs/distributed.md``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from ..train.config import (
    PRECISIONS,
    SCHEDULERS,
    STRATEGIES,
    check_known_fields,
    field_names,
    read_config_file,
)

INPUT_OPTIONS: tuple[str, ...] = (
    "model",
    "train_data",
    "eval_data",
    "task",
    "target_modules",
    "r",
    "lora_alpha",
    "lora_dropout",
)
INPUT_DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
# TrainConfig field -> (argparse type, help); `resume` and the boolean flag are added apart.
TRAIN_FLAGS: dict[str, tuple[Any, str]] = {
    "epochs": (int, "passes over the training data"),
    "max_steps": (int, "optimizer steps (overrides --epochs)"),
    "batch_size": (int, "examples per micro-batch"),
    "gradient_accumulation_steps": (int, "micro-batches per optimizer step"),
    "learning_rate": (float, "peak AdamW learning rate"),
    "lr_scheduler": (str, f"one of {', '.join(SCHEDULERS)}"),
    "warmup_steps": (int, "linear warmup steps"),
    "warmup_ratio": (float, "warmup as a fraction of all steps"),
    "weight_decay": (float, "AdamW weight decay on matrices"),
    "max_grad_norm": (float, "gradient clipping norm (0: off)"),
    "max_length": (int, "truncate inputs to this many tokens"),
    "seed": (int, "seed of shuffling, dropout and new heads"),
    "precision": (str, f"one of {', '.join(PRECISIONS)}"),
    "eval_steps": (int, "evaluate every N steps (default: at the end)"),
    "save_steps": (int, "checkpoint every N steps"),
    "save_total_limit": (int, "checkpoints to keep"),
    "logging_steps": (int, "log the training loss every N steps"),
    "output_dir": (str, "folder for metrics, checkpoints, adapter, plot, summary"),
    "strategy": (str, f"under torchrun: {' or '.join(STRATEGIES)} (fsdp shards the base)"),
}
AUTO_CLASSES: dict[str, str] = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
USAGE_ERROR = 2
RUN_FAILED = 1


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train", help="Fine-tune a local transformers model with LoRA (config file and flags)."
    )
    parser.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    parser.add_argument("--model", help="local transformers model folder")
    parser.add_argument("--train-data", help="training rows: .jsonl, .json, .csv or .tsv")
    parser.add_argument("--eval-data", help="evaluation rows, same formats")
    parser.add_argument(
        "--task", help="CAUSAL_LM, SEQ_CLS, TOKEN_CLS or SEQ_2_SEQ_LM (default: from rows)"
    )
    parser.add_argument("--target-modules", help="comma-separated module names, or all-linear")
    parser.add_argument("--r", type=int, help="LoRA rank (default 8)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16)")
    parser.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    for name, (kind, text) in TRAIN_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="recompute activations"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="resume from the newest checkpoint in --output-dir, or from the given folder",
    )
    return parser


def _options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run inputs, TrainConfig values): the config file's, overridden by the flags."""
    from_file = read_config_file(args.config) if args.config else {}
    check_known_fields(from_file, (*INPUT_OPTIONS, *field_names()), "config file")
    inputs = {**INPUT_DEFAULTS, **{k: v for k, v in from_file.items() if k in INPUT_OPTIONS}}
    train = {k: v for k, v in from_file.items() if k not in INPUT_OPTIONS}
    flags = vars(args)
    inputs.update({k: flags[k] for k in INPUT_OPTIONS if flags.get(k) is not None})
    train.update({k: flags[k] for k in field_names() if flags.get(k) is not None})
    for name in ("model", "train_data"):
        if not inputs.get(name):
            raise LorakitError(
                f"no {name} given; pass --{name.replace('_', '-')} or set {name!r} in --config."
            )
    return inputs, train


def _target_modules(value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, list):
        return value
    text = str(value)
    return text if text == "all-linear" else [part.strip() for part in text.split(",") if part]


def _number(value: Any) -> int | float:
    """An int when the value is whole (PEFT's config files hold ``lora_alpha: 16``)."""
    number = float(value)
    return int(number) if number.is_integer() else number


def _load_model(folder: Path, task: str, train: Any) -> Any:
    """The model folder's weights under the auto class of ``task`` (with a new head if needed)."""
    import transformers

    auto_class = getattr(transformers, AUTO_CLASSES[task])
    options: dict[str, Any] = {}
    if train.id_to_label is not None and task in ("SEQ_CLS", "TOKEN_CLS"):
        id2label = {index: str(label) for index, label in train.id_to_label.items()}
        label2id = {label: index for index, label in id2label.items()}
        options = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    return auto_class.from_pretrained(folder, **options)


def _train(inputs: dict[str, Any], train_options: dict[str, Any]) -> dict[str, Any]:
    import transformers

    from .. import LoraConfig, get_peft_model
    from ..train import TrainConfig, Trainer
    from ..train.checkpoint import seed_everything
    from ..train.data import prepare_datasets

    config = TrainConfig.from_dict(train_options)
    folder = Path(inputs["model"])
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {folder} has no config.json; pass a local transformers model folder "
            "(config.json, weights and tokenizer files), e.g. one written by save_pretrained."
        )
    seed_everything(config.seed)  # the new classification head and LoRA init
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    train, evaluation = prepare_datasets(
        inputs["train_data"],
        tokenizer,
        inputs.get("eval_data"),
        task=inputs.get("task"),
        max_length=config.max_length,
    )
    lora_config = LoraConfig(
        task_type=train.task,
        r=int(inputs["r"]),
        lora_alpha=_number(inputs["lora_alpha"]),
        lora_dropout=float(inputs["lora_dropout"]),
        target_modules=_target_modules(inputs.get("target_modules")),
    )
    model = get_peft_model(_load_model(folder, train.task, train), lora_config)
    return Trainer(model, tokenizer, config, train, evaluation).train()


def run_train(args: argparse.Namespace) -> int:
    """Run ``lorakit train``; return the exit status (0 ok, 1 run failed, 2 bad input)."""
    from ..train.distributed import detect_launch
    from ..train.reporting import format_summary
    from ..train.train_errors import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        inputs, train_options = _options(args)
        summary = _train(inputs, train_options)
        is_main = detect_launch().is_main  # under torchrun, rank 0 prints the summary
    except NonFiniteLossError as error:
        print(f"lorakit train: {error}", file=sys.stderr)
        return RUN_FAILED
    except (LorakitError, FileNotFoundError) as error:
        print(f"lorakit train: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    if is_main:
        print(format_summary(summary))
    return 0
