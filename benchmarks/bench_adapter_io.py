"""Issue 3, speed: saving, wrapping, loading and switching adapters, lorakit vs peft.

Model: the "small" Llama-style base (~33M parameters) with an all-linear r=16 adapter (~5 MB).
Each library saves and loads its own files. A fresh base for every timed call is a deep copy of
one seeded template, made outside the timing. Operations:
  save           PeftModel.save_pretrained(new folder)
  wrap           get_peft_model(fresh base, config)
  from_pretrained  PeftModel.from_pretrained(fresh base, folder)
  load_adapter   load_adapter(second folder, "second") on a model loaded from the first
  set_adapter    switching among 8 loaded adapters, time per switch
All operations of all libraries are interleaved round by round; one table per operation shows
the ratio to peft.

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_adapter_io.py
  python benchmarks/bench_adapter_io.py --libs peft --quick
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from itertools import cycle
from pathlib import Path
from types import ModuleType
from typing import Any

import harness

# isort: split
import torch

ADAPTER_COUNT = 8
SWITCHES_PER_ROUND = 10 * ADAPTER_COUNT
# Calls per round of the millisecond operations (each after its own untimed preparation): a
# round's mean over a few calls is steadier than one call on a shared machine.
CALLS_PER_ROUND = 3
DEFAULT_REPS = 9
OPERATIONS = ("save", "wrap", "from_pretrained", "load_adapter", "set_adapter")
# Targets from issue 3: lorakit time / peft time, or absolute seconds for a switch.
TARGET_RATIO = {"save": 1.0, "from_pretrained": 0.5, "load_adapter": 0.5}
TARGET_SWITCH_SECONDS = 1e-3
# A reloaded adapter must reproduce the saved model's logits (fp32, same order of operations).
RELOAD_CHECK_ATOL = 1e-6


class Fixture:
    """A template base, probe input and, per library, two saved adapters and a wrapped model."""

    def __init__(self, libs: dict[str, ModuleType], workdir: Path) -> None:
        self.template = harness.build_llama("small").eval()
        vocab_size = harness.MODEL_SIZES["small"]["vocab_size"]
        self.ids = harness.token_batch(vocab_size, 1, 16)
        self.workdir = workdir
        self.saved: dict[str, Any] = {}
        self.folders: dict[str, list[Path]] = {}
        for lib_name, lib in libs.items():
            self.folders[lib_name] = []
            for seed in (0, 1):
                model = self.wrap(lib, seed)
                folder = workdir / lib_name / f"adapter{seed}"
                model.save_pretrained(str(folder))
                self.folders[lib_name].append(folder)
                if seed == 0:
                    self.saved[lib_name] = model

    def fresh_base(self) -> Any:
        return copy.deepcopy(self.template)

    def wrap(self, lib: ModuleType, seed: int) -> Any:
        model = lib.get_peft_model(self.fresh_base(), harness.lora_config(lib))
        harness.randomize_lora_b(model, seed=seed)
        return model.eval()

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=self.ids).logits


def check_reload(fixture: Fixture, lib_name: str, lib: ModuleType) -> None:
    """Raises unless loading the saved adapter onto a fresh base gives the saved model's logits."""
    loaded = lib.PeftModel.from_pretrained(fixture.fresh_base(), str(fixture.folders[lib_name][0]))
    expected = fixture.logits(fixture.saved[lib_name])
    if not torch.allclose(fixture.logits(loaded), expected, atol=RELOAD_CHECK_ATOL, rtol=0):
        raise RuntimeError(f"{lib_name}: a reloaded adapter does not reproduce the saved model")
    sizes = [
        f"{sum(f.stat().st_size for f in folder.rglob('*.safetensors')) / 1e6:.2f} MB"
        for folder in fixture.folders[lib_name]
    ]
    print(f"{lib_name}: adapter files {', '.join(sizes)}; reload reproduces the logits")


def lib_cases(fixture: Fixture, lib_name: str, lib: ModuleType) -> list[harness.Case]:
    """The five timed operations for one library; `state` carries objects between calls."""
    state: dict[str, Any] = {}
    first, second = (str(folder) for folder in fixture.folders[lib_name])
    target = fixture.workdir / lib_name / "save_target"
    config = harness.lora_config(lib)

    def clear_target() -> None:
        shutil.rmtree(target, ignore_errors=True)

    def new_base() -> None:
        state["base"] = fixture.fresh_base()

    def loaded_model() -> None:
        state["model"] = lib.PeftModel.from_pretrained(fixture.fresh_base(), first)

    def save() -> None:
        fixture.saved[lib_name].save_pretrained(str(target))

    def load_second() -> None:
        state["model"].load_adapter(second, "second")

    def wrap() -> None:
        state["model"] = lib.get_peft_model(state.pop("base"), config)

    def from_pretrained() -> None:
        state["model"] = lib.PeftModel.from_pretrained(state.pop("base"), first)

    switcher = many_adapters(lib, fixture.fresh_base(), [first, second])
    calls = CALLS_PER_ROUND
    operations: dict[str, tuple[Callable[[], object], Callable[[], object] | None, int]] = {
        "save": (save, clear_target, calls),
        "wrap": (wrap, new_base, calls),
        "from_pretrained": (from_pretrained, new_base, calls),
        "load_adapter": (load_second, loaded_model, calls),
        "set_adapter": (switcher, None, SWITCHES_PER_ROUND),
    }
    return [
        harness.Case(f"{lib_name} {name}", run, before, number)
        for name, (run, before, number) in operations.items()
    ]


def many_adapters(lib: ModuleType, base: torch.nn.Module, folders: list[str]) -> Callable[[], None]:
    """Loads ADAPTER_COUNT adapters (alternating files) and returns a call that switches to the
    next one in turn."""
    model = lib.PeftModel.from_pretrained(base, folders[0], adapter_name="adapter0")
    names = ["adapter0"]
    for index in range(1, ADAPTER_COUNT):
        names.append(f"adapter{index}")
        model.load_adapter(folders[index % len(folders)], names[-1])
    order = cycle(names[1:] + names[:1])

    def switch() -> None:
        model.set_adapter(next(order))

    return switch


def print_tables(libs: dict[str, ModuleType], timings: harness.Timings) -> None:
    for operation in OPERATIONS:
        subset = {f"{lib} {operation}": timings.seconds[f"{lib} {operation}"] for lib in libs}
        reference = f"peft {operation}" if "peft" in libs else next(iter(subset))
        unit = " (per switch)" if operation == "set_adapter" else ""
        harness.print_timings(f"{operation}{unit}", harness.Timings(subset), reference)
    if "lorakit" not in libs:
        return
    print()
    if "peft" in libs:
        for operation, target in TARGET_RATIO.items():
            ratio = timings.median(f"lorakit {operation}") / timings.median(f"peft {operation}")
            verdict = "met" if ratio <= target else "NOT met"
            print(f"- lorakit/peft {operation}: {ratio:.3f} (target <= {target}): {verdict}")
    switch = timings.median("lorakit set_adapter")
    verdict = "met" if switch < TARGET_SWITCH_SECONDS else "NOT met"
    print(f"- lorakit set_adapter: {harness.format_seconds(switch)} (target < 1 ms): {verdict}")


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser, default_reps=DEFAULT_REPS)
    args = parser.parse_args(argv)
    reps = harness.resolve_reps(args)
    harness.pin_threads(args.threads)
    libs = harness.load_libs(harness.parse_libs(args.libs))
    harness.print_machine()
    print("\nsmall model, LoRA r=16 alpha=32 all-linear, each library loads its own files\n")
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as workdir:
        fixture = Fixture(libs, Path(workdir))
        cases: list[harness.Case] = []
        for lib_name, lib in libs.items():
            check_reload(fixture, lib_name, lib)
            cases += lib_cases(fixture, lib_name, lib)
        timings = harness.run_interleaved(cases, reps, args.warmup)
    print_tables(libs, timings)


if __name__ == "__main__":
    main(sys.argv[1:])
