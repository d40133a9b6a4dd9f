"""Issue 6, LoftQ memory: peak RSS of LoftQ initialisation, one fresh process per case.

Model: the "medium" Llama-style base (hidden 1024, intermediate 2816, 24 layers, vocab 32000,
~370M parameters, fp32, seeded), built from a config. Cases:
  build    build the model only (the reference: what building it costs by itself)
  qlora    quantize every linear layer but the head (NF4, blocks of 64, double quantization),
           then plain LoRA r=16 alpha=32 all-linear
  loftq    get_peft_model with init_lora_weights="loftq", r=16 alpha=32 all-linear,
           LoftQConfig(loftq_iter=1 unless --loftq-iter): each targeted layer is quantized,
           fitted by SVD and replaced one at a time
Each case runs in its own child process, which reports its RSS right after its imports, after
building the model, and after wrapping it; the parent reads the child's peak from wait4's
rusage. The table gives the peak above the RSS after imports and above the RSS after the
model was built, both as multiples of the fp32 model's size (4 bytes per parameter). The
target (issue 6) is a LoftQ peak above after-imports of at most 1.5 x the fp32 model.
peft's LoftQ (peft.utils.loftq_utils.loftq_init) moves weights to CUDA unconditionally, so it
has no CPU case here.

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_loftq_memory.py
  PYTHONPATH=$PWD/src python benchmarks/bench_loftq_memory.py --cases loftq --size small
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness

# isort: split
import torch

CASES = ("build", "qlora", "loftq")
TARGET_PEAK_OVER_FP32 = 1.5
FP32_BYTES = 4


def wrap(case: str, model: Any, loftq_iter: int) -> Any:
    """Applies the case's quantization and adapter to `model`; returns the model to keep."""
    lorakit = importlib.import_module("lorakit")
    quant = importlib.import_module("lorakit.quant")
    if case == "qlora":
        quant.quantize_model_linears(model, quant.QuantConfig())
        return lorakit.get_peft_model(model, harness.lora_config(lorakit))
    if case == "loftq":
        config = harness.lora_config(
            lorakit,
            init_lora_weights="loftq",
            loftq_config=lorakit.LoftQConfig(loftq_iter=loftq_iter),
        )
        return lorakit.get_peft_model(model, config)
    return model


def child_main(args: argparse.Namespace) -> None:
    """One case in this (fresh) process: build, wrap, report RSS."""
    harness.pin_threads(args.threads)
    importlib.import_module("transformers")
    harness.load_libs(["lorakit"])
    quant = importlib.import_module("lorakit.quant")
    rss_after_imports = harness.read_status_kib("VmRSS")

    model = harness.build_llama(args.size)
    parameters = sum(p.numel() for p in model.parameters())
    gc.collect()
    rss_after_model = harness.read_status_kib("VmRSS")
    peak_after_model = harness.read_status_kib("VmHWM")

    start = time.perf_counter()
    with torch.no_grad():
        model = wrap(args.child, model, args.loftq_iter)
    seconds = time.perf_counter() - start
    gc.collect()
    quantized = sum(isinstance(m, quant.QuantLinear) for m in model.modules())
    harness.report_to_parent(
        {
            "case": args.child,
            "fp32_model_kib": parameters * FP32_BYTES / 1024,
            "rss_after_imports_kib": rss_after_imports,
            "rss_after_model_kib": rss_after_model,
            "vmhwm_after_model_kib": peak_after_model,
            "rss_after_wrap_kib": harness.read_status_kib("VmRSS"),
            "vmhwm_kib": harness.read_status_kib("VmHWM"),
            "quantized_layers": quantized,
            "wrap_seconds": seconds,
        }
    )


def child_argv(case: str, args: argparse.Namespace) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--child", case, "--size", args.size]
    return [*argv, "--threads", str(args.threads), "--loftq-iter", str(args.loftq_iter)]


def print_results(results: dict[str, harness.ChildResult]) -> None:
    headers = ["case", "peak RSS", "after imports", "after model", "after wrap"]
    headers += ["peak - imports", "x fp32", "peak - model", "x fp32", "4-bit layers", "wrap s"]
    rows = []
    for case, result in results.items():
        report = result.report
        fp32 = report["fp32_model_kib"]
        above_imports = result.peak_rss_kib - report["rss_after_imports_kib"]
        above_model = result.peak_rss_kib - report["rss_after_model_kib"]
        rows.append(
            [
                case,
                harness.format_mib(result.peak_rss_kib),
                harness.format_mib(report["rss_after_imports_kib"]),
                harness.format_mib(report["rss_after_model_kib"]),
                harness.format_mib(report["rss_after_wrap_kib"]),
                harness.format_mib(above_imports),
                f"{above_imports / fp32:.3f}",
                harness.format_mib(above_model),
                f"{above_model / fp32:.3f}",
                str(report["quantized_layers"]),
                f"{report['wrap_seconds']:.1f}",
            ]
        )
    harness.print_markdown_table(headers, rows)
    for case, result in results.items():
        report = result.report
        if abs(result.peak_rss_kib - report["vmhwm_kib"]) > 0.02 * result.peak_rss_kib:
            print(f"note: {case}: wait4 peak and the child's own VmHWM differ by more than 2 %")
        if report["vmhwm_after_model_kib"] >= 0.98 * result.peak_rss_kib:
            print(f"note: {case}: the peak was reached while building the model, not after")
    if "loftq" in results:
        loftq = results["loftq"]
        fp32 = loftq.report["fp32_model_kib"]
        ratio = (loftq.peak_rss_kib - loftq.report["rss_after_imports_kib"]) / fp32
        verdict = "met" if ratio <= TARGET_PEAK_OVER_FP32 else "NOT met"
        print(
            f"\n- fp32 model: {harness.format_mib(fp32)}; LoftQ peak above after-imports: "
            f"{ratio:.3f} x fp32 (target <= {TARGET_PEAK_OVER_FP32}): {verdict}"
        )


def parent_main(args: argparse.Namespace) -> None:
    cases = harness.parse_cases(args.cases, CASES)
    harness.pin_threads(args.threads)
    harness.load_libs(["lorakit"])  # fail here, not in a child, when lorakit is missing
    harness.print_machine()
    print(
        f"\n{args.size} model (fp32), LoRA r=16 alpha=32 all-linear, NF4 blocks of 64 with "
        f"double quantization, loftq_iter={args.loftq_iter}\n"
    )
    results = harness.run_children(cases, lambda case: child_argv(case, args))
    print()
    print_results(results)


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="build,qlora,loftq")
    parser.add_argument("--size", choices=sorted(harness.MODEL_SIZES), default="medium")
    parser.add_argument("--loftq-iter", type=int, default=1)
    parser.add_argument("--threads", type=int, default=harness.DEFAULT_THREADS)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loftq_iter < 1:
        raise SystemExit(f"--loftq-iter got {args.loftq_iter}; it must be at least 1")
    return args


def main(argv: Sequence[str]) -> None:
    args: Any = parse_arguments(argv)
    if args.child is not None:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
