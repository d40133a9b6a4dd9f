"""The `lorakit` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import LorakitError
from .demo import add_demo_parser, run_demo
from .export import add_export_parser, run_export
from .formatting import HelpFormatter
from .inspect_model import add_inspect_parser, run_inspect
from .merge import add_merge_parser, run_merge
from .serve import add_serve_parser, run_serve
from .train import add_train_parser, run_train

USAGE_ERROR = 2  # bad input: a message, no traceback
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": run_demo,
    "train": run_train,
    "merge": run_merge,
    "inspect": run_inspect,
    "serve": run_serve,
    "export": run_export,
}
# Example command lines of each command, shown by its --help (a test parses every one).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "demo": ("lorakit demo",),
    "train": (
        "lorakit train --model ./my-model --train-data train.jsonl --lora-r 8",
        "lorakit train --config run.yaml --learning-rate 1e-4 --max-steps 200",
        "lorakit train --model org/name --train-data train.jsonl --load-in-4bit",
        "torchrun --nproc_per_node 2 -m lorakit train --config run.yaml",
    ),
    "merge": ("lorakit merge --base ./my-model --adapter run/adapter --out merged",),
    "inspect": ("lorakit inspect ./my-model --target-modules q_proj v_proj",),
    "serve": (
        "lorakit serve --base ./my-model --adapter sql=./sql --adapter chat=./chat",
        "lorakit serve --base ./my-model --adapters-root ./adapters --api-key KEY",
    ),
    "export": ("lorakit export --to openvino run/adapter adapter-openvino",),
}
MORE_HELP = "'lorakit COMMAND --help' shows a command's options and examples."


def examples_text(lines: Sequence[str]) -> str:
    """An argparse epilog listing example command lines."""
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning toolkit.",
        formatter_class=HelpFormatter,
        epilog=examples_text([lines[0] for lines in EXAMPLES.values()]) + "\n" + MORE_HELP,
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(commands)
    add_train_parser(commands)
    add_merge_parser(commands)
    add_inspect_parser(commands)
    add_serve_parser(commands)
    add_export_parser(commands)
    for name, command in commands.choices.items():
        command.formatter_class = HelpFormatter
        command.epilog = examples_text(EXAMPLES[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; an error a person can fix is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LorakitError as error:  # commands print their own; this catches the rest
        print(f"lorakit {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
