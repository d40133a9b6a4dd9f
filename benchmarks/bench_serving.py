"""Issue 13, speed and memory of serving many adapters: lorakit.serve.Engine vs peft.

Model: the "small" Llama-style base (hidden 512, 8 layers) with 8 all-linear r=16 adapters
(written once by lorakit, read by both libraries). Questions, each a table:
  decode     one decoding step of 16 rows: the engine's step (KV cache of CONTEXT tokens per
             row) with every row on the base, on one adapter, and spread over the 8 adapters
             (2 rows each); and the forward of 16 single tokens without a cache (the way the
             issue measured peft's `adapter_names`) for the engine and for peft. Mixed rows
             come in the order the engine's scheduler keeps its running batch (grouped by
             adapter, in stack order; peft gets the same rows), and also interleaved (row i
             on adapter i % 8), for comparison.
  prefill    a 16 x 64 forward: one adapter vs spread over 8 (engine and peft), the rows in
             the order the engine's scheduler gives a prefill (by adapter: 2 rows each); the
             engine also with the rows interleaved (row i on adapter i % 8), for comparison.
  memory     bytes the engine's banks hold per loaded adapter vs the adapter's tensor bytes:
             the whole stacks (rows the adapters own plus free rows, which the default
             doubling growth leaves; 8 adapters of r=16 fill 128 rows exactly, other counts
             would not), and the owned rows alone; and the bytes of all tensor storages the 8
             loads left alive (found by gc).
  hot load   Engine.load_adapter of the 8th adapter (after unloading it: the load writes into
             the rows the unload freed) vs reading its safetensors file.
Targets (issue 13): mixed decode <= 1.3x single-adapter decode and >= 2.5x peft's mixed
throughput; mixed prefill throughput >= 0.95x single; memory <= 1.1x tensor bytes; hot load
<= 2x file read.

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_serving.py
  PYTHONPATH=$PWD/src python benchmarks/bench_serving.py --quick
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import harness

# isort: split
import torch
from safetensors.torch import load_file

ADAPTERS = 8
ROWS = 16
CONTEXT = 32  # cached tokens per row before the timed decoding step
PREFILL = 64
DEFAULT_REPS = 9
CALLS_PER_ROUND = 5
TARGETS = {
    "decode mixed / single": 1.3,
    "prefill single / mixed (throughput)": 0.95,
    "memory held / tensor bytes": 1.1,
    "hot load / file read": 2.0,
}


def save_adapters(libs: dict[str, Any], template: torch.nn.Module, folder: Path) -> list[Path]:
    """Write ADAPTERS all-linear r=16 adapters with random B (lorakit's writer, PEFT format)."""
    lorakit = libs["lorakit"]
    folders = []
    for index in range(ADAPTERS):
        model = lorakit.get_peft_model(copy.deepcopy(template), harness.lora_config(lorakit))
        harness.randomize_lora_b(model, seed=index)
        model.save_pretrained(folder / f"adapter{index}")
        folders.append(folder / f"adapter{index}")
    return folders


def spread(names: list[str]) -> list[str]:
    """ROWS row choices, cycling over `names`."""
    return [names[row % len(names)] for row in range(ROWS)]


class EngineCases:
    """The engine with the 8 adapters and a batch cache of CONTEXT tokens for ROWS rows."""

    def __init__(self, template: torch.nn.Module, folders: list[Path]) -> None:
        from lorakit.serve import Engine
        from lorakit.serve.routing import BatchRouting

        self.engine = Engine.from_pretrained(template)
        self.names = [f"adapter{i}" for i in range(ADAPTERS)]
        gc.collect()
        before = live_storages()
        for name, folder in zip(self.names, folders, strict=True):
            self.engine.load_adapter(name, folder)
        gc.collect()
        # Every tensor storage the loads left alive, wherever referenced (banks or elsewhere).
        after = live_storages()
        self.live_bytes_added = sum(n for ptr, n in after.items() if ptr not in before)
        self.routing: BatchRouting = self.engine._routing
        self.model = self.engine.model
        vocab_size = harness.MODEL_SIZES["small"]["vocab_size"]
        self.context = harness.token_batch(vocab_size, ROWS, CONTEXT)
        self.step_ids = harness.token_batch(vocab_size, ROWS, 1, seed=1)
        self.prefill_ids = harness.token_batch(vocab_size, ROWS, PREFILL, seed=2)
        import transformers

        self.cache = transformers.DynamicCache()
        self.set_rows(None, CONTEXT)
        with torch.no_grad():
            self.model(input_ids=self.context, cache=self.cache, use_cache=True)

    def set_rows(self, names: list[str] | None, tokens_per_row: int) -> None:
        choices = [() if name is None else ((name, 1.0),) for name in names or [None] * ROWS]
        self.routing.set_rows(choices, tokens_per_row)

    def decode_step(self, names: list[str] | None) -> None:
        self.set_rows(names, 1)
        with torch.no_grad():
            self.model(input_ids=self.step_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache.crop(-1)  # drop the token the step appended

    def forward(self, ids: torch.Tensor, names: list[str] | None) -> None:
        self.set_rows(names, ids.shape[1])
        with torch.no_grad():
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)


class PeftCases:
    """peft's PeftModel with the same 8 adapters; mixed batches through `adapter_names`."""

    def __init__(self, peft: Any, template: torch.nn.Module, folders: list[Path]) -> None:
        self.names = [f"adapter{i}" for i in range(ADAPTERS)]
        self.model = peft.PeftModel.from_pretrained(
            copy.deepcopy(template), folders[0], adapter_name=self.names[0]
        )
        for name, folder in zip(self.names[1:], folders[1:], strict=True):
            self.model.load_adapter(folder, adapter_name=name)
        self.model.set_adapter(self.names[0])
        self.model.eval()

    def forward(self, ids: torch.Tensor, names: list[str] | None) -> None:
        with torch.no_grad():
            if names is None:
                self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            else:
                self.model(input_ids=ids, adapter_names=names, use_cache=False, logits_to_keep=1)


def engine_order(engine: EngineCases, names: list[str]) -> list[str]:
    """`names` in the order the engine's scheduler keeps its running rows (by adapter)."""
    return sorted(names, key=lambda name: engine.routing.row_order_key(((name, 1.0),)))


def decode_cases(engine: EngineCases, peft_cases: PeftCases | None) -> list[harness.Case]:
    single, interleaved = [engine.names[0]] * ROWS, spread(engine.names)
    mixed = engine_order(engine, interleaved)
    cases = [
        harness.Case("engine step base", lambda: engine.decode_step(None), number=CALLS_PER_ROUND),
        harness.Case(
            "engine step 1 adapter", lambda: engine.decode_step(single), number=CALLS_PER_ROUND
        ),
        harness.Case(
            "engine step 8 adapters", lambda: engine.decode_step(mixed), number=CALLS_PER_ROUND
        ),
        harness.Case(
            "engine step 8 adapters, interleaved",
            lambda: engine.decode_step(interleaved),
            number=CALLS_PER_ROUND,
        ),
        harness.Case(
            "engine no-cache 1 adapter",
            lambda: engine.forward(engine.step_ids, single),
            number=CALLS_PER_ROUND,
        ),
        harness.Case(
            "engine no-cache 8 adapters",
            lambda: engine.forward(engine.step_ids, mixed),
            number=CALLS_PER_ROUND,
        ),
        harness.Case(
            "engine no-cache 8 adapters, interleaved",
            lambda: engine.forward(engine.step_ids, interleaved),
            number=CALLS_PER_ROUND,
        ),
    ]
    if peft_cases is not None:
        cases += [
            harness.Case(
                "peft no-cache base",
                lambda: _peft_base(peft_cases, engine.step_ids),
                number=CALLS_PER_ROUND,
            ),
            harness.Case(
                "peft no-cache 1 adapter",
                lambda: peft_cases.forward(engine.step_ids, None),
                number=CALLS_PER_ROUND,
            ),
            harness.Case(
                "peft no-cache 8 adapters",
                lambda: peft_cases.forward(engine.step_ids, mixed),
                number=CALLS_PER_ROUND,
            ),
            harness.Case(
                "peft no-cache 8 adapters, interleaved",
                lambda: peft_cases.forward(engine.step_ids, interleaved),
                number=CALLS_PER_ROUND,
            ),
        ]
    return cases


def _peft_base(peft_cases: PeftCases, ids: torch.Tensor) -> None:
    with peft_cases.model.disable_adapter(), torch.no_grad():
        peft_cases.model(input_ids=ids, use_cache=False, logits_to_keep=1)


def prefill_cases(engine: EngineCases, peft_cases: PeftCases | None) -> list[harness.Case]:
    single, interleaved = [engine.names[0]] * ROWS, spread(engine.names)
    # The scheduler orders a prefill's rows by adapter (serve.scheduler); both libraries get
    # the rows in that order.
    mixed = engine_order(engine, interleaved)
    ids = engine.prefill_ids
    cases = [
        harness.Case("engine prefill 1 adapter", lambda: engine.forward(ids, single)),
        harness.Case("engine prefill 8 adapters", lambda: engine.forward(ids, mixed)),
        harness.Case(
            "engine prefill 8 adapters, interleaved", lambda: engine.forward(ids, interleaved)
        ),
    ]
    if peft_cases is not None:
        cases += [
            harness.Case("peft prefill 1 adapter", lambda: peft_cases.forward(ids, None)),
            harness.Case("peft prefill 8 adapters", lambda: peft_cases.forward(ids, mixed)),
        ]
    return cases


def held_bytes(engine: Any) -> tuple[int, int]:
    """Bytes of the engine's bank stacks: (all storage, rows loaded adapters own)."""
    owned, free = engine._banks.factor_bytes()
    storage = sum(
        tensor.untyped_storage().nbytes()
        for bank in engine._banks.layers.values()
        for tensor in (bank.A, bank.B_t)
        if tensor is not None
    )
    assert storage == owned + free
    return storage, owned


def live_storages() -> dict[int, int]:
    """Data pointer -> bytes of every tensor storage alive in this process."""
    storages = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return storages


def memory_and_load(engine: EngineCases, folders: list[Path], reps: int) -> dict[str, float]:
    """Held bytes per adapter vs tensor bytes, and hot load vs file read (median seconds)."""
    files = [load_file(folder / "adapter_model.safetensors") for folder in folders]
    tensor_bytes = sum(t.numel() * t.element_size() for f in files for t in f.values())
    held, owned = held_bytes(engine.engine)
    last, name = folders[-1], engine.names[-1]
    cases = [
        harness.Case("read file", lambda: load_file(last / "adapter_model.safetensors")),
        harness.Case(
            "hot load (7 loaded)",
            lambda: engine.engine.load_adapter(name, last),
            before=lambda: engine.engine.unload_adapter(name),
        ),
    ]
    timings = harness.run_interleaved(cases, reps)
    harness.print_timings("Hot load of the 8th adapter vs reading its file", timings, "read file")
    return {
        "held MiB per adapter": held / ADAPTERS / 2**20,
        "tensor MiB per adapter": tensor_bytes / ADAPTERS / 2**20,
        "memory held / tensor bytes": held / tensor_bytes,
        "owned rows / tensor bytes": owned / tensor_bytes,
        "live tensor bytes the loads added / tensor bytes": engine.live_bytes_added / tensor_bytes,
        "hot load / file read": timings.paired_ratio("hot load (7 loaded)", "read file"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, default_reps=DEFAULT_REPS)
    args = parser.parse_args(argv)
    harness.pin_threads(args.threads)
    reps = harness.resolve_reps(args)
    libs = harness.load_libs(
        ["lorakit", *(["peft"] if "peft" in harness.parse_libs(args.libs) else [])]
    )
    harness.print_machine(sys.argv)
    template = harness.build_llama("small").eval()
    with tempfile.TemporaryDirectory() as workdir:
        folders = save_adapters(libs, template, Path(workdir))
        engine = EngineCases(template, folders)
        peft_cases = PeftCases(libs["peft"], template, folders) if "peft" in libs else None
        decode = harness.run_interleaved(decode_cases(engine, peft_cases), reps, args.warmup)
        harness.print_timings(f"Decode step, {ROWS} rows", decode, "engine step 1 adapter")
        prefill = harness.run_interleaved(prefill_cases(engine, peft_cases), reps, args.warmup)
        harness.print_timings(f"Prefill {ROWS} x {PREFILL}", prefill, "engine prefill 1 adapter")
        figures = memory_and_load(engine, folders, reps)
    figures["decode mixed / single"] = decode.paired_ratio(
        "engine step 8 adapters", "engine step 1 adapter"
    )
    figures["decode mixed / base"] = decode.paired_ratio(
        "engine step 8 adapters", "engine step base"
    )
    figures["prefill single / mixed (throughput)"] = prefill.paired_ratio(
        "engine prefill 1 adapter", "engine prefill 8 adapters"
    )
    figures["prefill single / mixed interleaved (throughput)"] = prefill.paired_ratio(
        "engine prefill 1 adapter", "engine prefill 8 adapters, interleaved"
    )
    if peft_cases is not None:
        figures["peft no-cache mixed / engine no-cache mixed (throughput)"] = decode.paired_ratio(
            "peft no-cache 8 adapters", "engine no-cache 8 adapters"
        )
        figures["the same, rows interleaved"] = decode.paired_ratio(
            "peft no-cache 8 adapters, interleaved", "engine no-cache 8 adapters, interleaved"
        )
        figures["peft no-cache mixed / single"] = decode.paired_ratio(
            "peft no-cache 8 adapters", "peft no-cache 1 adapter"
        )
        figures["peft prefill single / mixed (throughput)"] = prefill.paired_ratio(
            "peft prefill 1 adapter", "peft prefill 8 adapters"
        )
    print("\n### Figures\n")
    rows = [
        [name, f"{value:.3f}", f"{TARGETS[name]}" if name in TARGETS else ""]
        for name, value in figures.items()
    ]
    harness.print_markdown_table(["figure", "value", "target"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
