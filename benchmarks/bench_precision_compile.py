"""Issue 7, speed: a bf16 training step (lorakit vs peft vs the bf16 floor) and torch.compile.

Model: the "small" Llama-style base of the core benchmark (hidden 512, intermediate 1376,
8 layers, vocab 8000, ~33M parameters, seeded), batch 4 x 128, 2 threads, LoRA r=16 alpha=32
on all linear layers.

Sections:
  bf16     the base cast to bf16. The floor: frozen base, no LoRA, forward + a backward that
           computes only input gradients. Per library, a training step (forward + backward +
           AdamW on the adapters, which both libraries keep in fp32 on a bf16 base) with
           lora_dropout 0 and 0.05. Ratios against the floor.
  compile  fp32 base, lorakit, lora_dropout 0: an eager training step against the same step
           of `torch.compile(model)` (AdamW stays eager). The compile time (first compiled
           step, forward and backward graphs) is reported on its own, and the two models'
           first losses and gradients are compared.

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_precision_compile.py
  PYTHONPATH=$PWD/src python benchmarks/bench_precision_compile.py --sections compile \
      --backend aot_eager     # no inductor C++ build
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import harness

# isort: split
import torch

SECTIONS = ("bf16", "compile")
DROPOUTS = (0.0, 0.05)
LEARNING_RATE = 1e-4
# The fp32 core benchmark's targets for lorakit's step over the floor, shown for reference.
REFERENCE_STEP_OVER_FLOOR = {0.0: 1.10, 0.05: 1.20}
# Compiled and eager fp32 first steps: same weights and inputs, reassociated sums only.
COMPILE_LOSS_ATOL = 1e-4
COMPILE_GRAD_ATOL = 1e-4


def bf16_base() -> Any:
    return harness.build_llama("small").to(torch.bfloat16)


def floor_case(ids: torch.Tensor) -> harness.Case:
    """bf16 frozen base, no LoRA: forward plus a backward reaching only the input embeddings."""
    model = bf16_base()
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    return harness.Case("bf16 floor (frozen base)", step)


def training_step(model: Any, ids: torch.Tensor) -> Callable[[], float]:
    """forward + backward + AdamW + zero_grad on `model`'s trainable tensors; returns the loss."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bf16_case(name: str, lib: ModuleType, dropout: float, ids: torch.Tensor) -> harness.Case:
    model = lib.get_peft_model(bf16_base(), harness.lora_config(lib, lora_dropout=dropout))
    model.train()
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    print(f"{name}: adapters in {', '.join(dtypes)}")
    step = training_step(model, ids)
    loss = step()
    if not math.isfinite(loss):
        raise RuntimeError(f"{name}: non-finite loss {loss}")
    return harness.Case(name, step)


def run_bf16(libs: dict[str, ModuleType], ids: torch.Tensor, args: argparse.Namespace) -> None:
    cases = [floor_case(ids)]
    names: dict[tuple[str, float], str] = {}
    for dropout in DROPOUTS:
        for lib_name, lib in libs.items():
            names[(lib_name, dropout)] = f"{lib_name} bf16 step p={dropout:g}"
            cases.append(bf16_case(names[(lib_name, dropout)], lib, dropout, ids))
    timings = harness.run_interleaved(cases, args.reps, args.warmup)
    harness.print_timings("bf16 training step (forward + backward + AdamW)", timings, cases[0].name)
    print()
    for dropout in DROPOUTS:
        floor = timings.median(cases[0].name)
        parts = [
            f"{lib_name} {timings.median(names[(lib_name, dropout)]) / floor:.3f}"
            for lib_name in libs
        ]
        reference = REFERENCE_STEP_OVER_FLOOR[dropout]
        print(f"- p={dropout:g}, x bf16 floor: {', '.join(parts)} (fp32 target {reference:.2f})")
        if "lorakit" in libs and "peft" in libs:
            ratio = timings.paired_ratio(names[("lorakit", dropout)], names[("peft", dropout)])
            print(f"- p={dropout:g}, lorakit/peft step (paired): {ratio:.3f}")


def first_step_gradients(model: Any, ids: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    gradients = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), gradients


def check_compiled(eager: Any, compiled: Any, ids: torch.Tensor) -> float:
    """Compiles (first call), checks loss and gradients against eager; returns compile seconds."""
    eager_loss, eager_grads = first_step_gradients(eager, ids)
    start = time.perf_counter()
    compiled_loss, compiled_grads = first_step_gradients(compiled, ids)
    seconds = time.perf_counter() - start
    if abs(compiled_loss - eager_loss) > COMPILE_LOSS_ATOL:
        raise RuntimeError(f"compiled loss {compiled_loss} vs eager {eager_loss}")
    worst = max(
        (a - b).abs().max().item() for a, b in zip(eager_grads, compiled_grads, strict=True)
    )
    if worst > COMPILE_GRAD_ATOL:
        raise RuntimeError(f"compiled gradients differ from eager by {worst:.2e}")
    print(f"compiled vs eager first step: loss {compiled_loss:.6f} vs {eager_loss:.6f}, ", end="")
    print(f"gradients within {worst:.1e} ({len(eager_grads)} tensors)")
    return seconds


def run_compile(libs: dict[str, ModuleType], ids: torch.Tensor, args: argparse.Namespace) -> None:
    if "lorakit" not in libs:
        print("\n(compile section skipped: it times lorakit)")
        return
    import torch._dynamo
    from torch._dynamo.utils import counters

    lib = libs["lorakit"]
    eager = lib.get_peft_model(harness.build_llama("small"), harness.lora_config(lib))
    harness.randomize_lora_b(eager)
    eager.train()
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, backend=args.backend)
    compile_seconds = check_compiled(eager, compiled, ids)
    frames = counters["frames"]["total"]
    cases = [
        harness.Case("lorakit eager step", training_step(eager, ids)),
        harness.Case(f"lorakit compiled step ({args.backend})", training_step(compiled, ids)),
    ]
    timings = harness.run_interleaved(cases, args.reps, args.warmup)
    harness.print_timings("fp32 training step, eager vs torch.compile", timings, cases[0].name)
    recompiles = counters["frames"]["total"] - frames
    print(f"\n- compile time (first compiled step, forward + backward): {compile_seconds:.1f} s")
    print(f"- frames compiled during the timed rounds: {recompiles}")
    ratio = timings.paired_ratio(cases[1].name, cases[0].name)
    print(f"- compiled/eager step (paired): {ratio:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="bf16,compile")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    args.reps = harness.resolve_reps(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not sections or any(s not in SECTIONS for s in sections):
        raise SystemExit(f"--sections got {args.sections!r}; allowed: {', '.join(SECTIONS)}")
    harness.pin_threads(args.threads)
    libs = harness.load_libs(harness.parse_libs(args.libs))
    harness.print_machine()
    vocab_size = harness.MODEL_SIZES["small"]["vocab_size"]
    ids = harness.token_batch(vocab_size, args.batch, args.seq)
    print(f"\nbatch {args.batch} x {args.seq}, LoRA r=16 alpha=32 all-linear\n")
    if "bf16" in sections:
        run_bf16(libs, ids, args)
    if "compile" in sections:
        run_compile(libs, ids, args)


if __name__ == "__main__":
    main(sys.argv[1:])
