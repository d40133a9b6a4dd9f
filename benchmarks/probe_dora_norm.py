"""Probe (issue 12): what the DoRA norm costs inside lorakit's training step.

The core benchmark model and batch (bench_dora's: hidden 512, 8 layers, batch 4 x 128, r=16
all-linear, dropout 0, AdamW). Three steps interleaved in rounds: lorakit plain LoRA, lorakit
DoRA, and the same DoRA model with each layer's norm n = ||W + s·B A|| formed once and then
reused ("norm frozen": wrong maths after the first optimizer step, a timing device only).
Prints the paired ratios, and the time spent forming norms inside the DoRA steps (a timer
around `layers.dora._weight_norm`, which runs P = W Aᵀ and the small ops per layer).

  PYTHONPATH=$PWD/src python benchmarks/probe_dora_norm.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import harness

# isort: split
import torch

from lorakit.layers import dora as dora_layers

BATCH, SEQ = 4, 128
LEARNING_RATE = 1e-4

NormFn = Callable[..., torch.Tensor]


def timed_norm(real: NormFn, spent: list[float]) -> NormFn:
    """`real` with its wall time added to spent[-1]."""

    def norm(*args: Any) -> torch.Tensor:
        start = time.perf_counter()
        result = real(*args)
        spent[-1] += time.perf_counter() - start
        return result

    return norm


def frozen_norm(real: NormFn) -> NormFn:
    """`real` evaluated once per layer, then reused: the step without forming norms."""
    memo: dict[int, torch.Tensor] = {}

    def norm(layer: Any, *args: Any) -> torch.Tensor:
        if id(layer) not in memo:
            memo[id(layer)] = real(layer, *args)
        return memo[id(layer)]

    return norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, default_reps=15)
    args = parser.parse_args()
    harness.pin_threads(args.threads)
    lorakit = harness.load_libs(["lorakit"])["lorakit"]
    harness.print_machine()
    ids = harness.token_batch(harness.MODEL_SIZES["small"]["vocab_size"], BATCH, SEQ)
    steps = {}
    for use_dora in (False, True):
        config = harness.lora_config(lorakit, lora_dropout=0.0, use_dora=use_dora)
        model = lorakit.get_peft_model(harness.build_llama("small"), config).train()
        name = "DoRA" if use_dora else "plain"
        steps[name] = harness.training_step_case(name, model, ids, LEARNING_RATE).run
    real = dora_layers._weight_norm
    spent: list[float] = []

    timed_step = harness.with_attribute(
        steps["DoRA"], dora_layers, "_weight_norm", timed_norm(real, spent)
    )

    def dora_step() -> None:
        spent.append(0.0)
        timed_step()

    cases = [
        harness.Case("lorakit plain", steps["plain"]),
        harness.Case("lorakit DoRA", dora_step),
        harness.Case(
            "lorakit DoRA, norm frozen",
            harness.with_attribute(steps["DoRA"], dora_layers, "_weight_norm", frozen_norm(real)),
        ),
    ]
    timings = harness.run_interleaved(cases, harness.resolve_reps(args), args.warmup)
    harness.print_timings("lorakit training steps (dropout 0)", timings, "lorakit plain")
    print()
    ratios = {
        "DoRA / plain": ("lorakit DoRA", "lorakit plain"),
        "DoRA with norm frozen / DoRA": ("lorakit DoRA, norm frozen", "lorakit DoRA"),
        "DoRA with norm frozen / plain": ("lorakit DoRA, norm frozen", "lorakit plain"),
    }
    for label, (name, reference) in ratios.items():
        print(f"- {label} (paired): {timings.paired_ratio(name, reference):.3f}")
    timed = spent[args.warmup :] if len(spent) > args.warmup else spent
    print(f"- forming norms inside a DoRA step (median): {statistics.median(timed) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
