"""Frozen layers outside the adapters: a LoRA step on q_proj/v_proj only, lorakit vs peft.

With peft's default targets for Llama (q_proj, v_proj), five of the seven projections of
each block and the LM head are frozen `nn.Linear` modules that no adapter wraps. While a
lorakit `PeftModel` holds the model these run as `layers.frozen.FrozenLinear` (their product
and input-gradient on oneDNN). Model: the "small" Llama-style base (hidden 512, 8 layers,
vocab 8000, fp32, seeded), batch 4 x 128, 2 threads, LoRA r=16 alpha=32, dropout 0, AdamW.

Cases, interleaved: peft; lorakit; lorakit with `FrozenLinear.forward` swapped for
`nn.Linear.forward` (F.linear, as peft runs them). Prints the medians and the paired ratios
lorakit / peft and lorakit / lorakit-on-F.linear.

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_frozen_layers.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

import harness

# isort: split
import torch
from torch import nn

from lorakit.layers.frozen import FrozenLinear

LEARNING_RATE = 1e-4
TARGETS = ["q_proj", "v_proj"]
F_LINEAR_CASE = "lorakit, frozen layers on F.linear"


def step_case(name: str, lib: ModuleType, ids: torch.Tensor) -> harness.Case:
    """A LoRA training step with `lib` on q_proj/v_proj: forward, backward, AdamW, zero_grad."""
    config = harness.lora_config(lib, target_modules=TARGETS)
    model = lib.get_peft_model(harness.build_llama("small"), config).train()
    return harness.training_step_case(name, model, ids, LEARNING_RATE)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.reps = harness.resolve_reps(args)
    harness.pin_threads(args.threads)
    libs = harness.load_libs(harness.parse_libs(args.libs))
    harness.print_machine()
    ids = harness.token_batch(harness.MODEL_SIZES["small"]["vocab_size"], 4, 128)
    print(f"\nbatch 4 x 128, LoRA r=16 alpha=32 on {TARGETS}, dropout 0")
    cases = [step_case(name, lib, ids) for name, lib in libs.items()]
    if "lorakit" in libs:
        plain = step_case(F_LINEAR_CASE, libs["lorakit"], ids)
        run = harness.with_attribute(plain.run, FrozenLinear, "forward", nn.Linear.forward)
        cases.append(harness.Case(plain.name, run))
    timings = harness.run_interleaved(cases, args.reps, args.warmup)
    harness.print_timings("Training step (forward + backward + AdamW)", timings, cases[0].name)
    print()
    if len(libs) == 2:
        print(f"- lorakit / peft (paired): {timings.paired_ratio('lorakit', 'peft'):.3f}")
    if "lorakit" in libs:
        ratio = timings.paired_ratio("lorakit", F_LINEAR_CASE)
        print(f"- lorakit / {F_LINEAR_CASE} (paired): {ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
