"""The `lorakit` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from .train import add_train_parser, run_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="LoRA on the real all-MiniLM-L6-v2: adapt, train a few steps, merge, check."
    )
    demo.add_argument("--steps", type=int, default=20, help="AdamW steps (default 20).")
    demo.add_argument("--seed", type=int, default=0)
    add_train_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(steps=args.steps, seed=args.seed)
    if args.command == "train":
        return run_train(args)
    raise AssertionError(f"unhandled command {args.command!r}")
