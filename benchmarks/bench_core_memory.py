"""Issue 2, memory: peak RSS of a few training steps, one fresh process per case.

Model: the "medium" Llama-style base (hidden 1024, intermediate 2816, 24 layers, vocab 32000,
~370M parameters, fp32, seeded), batch 2 x 128, AdamW. Cases:
  full     full fine-tuning (every parameter trains)
  peft     peft LoRA, r=16 alpha=32 all-linear, lora_dropout=0.05
  lorakit  lorakit LoRA, same config
Each case runs in its own child process, which reports its RSS right after its imports, after
building (and wrapping) the model, and its peak (VmHWM); the parent also reads the child's peak
from wait4's rusage. The table shows peak, after-imports, peak minus after-imports, and the
ratios lorakit/peft and case/full. With --grad-ckpt the base gets activation checkpointing
(inputs made to require grad) before it is wrapped.

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_core_memory.py              # all three cases
  PYTHONPATH=$PWD/src python benchmarks/bench_core_memory.py --grad-ckpt
  python benchmarks/bench_core_memory.py --cases full,peft --quick        # 1 step, no lorakit
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness

# isort: split
import torch

CASES = ("full", "peft", "lorakit")
LEARNING_RATE = 1e-5
LORA_DROPOUT = 0.05
TARGET_LORAKIT_OVER_PEFT = 0.8
DEFAULT_STEPS = 3


def enable_checkpointing(model: Any) -> None:
    """Turns on activation checkpointing and makes the embeddings' output require grad.

    With a frozen base nothing entering a checkpointed block requires grad, so the block's
    adapters would get no gradient without the input hook.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers before activation_checkpointing_enable existed
        enable = model.gradient_checkpointing_enable
    enable()
    model.enable_input_require_grads()


def check_gradients_arrived(model: torch.nn.Module) -> None:
    """Raises if a trainable tensor got no gradient (e.g. checkpointing cut the graph)."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"{len(missing)} trainable tensors got no gradient, e.g. {missing[:3]}")


def train_steps(
    model: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor, steps: int, case: str
) -> tuple[list[float], list[float]]:
    """(losses, seconds) of `steps` causal-LM AdamW steps on `ids`; checks gradients arrive."""
    losses: list[float] = []
    step_seconds: list[float] = []
    for step in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            check_gradients_arrived(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    if not all(math.isfinite(value) for value in losses):
        raise RuntimeError(f"{case}: non-finite loss {losses}")
    return losses, step_seconds


def child_main(args: argparse.Namespace) -> None:
    """One case in this (fresh) process: build, wrap, train a few steps, report RSS."""
    harness.pin_threads(args.threads)
    importlib.import_module("transformers")
    lib = None if args.child == "full" else harness.load_libs([args.child])[args.child]
    rss_after_imports = harness.read_status_kib("VmRSS")

    model = harness.build_llama(args.size)
    if args.grad_ckpt:
        enable_checkpointing(model)
    if lib is not None:
        config = harness.lora_config(lib, lora_dropout=LORA_DROPOUT)
        model = lib.get_peft_model(model, config)
    all_parameters = sum(p.numel() for p in model.parameters())
    train_and_report(model, args, rss_after_imports, all_parameters=all_parameters)


def train_and_report(
    model: Any, args: argparse.Namespace, rss_after_imports: int, **extra: object
) -> None:
    """A child's common tail: AdamW on the trainable tensors, `args.steps` steps, the report.

    Reports the RSS after imports, after the model and optimizer, the peak (VmHWM), the
    trainable count, losses and step times, plus `extra`.
    """
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    rss_after_model = harness.read_status_kib("VmRSS")
    vocab_size = harness.MODEL_SIZES[args.size]["vocab_size"]
    ids = harness.token_batch(vocab_size, args.batch, args.seq)
    losses, step_seconds = train_steps(model, optimizer, ids, args.steps, args.child)
    report = {
        "case": args.child,
        "rss_after_imports_kib": rss_after_imports,
        "rss_after_model_kib": rss_after_model,
        "vmhwm_kib": harness.read_status_kib("VmHWM"),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "losses": losses,
        "step_seconds": step_seconds,
    }
    harness.report_to_parent({**report, **extra})


def child_argv(case: str, args: argparse.Namespace) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--child", case, "--steps", str(args.steps)]
    argv += ["--batch", str(args.batch), "--seq", str(args.seq), "--size", args.size]
    argv += ["--threads", str(args.threads)]
    return [*argv, "--grad-ckpt"] if args.grad_ckpt else argv


def print_results(results: dict[str, harness.ChildResult]) -> None:
    headers = ["case", "peak RSS", "after imports", "after model", "peak - imports"]
    headers += ["x full (peak-imp)", "trainable", "s/step (median)"]
    rows = []
    full = results.get("full")
    for case, result in results.items():
        report = result.report
        extra = result.peak_rss_kib - report["rss_after_imports_kib"]
        versus_full = "-"
        if full is not None:
            full_extra = full.peak_rss_kib - full.report["rss_after_imports_kib"]
            versus_full = f"{extra / full_extra:.3f}"
        rows.append(
            [
                case,
                harness.format_mib(result.peak_rss_kib),
                harness.format_mib(report["rss_after_imports_kib"]),
                harness.format_mib(report["rss_after_model_kib"]),
                harness.format_mib(extra),
                versus_full,
                f"{report['trainable_parameters']:,}",
                f"{sorted(report['step_seconds'])[len(report['step_seconds']) // 2]:.2f}",
            ]
        )
    harness.print_markdown_table(headers, rows)
    for case, result in results.items():
        if abs(result.peak_rss_kib - result.report["vmhwm_kib"]) > 0.02 * result.peak_rss_kib:
            print(f"note: {case}: wait4 peak and the child's own VmHWM differ by more than 2 %")
    if "lorakit" in results and "peft" in results:
        lorakit, peft = results["lorakit"], results["peft"]
        peak_ratio = lorakit.peak_rss_kib / peft.peak_rss_kib
        extra_ratio = (lorakit.peak_rss_kib - lorakit.report["rss_after_imports_kib"]) / (
            peft.peak_rss_kib - peft.report["rss_after_imports_kib"]
        )
        verdict = "met" if peak_ratio <= TARGET_LORAKIT_OVER_PEFT else "NOT met"
        print(f"\n- lorakit/peft peak RSS: {peak_ratio:.3f} (target <= 0.8): {verdict}")
        print(f"- lorakit/peft peak minus after-imports: {extra_ratio:.3f}")


def parent_main(args: argparse.Namespace) -> None:
    cases = harness.parse_cases(args.cases, CASES)
    harness.pin_threads(args.threads)
    libs = [case for case in cases if case != "full"]
    harness.load_libs(libs)  # fail here, not in a child, when a library is missing
    harness.print_machine()
    checkpointing = "on" if args.grad_ckpt else "off"
    print(
        f"\n{args.size} model, batch {args.batch} x {args.seq}, {args.steps} AdamW steps,"
        f" LoRA r=16 all-linear dropout {LORA_DROPOUT}, activation checkpointing {checkpointing}\n"
    )
    results = harness.run_children(cases, lambda case: child_argv(case, args))
    print()
    print_results(results)


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="full,peft,lorakit")
    parser.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_STEPS}")
    parser.add_argument("--quick", action="store_true", help="1 training step per case")
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--size", choices=sorted(harness.MODEL_SIZES), default="medium")
    parser.add_argument("--threads", type=int, default=harness.DEFAULT_THREADS)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 1 if args.quick else DEFAULT_STEPS
    if args.steps < 1:
        raise SystemExit(f"--steps got {args.steps}; it must be at least 1")
    return args


def main(argv: Sequence[str]) -> None:
    args: Any = parse_arguments(argv)
    if args.child is not None:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
