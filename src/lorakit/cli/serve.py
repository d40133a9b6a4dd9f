"""`lorakit serve`: one base and many adapters behind an OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import LorakitError
from ..extras import import_optional
from .formatting import show_default

USAGE_ERROR = 2  # exit status of an error a person can fix
DTYPES = ("float32", "bfloat16")
PURPOSE = "lorakit serve"
# The API key from the environment keeps it out of the process list (ps shows arguments).
API_KEY_VARIABLE = "LORAKIT_API_KEY"


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="Serve a base and its adapters over an OpenAI-compatible HTTP API."
    )
    parser.add_argument(
        "--base", required=True, metavar="DIR", help="Folder of the base transformers model."
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="Load the adapter folder DIR as NAME at start (repeat for more).",
    )
    parser.add_argument(
        "--adapters-root",
        metavar="DIR",
        help="Folder POST /v1/adapters may load adapters from (off without it).",
    )
    show_default(
        parser.add_argument("--host", default="127.0.0.1", help="Address to listen on."),
        "127.0.0.1",
    )
    show_default(parser.add_argument("--port", type=int, default=8000, help="TCP port."), 8000)
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_VARIABLE),
        help="Every request must send 'Authorization: Bearer KEY'; without a key the "
        f"adapter management routes are refused (default: ${API_KEY_VARIABLE}).",
    )
    limits = (
        ("--max-batch-size", 16, "Requests decoded together."),
        ("--max-queue", 64, "Waiting requests; more are answered 429."),
        ("--max-prompt-tokens", 2048, "Longest prompt; longer ones are answered 400."),
        ("--max-tokens", 1024, "Largest max_tokens; also a chat request's default."),
    )
    for flag, default, text in limits:
        action = parser.add_argument(flag, type=int, default=default, metavar="N", help=text)
        show_default(action, default)
    dtype = parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="The base's dtype."
    )
    show_default(dtype, "float32")
    parser.add_argument(
        "--load-in-4bit", action="store_true", help="Quantize the base to NF4 (QLoRA's 4-bit)."
    )


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` arguments as {name: folder}.

    Raises:
        LorakitError: A spec lacks '=', a name is not allowed or given twice.
    """
    from ..serve.http_adapters import check_adapter_name
    from ..serve.types import BASE_ADAPTER

    adapters: dict[str, Path] = {}
    for spec in specs:
        name, separator, folder = spec.partition("=")
        if not separator or not folder:
            raise LorakitError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter sql=./sql")
        if name == BASE_ADAPTER or name in adapters:
            raise LorakitError(f"--adapter {spec!r}: the name {name!r} is taken, choose another")
        adapters[check_adapter_name(name)] = Path(folder)
    return adapters


def run_serve(args: argparse.Namespace) -> int:
    """Run `lorakit serve` until SIGINT/SIGTERM; 2 for an error a person can fix."""
    try:
        return _serve(args)
    except (LorakitError, OSError) as error:
        print(f"lorakit serve: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def _serve(args: argparse.Namespace) -> int:
    for module in ("fastapi", "uvicorn", "prometheus_client", "transformers"):
        import_optional(module, "serve", PURPOSE)  # before the model loads: fail fast
    import torch

    from ..serve.engine import Engine
    from ..serve.server import ServerOptions, run_server

    adapters = parse_adapter_specs(args.adapter)
    root = Path(args.adapters_root) if args.adapters_root is not None else None
    if root is not None and not root.is_dir():
        raise LorakitError(f"--adapters-root {root}: not a folder; create it or fix the path")
    if args.api_key == "":
        raise LorakitError(f"--api-key (or ${API_KEY_VARIABLE}) is empty; give a key or none")
    for flag in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_tokens", "port"):
        if getattr(args, flag) < 1:
            raise LorakitError(f"--{flag.replace('_', '-')} must be 1 or more")
    try:
        engine = Engine.from_pretrained(
            args.base,
            dtype=getattr(torch, args.dtype),
            load_in_4bit=args.load_in_4bit,
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_tokens,
        )
    except LorakitError:
        raise
    except ValueError as error:  # transformers: a folder without a model it knows
        raise LorakitError(f"--base {args.base}: not a transformers model ({error})") from None
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    options = ServerOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        adapters_root=root,
        chat_default_max_tokens=args.max_tokens,
    )
    run_server(engine, options)
    return 0
