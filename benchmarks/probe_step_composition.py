"""Probe (issue 12): what a DoRA step costs against a plain LoRA step, in each library.

The core benchmark model and batch (bench_dora's: hidden 512, 8 layers, batch 4 x 128,
r=16 all-linear, dropout 0, AdamW), five training steps interleaved in rounds: peft plain,
peft DoRA, lorakit plain, lorakit DoRA, and lorakit plain with every frozen base product on
F.linear (MKL) instead of oneDNN (`ops.frozen_linear`). Prints the steps and the paired ratios
that make lorakit's DoRA step / peft's: (lorakit plain / peft plain) x (lorakit DoRA / its
plain) / (peft DoRA / its plain), and oneDNN's gain inside the step.

  PYTHONPATH=$PWD/src python benchmarks/probe_step_composition.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import harness

# isort: split
from lorakit.ops import frozen_linear

BATCH, SEQ = 4, 128
LEARNING_RATE = 1e-4
NEVER = 1 << 62  # a MIN_MULTIPLY_ADDS no product reaches: every product on F.linear


def on_mkl(run: Callable[[], object]) -> Callable[[], None]:
    """`run` with every frozen base product on F.linear."""
    return harness.with_attribute(run, frozen_linear, "MIN_MULTIPLY_ADDS", NEVER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, default_reps=9)
    args = parser.parse_args()
    harness.pin_threads(args.threads)
    libs = harness.load_libs(["peft", "lorakit"])
    harness.print_machine()
    vocab_size = harness.MODEL_SIZES["small"]["vocab_size"]
    ids = harness.token_batch(vocab_size, BATCH, SEQ)
    cases = []
    for lib_name in ("peft", "lorakit"):
        for use_dora in (False, True):
            config = harness.lora_config(libs[lib_name], lora_dropout=0.0, use_dora=use_dora)
            model = libs[lib_name].get_peft_model(harness.build_llama("small"), config).train()
            name = f"{lib_name} {'DoRA' if use_dora else 'plain'}"
            cases.append(harness.training_step_case(name, model, ids, LEARNING_RATE))
    lorakit_plain = cases[2]
    cases.append(harness.Case("lorakit plain, MKL base", on_mkl(lorakit_plain.run)))
    timings = harness.run_interleaved(cases, harness.resolve_reps(args), args.warmup)
    harness.print_timings("Training steps (dropout 0)", timings, "peft plain")
    ratios = {
        "lorakit plain / peft plain": ("lorakit plain", "peft plain"),
        "lorakit DoRA / lorakit plain": ("lorakit DoRA", "lorakit plain"),
        "peft DoRA / peft plain": ("peft DoRA", "peft plain"),
        "lorakit DoRA / peft DoRA": ("lorakit DoRA", "peft DoRA"),
        "lorakit plain, oneDNN / MKL base": ("lorakit plain", "lorakit plain, MKL base"),
        "lorakit plain, MKL base / peft plain": ("lorakit plain, MKL base", "peft plain"),
    }
    print()
    for label, (name, reference) in ratios.items():
        print(f"- {label} (paired): {timings.paired_ratio(name, reference):.3f}")


if __name__ == "__main__":
    main()
