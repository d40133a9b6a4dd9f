"""Issue 6, memory: peak RSS of QLoRA training against LoRA on the fp32 base, one process each.

Model: the "medium" Llama-style base (hidden 1024, intermediate 2816, 24 layers, vocab 32000,
~370M parameters, seeded), batch 2 x 128, AdamW, activation checkpointing on in both cases,
lorakit LoRA r=16 alpha=32 all-linear, lora_dropout 0.05. Cases:
  lora   the fp32 base built from its config in the child (the smallest way to hold it)
  qlora  the same base saved once with save_pretrained (by a child of its own), loaded
         with lorakit.quant.load_quantized: NF4, blocks of 64, double quantization, fp32
         compute, lm_head kept in fp32. Each linear weight is quantized as it is read, so the
         fp32 model is never resident.
  *-released  the same after `lorakit.utils.release_freed_blocks()` (glibc's mmap threshold
         pinned at 1 MiB before the model is built), the setting docs/qlora.md recommends
         when memory limits a run.
The checkpoint is synced and dropped from the page cache after it is written (unless
--warm-checkpoint), so the qlora child reads it as it would a checkpoint written earlier:
pages cached by the write are mapped in larger pieces, which made the untouched rows of the
fp32 embedding (read through the file mapping) resident too, ~100 MiB more peak here.
Each child reports its RSS after its imports, after building (and wrapping) the model, and
its peak (VmHWM); the parent also reads the child's peak from wait4's rusage. The figure of
merit is peak minus after-imports, qlora over lora (target <= 0.40); the step-time ratio is
the median step of qlora over that of lora (same steps, same batch).

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_qlora_memory.py
  PYTHONPATH=$PWD/src python benchmarks/bench_qlora_memory.py --quick --size small
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness

# isort: split
import torch

from bench_core_memory import enable_checkpointing, train_and_report

CASES = ("lora", "qlora", "lora-released", "qlora-released")
RELEASED = "-released"
LORA_DROPOUT = 0.05
TARGET_QLORA_OVER_LORA = 0.40
DEFAULT_STEPS = 3
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(args: argparse.Namespace) -> tuple[Any, int]:
    """The base of a case, and the bytes its quantized linear weights take (0 for lora)."""
    if args.child.removesuffix(RELEASED) == "lora":
        return harness.build_llama(args.size), 0
    from lorakit.quant import QuantConfig, QuantLinear, load_quantized

    config = QuantConfig(
        quant_type="nf4",
        blocksize=64,
        double_quant=True,
        compute_dtype=COMPUTE_DTYPES[args.compute_dtype],
    )
    model: Any = load_quantized(args.checkpoint, config, torch_dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    stored = sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantLinear))
    return model, stored


def child_main(args: argparse.Namespace) -> None:
    """One case in this (fresh) process: build, wrap, train a few steps, report RSS."""
    harness.pin_threads(args.threads)
    # Both cases import the same modules before the baseline, the model's code included
    # (transformers imports it lazily, ~150 MiB, which would otherwise count as model).
    from transformers import LlamaForCausalLM  # noqa: F401

    import lorakit
    import lorakit.quant
    import lorakit.utils

    if args.child.endswith(RELEASED) and not lorakit.utils.release_freed_blocks():
        raise SystemExit("release_freed_blocks() needs glibc")
    rss_after_imports = harness.read_status_kib("VmRSS")
    model, quantized_bytes = build_model(args)
    enable_checkpointing(model)
    model = lorakit.get_peft_model(model, harness.lora_config(lorakit, lora_dropout=LORA_DROPOUT))
    train_and_report(model, args, rss_after_imports, quantized_bytes=quantized_bytes)


def save_checkpoint(args: argparse.Namespace) -> None:
    """Child "save": the seeded fp32 base, saved once for the qlora case.

    It runs in a child of its own: Linux carries a process's peak RSS over fork and exec into
    the child's rusage, so a parent that had held the fp32 model would set the peak that
    wait4 reports for every case started after it.
    """
    model = harness.build_llama(args.size)
    model.save_pretrained(args.checkpoint)
    harness.report_to_parent({"case": "save"})


def child_argv(case: str, args: argparse.Namespace, checkpoint: Path) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--child", case, "--steps", str(args.steps)]
    argv += ["--batch", str(args.batch), "--seq", str(args.seq), "--size", args.size]
    argv += ["--threads", str(args.threads), "--compute-dtype", args.compute_dtype]
    return [*argv, "--checkpoint", str(checkpoint)]


def extra_kib(result: harness.ChildResult) -> int:
    """Peak RSS above RSS after imports: what the model and its training cost."""
    return result.peak_rss_kib - int(result.report["rss_after_imports_kib"])


def print_results(results: dict[str, harness.ChildResult]) -> None:
    headers = ["case", "peak RSS", "after imports", "after model", "peak - imports"]
    headers += ["trainable", "4-bit weights", "s/step (median)", "losses"]
    rows = []
    for case, result in results.items():
        report = result.report
        rows.append(
            [
                case,
                harness.format_mib(result.peak_rss_kib),
                harness.format_mib(report["rss_after_imports_kib"]),
                harness.format_mib(report["rss_after_model_kib"]),
                harness.format_mib(extra_kib(result)),
                f"{report['trainable_parameters']:,}",
                harness.format_mib(report["quantized_bytes"] / 1024),
                f"{statistics.median(report['step_seconds']):.2f}",
                ", ".join(f"{loss:.4f}" for loss in report["losses"]),
            ]
        )
    harness.print_markdown_table(headers, rows)
    for case, result in results.items():
        if abs(result.peak_rss_kib - result.report["vmhwm_kib"]) > 0.02 * result.peak_rss_kib:
            print(f"note: {case}: wait4 peak and the child's own VmHWM differ by more than 2 %")
    print()
    for lora_case, qlora_case in (
        ("lora", "qlora"),
        ("lora-released", "qlora-released"),
        ("lora", "qlora-released"),
    ):
        if {lora_case, qlora_case} <= results.keys():
            print_ratio(results[lora_case], results[qlora_case], f"{qlora_case}/{lora_case}")


def print_ratio(lora: harness.ChildResult, qlora: harness.ChildResult, label: str) -> None:
    ratio = extra_kib(qlora) / extra_kib(lora)
    verdict = "met" if ratio <= TARGET_QLORA_OVER_LORA else "NOT met"
    step_ratio = statistics.median(qlora.report["step_seconds"]) / statistics.median(
        lora.report["step_seconds"]
    )
    print(
        f"- {label}: peak minus after-imports {ratio:.3f} (target <= {TARGET_QLORA_OVER_LORA}:"
        f" {verdict}), peak RSS {qlora.peak_rss_kib / lora.peak_rss_kib:.3f},"
        f" median step time {step_ratio:.2f}"
    )


def drop_from_page_cache(folder: Path) -> None:
    """Write the folder's files back and drop their cached pages (Linux; a hint elsewhere)."""
    os.sync()
    for path in folder.iterdir():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def parent_main(args: argparse.Namespace) -> None:
    cases = harness.parse_cases(args.cases, CASES)
    harness.pin_threads(args.threads)
    harness.load_libs(["lorakit"])  # fail here, not in a child, when lorakit is missing
    harness.print_machine()
    print(
        f"\n{args.size} model, batch {args.batch} x {args.seq}, {args.steps} AdamW steps, LoRA"
        f" r=16 all-linear dropout {LORA_DROPOUT}, activation checkpointing on, qlora: NF4"
        f" double quant, {args.compute_dtype} compute\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench_qlora_") as folder:
        checkpoint = Path(folder)
        if any(case.startswith("qlora") for case in cases):
            argv = [str(Path(__file__).resolve()), "--child", "save", "--size", args.size]
            saved = harness.run_child([*argv, "--checkpoint", str(checkpoint)])
            print(f"checkpoint: saved in {saved.wall_seconds:.1f} s", flush=True)
            if not args.warm_checkpoint:
                drop_from_page_cache(checkpoint)
        results = harness.run_children(cases, lambda case: child_argv(case, args, checkpoint))
    print()
    print_results(results)


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=",".join(CASES))
    parser.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_STEPS}")
    parser.add_argument("--quick", action="store_true", help="1 training step per case")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--size", choices=sorted(harness.MODEL_SIZES), default="medium")
    parser.add_argument("--threads", type=int, default=harness.DEFAULT_THREADS)
    parser.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default="fp32")
    parser.add_argument(
        "--warm-checkpoint", action="store_true", help="keep the written checkpoint cached"
    )
    parser.add_argument("--child", choices=(*CASES, "save"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 1 if args.quick else DEFAULT_STEPS
    if args.steps < 1:
        raise SystemExit(f"--steps got {args.steps}; it must be at least 1")
    return args


def main(argv: Sequence[str]) -> None:
    args: Any = parse_arguments(argv)
    if args.child == "save":
        save_checkpoint(args)
    elif args.child is not None:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
