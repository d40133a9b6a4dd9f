"""The `lorakit` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from .demo import add_demo_parser, run_demo
from .inspect_model import add_inspect_parser, run_inspect
from .merge import add_merge_parser, run_merge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    add_merge_parser(commands)
    add_inspect_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "merge":
        return run_merge(args)
    if args.command == "inspect":
        return run_inspect(args)
    raise AssertionError(f"unhandled command {args.command!r}")
