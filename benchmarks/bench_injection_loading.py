"""Issue 7, speed: injecting LoRA into a 370M model and loading an adapter, lorakit vs peft.

Model: the "medium" Llama-style base (hidden 1024, intermediate 2816, 24 layers, vocab 32000,
~370M parameters, fp32, seeded), one per library; LoRA r=16 alpha=32 on all linear layers
(168 modules). Operations, interleaved round by round, medians:
  inject           get_peft_model(base, config) (A drawn, B zeroed, as for training)
  from_pretrained  PeftModel.from_pretrained(base, folder, low_cpu_mem_usage=True)
  load_adapter     model.load_adapter(folder, "second", low_cpu_mem_usage=True) on a model
                   that already has the adapter under "default"
Both libraries load the same file (saved by peft, lora_B filled with seeded noise). Between
timed calls the base is restored with `unload()` (untimed), so no base is built or copied
inside a timing. Before timing, each library's loaded model is checked against the other's
logits and against the base (the adapter must change them).

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_injection_loading.py
  python benchmarks/bench_injection_loading.py --libs peft --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import harness

# isort: split
import torch

SIZE = "medium"
OPERATIONS = ("inject", "from_pretrained", "load_adapter")
# Targets from issue 7: lorakit median / peft median in the same run.
TARGET_RATIO = {"inject": 0.25, "from_pretrained": 0.5, "load_adapter": 0.5}
# Loaded models of the two libraries compute the same fp32 function (summation order aside).
PARITY_ATOL = 1e-4
SECOND = "second"


class Holder:
    """One library's base model and whatever wraps it now; `plain()` restores the bare base."""

    def __init__(self, lib: ModuleType, base: torch.nn.Module) -> None:
        self.lib = lib
        self.base = base
        self.model: Any = None

    def plain(self) -> torch.nn.Module:
        if self.model is not None:
            self.base = self.model.unload()
            self.model = None
        return self.base


def save_reference_adapter(libs: dict[str, ModuleType], base: Any, folder: Path) -> None:
    """peft's file (or lorakit's with --libs lorakit): r=16 all-linear, noisy lora_B."""
    lib = libs.get("peft", libs.get("lorakit"))
    assert lib is not None
    model = lib.get_peft_model(base, harness.lora_config(lib))
    harness.randomize_lora_b(model)
    model.save_pretrained(str(folder))
    model.unload()
    size = sum(path.stat().st_size for path in folder.rglob("*.safetensors")) / 1e6
    print(f"adapter file: {size:.1f} MB, saved by {lib.__name__}")


def check_loaded(holders: dict[str, Holder], folder: Path, ids: torch.Tensor) -> None:
    """Raises unless every library's low_cpu_mem_usage load gives the same, non-base logits."""
    results: dict[str, torch.Tensor] = {}
    for name, holder in holders.items():
        base = holder.plain()
        with torch.no_grad():
            plain = base(input_ids=ids).logits
            holder.model = holder.lib.PeftModel.from_pretrained(
                base, str(folder), low_cpu_mem_usage=True
            )
            results[name] = holder.model(input_ids=ids).logits
        if torch.equal(results[name], plain):
            raise RuntimeError(f"{name}: the loaded adapter does not change the output")
        holder.plain()
    reference = next(iter(results.values()))
    for name, logits in results.items():
        if not torch.allclose(logits, reference, atol=PARITY_ATOL, rtol=0):
            raise RuntimeError(f"{name}: logits differ from {next(iter(results))}'s")
    print(f"loaded adapters give the same logits in: {', '.join(results)}")


def lib_cases(name: str, holder: Holder, folder: Path) -> list[harness.Case]:
    lib = holder.lib
    config = harness.lora_config(lib)
    state: dict[str, Any] = {}

    def take_base() -> None:
        state["base"] = holder.plain()

    def inject() -> None:
        holder.model = lib.get_peft_model(state.pop("base"), config)

    def from_pretrained() -> None:
        base = state.pop("base")
        holder.model = lib.PeftModel.from_pretrained(base, str(folder), low_cpu_mem_usage=True)

    def wrapped_once() -> None:
        holder.model = lib.PeftModel.from_pretrained(holder.plain(), str(folder))

    def load_adapter() -> None:
        holder.model.load_adapter(str(folder), SECOND, low_cpu_mem_usage=True)

    operations: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "inject": (inject, take_base),
        "from_pretrained": (from_pretrained, take_base),
        "load_adapter": (load_adapter, wrapped_once),
    }
    return [
        harness.Case(f"{name} {operation}", run, before)
        for operation, (run, before) in operations.items()
    ]


def print_tables(libs: dict[str, ModuleType], timings: harness.Timings) -> None:
    for operation in OPERATIONS:
        subset = {f"{lib} {operation}": timings.seconds[f"{lib} {operation}"] for lib in libs}
        reference = f"peft {operation}" if "peft" in libs else next(iter(subset))
        harness.print_timings(operation, harness.Timings(subset), reference)
    if "lorakit" not in libs or "peft" not in libs:
        return
    print()
    for operation, target in TARGET_RATIO.items():
        ratio = timings.median(f"lorakit {operation}") / timings.median(f"peft {operation}")
        verdict = "met" if ratio <= target else "NOT met"
        print(f"- lorakit/peft {operation}: {ratio:.3f} (target <= {target}): {verdict}")


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    reps = harness.resolve_reps(args)
    harness.pin_threads(args.threads)
    libs = harness.load_libs(harness.parse_libs(args.libs))
    warnings.filterwarnings("ignore")  # peft warns when a base it once wrapped is wrapped again
    harness.print_machine()
    print(f"\n{SIZE} model, LoRA r=16 alpha=32 all-linear, low_cpu_mem_usage=True for loading\n")
    holders = {name: Holder(lib, harness.build_llama(SIZE).eval()) for name, lib in libs.items()}
    vocab_size = harness.MODEL_SIZES[SIZE]["vocab_size"]
    ids = harness.token_batch(vocab_size, 1, 8)
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as workdir:
        folder = Path(workdir) / "adapter"
        save_reference_adapter(libs, next(iter(holders.values())).plain(), folder)
        check_loaded(holders, folder, ids)
        cases = [case for n, h in holders.items() for case in lib_cases(n, h, folder)]
        timings = harness.run_interleaved(cases, reps, args.warmup)
    print_tables(libs, timings)


if __name__ == "__main__":
    main(sys.argv[1:])
