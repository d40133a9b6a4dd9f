"""Issue 12, DoRA: a DoRA training step, lorakit vs peft, time (one process) and memory (children).

Model: the "small" Llama-style base of bench_core_train (hidden 512, 8 layers, vocab 8000,
fp32, seeded), batch 4 x 128, 2 threads, DoRA (use_dora=True) r=16 alpha=32 on all linear
layers, AdamW on the trainable tensors (A, B and the magnitudes).

Sections:
  time    a training step (forward + backward + AdamW) per library, lora_dropout=0 and 0.05,
          interleaved, medians; the ratio lorakit/peft per dropout (target <= 0.8).
  saved   per library and dropout, the bytes autograd keeps for backward in one forward
          (distinct storages, the model's parameters left out): the activation memory a step
          holds at its peak, measured exactly; the ratio lorakit/peft.
  memory  one fresh child per library (dropout 0.05): peak RSS over a few steps, minus the
          RSS after imports and minus the RSS after building the model (the training
          transient); the ratios lorakit/peft (target <= 0.9 on peak minus after-imports).

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_dora.py                  # both sections
  PYTHONPATH=$PWD/src python benchmarks/bench_dora.py --sections time --quick
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import harness

# isort: split
import torch

SECTIONS = ("time", "saved", "memory")
LIBS = ("peft", "lorakit")
DROPOUTS = (0.0, 0.05)
MEMORY_DROPOUT = 0.05
LEARNING_RATE = 1e-4
TARGET_STEP_VS_PEFT = 0.8
TARGET_MEMORY_VS_PEFT = 0.9


def dora_model(lib: ModuleType, dropout: float) -> Any:
    """The small base wrapped by `lib` with DoRA, in training mode."""
    config = harness.lora_config(lib, lora_dropout=dropout, use_dora=True)
    model = lib.get_peft_model(harness.build_llama("small"), config)
    return model.train()


def step_case(name: str, lib: ModuleType, dropout: float, ids: torch.Tensor) -> harness.Case:
    """A DoRA training step with `lib`: forward, backward, AdamW step, zero_grad."""
    return harness.training_step_case(name, dora_model(lib, dropout), ids, LEARNING_RATE)


def run_time(libs: dict[str, ModuleType], ids: torch.Tensor, args: argparse.Namespace) -> None:
    cases = []
    for dropout in DROPOUTS:
        for lib_name, lib in libs.items():
            cases.append(step_case(f"{lib_name} DoRA step p={dropout:g}", lib, dropout, ids))
    timings = harness.run_interleaved(cases, args.reps, args.warmup)
    harness.print_timings("DoRA training step (forward + backward + AdamW)", timings, cases[0].name)
    if len(libs) < 2:
        return
    print()
    for dropout in DROPOUTS:
        ratio = timings.median(f"lorakit DoRA step p={dropout:g}") / timings.median(
            f"peft DoRA step p={dropout:g}"
        )
        verdict = "met" if ratio <= TARGET_STEP_VS_PEFT else "NOT met"
        print(f"- lorakit/peft step p={dropout:g}: {ratio:.3f} (target <= 0.8): {verdict}")


def saved_bytes(model: Any, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (not params)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values())


def run_saved(libs: dict[str, ModuleType], ids: torch.Tensor) -> None:
    rows, saved = [], {}
    for dropout in DROPOUTS:
        for lib_name, lib in libs.items():
            saved[(lib_name, dropout)] = saved_bytes(dora_model(lib, dropout), ids)
            rows.append(
                [lib_name, f"{dropout:g}", harness.format_mib(saved[(lib_name, dropout)] / 1024)]
            )
    print("\nSaved for backward in one forward")
    harness.print_markdown_table(["library", "dropout", "saved"], rows)
    if len(libs) == 2:
        for dropout in DROPOUTS:
            ratio = saved[("lorakit", dropout)] / saved[("peft", dropout)]
            print(f"- lorakit/peft saved p={dropout:g}: {ratio:.3f}")


def child_main(args: argparse.Namespace) -> None:
    """One library in this fresh process: build, wrap, a few steps, report RSS."""
    harness.pin_threads(args.threads)
    lib = harness.load_libs([args.child])[args.child]
    rss_after_imports = harness.read_status_kib("VmRSS")
    model = dora_model(lib, MEMORY_DROPOUT)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    rss_after_model = harness.read_status_kib("VmRSS")
    ids = harness.token_batch(harness.MODEL_SIZES["small"]["vocab_size"], args.batch, args.seq)
    losses = []
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if not all(math.isfinite(value) for value in losses):
        raise RuntimeError(f"{args.child}: non-finite loss {losses}")
    harness.report_to_parent(
        {
            "rss_after_imports_kib": rss_after_imports,
            "rss_after_model_kib": rss_after_model,
            "losses": losses,
        }
    )


def run_memory(libs: Sequence[str], args: argparse.Namespace) -> None:
    def argv_of(lib_name: str) -> list[str]:
        argv = [str(Path(__file__).resolve()), "--child", lib_name, "--steps", str(args.steps)]
        return [*argv, "--batch", str(args.batch), "--seq", str(args.seq)]

    results = harness.run_children(libs, argv_of)
    rows, extra = [], {}
    for lib_name, result in results.items():
        report = result.report
        over_imports = result.peak_rss_kib - report["rss_after_imports_kib"]
        over_model = result.peak_rss_kib - report["rss_after_model_kib"]
        extra[lib_name] = (over_imports, over_model)
        rows.append(
            [
                lib_name,
                harness.format_mib(result.peak_rss_kib),
                harness.format_mib(over_imports),
                harness.format_mib(over_model),
            ]
        )
    print(f"\nPeak RSS over {args.steps} DoRA steps (dropout {MEMORY_DROPOUT})")
    harness.print_markdown_table(["library", "peak", "peak - imports", "peak - model"], rows)
    if len(results) == 2:
        imports_ratio = extra["lorakit"][0] / extra["peft"][0]
        model_ratio = extra["lorakit"][1] / extra["peft"][1]
        verdict = "met" if imports_ratio <= TARGET_MEMORY_VS_PEFT else "NOT met"
        print(f"\n- lorakit/peft peak - imports: {imports_ratio:.3f} (target <= 0.9): {verdict}")
        print(f"- lorakit/peft peak - model (training transient): {model_ratio:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="time,saved,memory")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="memory: steps per child")
    parser.add_argument("--child", choices=LIBS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child_main(args)
        return
    args.reps = harness.resolve_reps(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not sections or any(s not in SECTIONS for s in sections):
        raise SystemExit(f"--sections got {args.sections!r}; allowed: {', '.join(SECTIONS)}")
    harness.pin_threads(args.threads)
    names = [name for name in harness.parse_libs(args.libs) if name in LIBS]
    libs = harness.load_libs(names)
    harness.print_machine()
    print(f"\nbatch {args.batch} x {args.seq}, DoRA r=16 alpha=32 all-linear")
    ids = harness.token_batch(harness.MODEL_SIZES["small"]["vocab_size"], args.batch, args.seq)
    if "time" in sections:
        run_time(libs, ids, args)
    if "saved" in sections:
        run_saved(libs, ids)
    if "memory" in sections:
        run_memory(list(libs), args)


if __name__ == "__main__":
    main(sys.argv[1:])
