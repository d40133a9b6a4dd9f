"""`lorakit export`: write a copy of an adapter that another runtime runs as trained."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import LorakitError

USAGE_ERROR = 2  # exit status of an error a person can fix


def _to_openvino(adapter_dir: str, out_dir: str) -> Path:
    from ..export import to_openvino

    return to_openvino(adapter_dir, out_dir)


# --to value -> exporter(adapter folder, output folder) and how the copy is used.
EXPORTERS: dict[str, tuple[Callable[[str, str], Path], str]] = {
    "openvino": (
        _to_openvino,
        "OpenVINO GenAI: openvino_genai.Adapter('{out}/adapter_model.safetensors') at alpha 1.0",
    ),
}


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="Write a copy of an adapter for another runtime (scale folded in)."
    )
    parser.add_argument(
        "--to", required=True, choices=sorted(EXPORTERS), help="The runtime to export for."
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="Adapter folder to export.")
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="Folder to write (new, empty, or an earlier export)."
    )


def run_export(args: argparse.Namespace) -> int:
    """Run `lorakit export`; return the exit status (0 ok, 2 an error a person can fix)."""
    export, usage = EXPORTERS[args.to]
    try:
        out = export(args.adapter_dir, args.out_dir)
    except (LorakitError, OSError) as error:
        print(f"lorakit export: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(f"exported {args.adapter_dir} for {args.to} -> {out}; use it as {usage.format(out=out)}")
    return 0
