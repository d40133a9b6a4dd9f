"""`lorakit merge`: bake an adapter into its base and write a plain transformers model."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import torch

from ..errors import LorakitError
from ..extras import import_optional
from ..io import read_adapter_config
from ..io.atomic import replace_files

USAGE_ERROR = 2  # exit status of an error a person can fix
# task_type -> transformers auto class that builds the matching head
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
# What transformers' save_pretrained names weights: one file, or shards and their index.
WEIGHT_FILE = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?"
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def add_merge_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge", help="Merge an adapter into its base and save a standalone model."
    )
    parser.add_argument("--base", required=True, help="Folder of the base transformers model.")
    parser.add_argument("--adapter", required=True, help="Adapter folder (adapter_config.json).")
    parser.add_argument("--out", required=True, help="Folder to write the merged model to.")
    parser.add_argument(
        "--safe-merge", action="store_true", help="Refuse to write NaN/inf merged weights."
    )


def load_base(base: str, task_type: str | None) -> torch.nn.Module:
    """Build the base with the head its adapter was trained with."""
    transformers = import_optional("transformers", "transformers", "lorakit merge")

    auto_class = getattr(transformers, AUTO_CLASSES.get(task_type or "", "AutoModel"))
    model: torch.nn.Module = auto_class.from_pretrained(base)
    return model


def remove_stale_weights(out: Path, written: set[str]) -> None:
    """Deletes weight files of an earlier save in `out` that this save did not write.

    An earlier sharded model's shards and index (or single file) would otherwise sit beside
    the new weights, and transformers could load the stale ones; other files are kept.
    """
    for path in out.iterdir():
        if path.name not in written and WEIGHT_FILE.fullmatch(path.name) and path.is_file():
            path.unlink()


def run_merge(args: argparse.Namespace) -> int:
    """Run `lorakit merge`; return the exit status (0 ok, 2 an error a person can fix).

    A lorakit error (a missing, corrupt or mismatched adapter) or an unreadable base is
    printed as one message, without a traceback.
    """
    try:
        return _merge(args)
    except (LorakitError, OSError) as error:
        print(f"lorakit merge: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def _merge(args: argparse.Namespace) -> int:
    from ..model import PeftModel

    task_type = read_adapter_config(args.adapter).get("task_type")
    base = load_base(args.base, task_type)
    model = PeftModel.from_pretrained(base, args.adapter)
    merged = model.merge_and_unload(safe_merge=args.safe_merge)
    out = Path(args.out)
    with replace_files(out) as staging:  # every file on disk before any replaces an old one
        merged.save_pretrained(staging)  # type: ignore[operator]
        for name in TOKENIZER_FILES:
            source = Path(args.base) / name
            if source.is_file():
                shutil.copy2(source, staging / name)
        written = {path.name for path in staging.iterdir()}
    remove_stale_weights(out, written)
    print(f"merged {args.adapter} into {args.base} -> {out}")
    return 0
