"""The `lorakit` command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from .. import __version__
from .demo import add_demo_parser, run_demo
from .inspect_model import add_inspect_parser, run_inspect
from .merge import add_merge_parser, run_merge
from .train import add_train_parser, run_train

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": run_demo,
    "train": run_train,
    "merge": run_merge,
    "inspect": run_inspect,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    add_train_parser(commands)
    add_merge_parser(commands)
    add_inspect_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
