"""`lorakit train`: fine-tune a transformers model with LoRA from a config file and flags.

    lorakit train --config run.yaml --max-steps 200   # flags override the file

The config file (YAML or JSON) holds the run's inputs and ``TrainConfig`` options, a ``lora:``
section and a ``quantization:`` section (``lorakit.cli.train_options``). Every flag passes
through ``torchrun`` unchanged: none is a prefix of a torchrun option (``--r``, the old name
of ``--lora-r``, is the one exception and is kept for plain runs). Errors a person can fix (a
missing file, a bad row or option) are printed without a traceback and exit with status 2; a
run stopped by a non-finite loss exits with 1. Under ``torchrun`` every process is one rank of
a data-parallel run (``docs/distributed.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import types
import typing
from typing import Any, Literal

from ..config import LoraConfig
from ..errors import ConfigError, LorakitError
from ..extras import import_optional
from ..train.config import TrainConfig, read_config_file
from .formatting import attribute_docs, escape, show_default
from .train_model import AUTO_CLASSES
from .train_options import LORA_DEFAULTS, RunOptions, gather_options, split_target_modules

USAGE = "%(prog)s [--config FILE] [--model ID] [--train-data FILE] [options]"
# Flags whose text is not a `LoraConfig` docstring entry (their values are written differently).
TARGET_MODULES_HELP = (
    "Comma-separated module names, or all-linear (a regex: target_modules in the config "
    "file's lora: section)."
)
INIT_CHOICES = (
    "true",
    "false",
    "gaussian",
    "loftq",
    "pissa",
    "pissa_niter_N",
    "olora",
    "orthogonal",
)
# The inits set from data by a call of their own, with the call.
DATA_INITS = {
    "eva": "initialize_lora_eva_weights after get_peft_model",
    "corda": "preprocess_corda before get_peft_model",
}
PISSA_NITER = re.compile(r"pissa_niter_\d+")  # the fast-SVD PiSSA, N subspace iterations
# Argument groups: (title, description); descriptions are printed as written (<= 76 columns).
LORA_GROUP = (
    "LoRA (config file: the lora: section)",
    "The lora: section takes every LoraConfig field (docs/training.md).\n"
    "--r is the old name of --lora-r: torchrun rejects it, use --lora-r there.",
)
QUANT_GROUP = (
    "4-bit base (config file: the quantization: section)",
    "The section takes load_in_4bit, quant_type (nf4, fp4), blocksize,\n"
    "double_quant, compute_dtype, skip_modules and torch_dtype.",
)
METAVARS: dict[type, str] = {int: "N", float: "X", str: "PATH"}
USAGE_ERROR = 2
RUN_FAILED = 1


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="Fine-tune a transformers model with LoRA or QLoRA (config file and flags).",
        description="Fine-tune a transformers model with LoRA or QLoRA; flags override --config.",
        usage=USAGE,
    )
    inputs = parser.add_argument_group("run inputs")
    inputs.add_argument("--config", metavar="FILE", help="YAML or JSON file of options.")
    inputs.add_argument(
        "--model", metavar="ID", help="Model folder, or hub id (from the cache when offline)."
    )
    inputs.add_argument("--train-data", metavar="FILE", help="Rows: .jsonl, .json, .csv, .tsv.")
    inputs.add_argument("--eval-data", metavar="FILE", help="Evaluation rows, same formats.")
    inputs.add_argument(
        "--task",
        choices=tuple(AUTO_CLASSES),
        help="The model's task (default: detected from the rows).",
    )
    _add_lora_flags(parser.add_argument_group(*LORA_GROUP))
    quant = parser.add_argument_group(*QUANT_GROUP)
    quant.add_argument(
        "--load-in-4bit",
        action="store_true",
        default=None,
        help="Load the base's linear weights in 4 bits (settings: the quantization: section, "
        "else NF4 with double quantization).",
    )
    _add_train_config_flags(parser.add_argument_group("training (TrainConfig)"))
    return parser


def _add_lora_flags(group: argparse._ArgumentGroup) -> None:
    docs = attribute_docs(LoraConfig)
    defaults = {item.name: item.default for item in dataclasses.fields(LoraConfig)}
    defaults.update(LORA_DEFAULTS)

    def add(names: tuple[str, ...], dest: str, text: str, **options: Any) -> None:
        action = group.add_argument(*names, dest=dest, help=escape(text), **options)
        show_default(action, defaults[dest])

    add(("--lora-r", "--r"), "r", docs["r"], type=int, metavar="N")
    add(("--lora-alpha",), "lora_alpha", docs["lora_alpha"], type=number, metavar="X")
    add(("--lora-dropout",), "lora_dropout", docs["lora_dropout"], type=float, metavar="P")
    add(
        ("--target-modules",),
        "target_modules",
        TARGET_MODULES_HELP,
        type=split_target_modules,
        metavar="NAMES",
    )
    add(("--use-rslora",), "use_rslora", docs["use_rslora"], action="store_true", default=None)
    add(
        ("--init-lora-weights",),
        "init_lora_weights",
        docs["init_lora_weights"],
        type=_init_option,
        metavar="INIT",
    )


def _add_train_config_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per `TrainConfig` field, its help the field's docstring entry."""
    docs = attribute_docs(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        assert item.name in docs, f"TrainConfig's docstring does not document {item.name}"
        flag = "--" + item.name.replace("_", "-")
        action = group.add_argument(
            flag, help=escape(docs[item.name]), **_flag_options(hints[item.name])
        )
        show_default(action, item.default)


def _flag_options(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field of type ``hint``; every flag defaults to None (not given)."""
    if typing.get_origin(hint) is Literal:
        return {"choices": typing.get_args(hint), "default": None}
    kinds = set(typing.get_args(hint)) - {type(None)} if _is_union(hint) else {hint}
    if kinds == {bool}:
        return {"action": "store_true", "default": None}
    if kinds == {bool, str}:  # `resume`: alone it means True, with a value that checkpoint
        return {"nargs": "?", "const": True, "default": None, "metavar": "DIR"}
    (kind,) = kinds
    return {"type": kind, "default": None, "metavar": METAVARS[kind]}


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def number(text: str) -> int | float:
    """An int when the value is whole (PEFT's config files hold ``lora_alpha: 16``)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _init_option(text: str) -> bool | str:
    """``--init-lora-weights``: true/false as booleans, a method name as it is."""
    lowered = text.lower()
    if lowered not in INIT_CHOICES and not PISSA_NITER.fullmatch(lowered):
        raise argparse.ArgumentTypeError(f"use one of {', '.join(INIT_CHOICES)}")
    return {"true": True, "false": False}.get(lowered, lowered)


def _train(options: RunOptions) -> dict[str, Any]:
    transformers = import_optional("transformers", "transformers", "lorakit train")

    from .. import get_peft_model
    from ..train import Trainer
    from ..train.checkpoint import seed_everything
    from ..train.data import prepare_datasets
    from .train_model import check_model, load_base

    config = TrainConfig.from_dict(options.train)
    init = options.lora.get("init_lora_weights")
    if init in DATA_INITS:  # their data pass is a Python call this command does not make
        raise ConfigError(
            f"init_lora_weights={init!r} needs a pass over data ({DATA_INITS[init]}) that "
            "lorakit train does not run, so the adapter would start as plain LoRA. Fix: "
            "initialise it in Python and train with lorakit.train.Trainer, or use another init."
        )
    model_id = str(options.inputs["model"])
    check_model(model_id)
    lora_options = {"base_model_name_or_path": model_id, **options.lora}
    LoraConfig(**lora_options)  # a bad LoRA option fails before the data is read
    seed_everything(config.seed)  # the new classification head and LoRA init
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
    train, evaluation = prepare_datasets(
        options.inputs["train_data"],
        tokenizer,
        options.inputs.get("eval_data"),
        task=options.inputs.get("task"),
        max_length=config.max_length,
    )
    lora_config = LoraConfig(**{**lora_options, "task_type": train.task})
    base = load_base(model_id, train.task, train.id_to_label, options.quantization)
    model = get_peft_model(base, lora_config)
    return Trainer(model, tokenizer, config, train, evaluation).train()


def run_train(args: argparse.Namespace) -> int:
    """Run ``lorakit train``; return the exit status (0 ok, 1 run failed, 2 bad input)."""
    from ..train.distributed import detect_launch
    from ..train.reporting import format_summary
    from ..train.train_errors import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    flags = {key: value for key, value in vars(args).items() if key not in ("command", "config")}
    try:
        from_file = read_config_file(args.config) if args.config else {}
        summary = _train(gather_options(from_file, flags))
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
