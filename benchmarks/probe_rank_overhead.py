"""Issue 2 probe: how much of a LoRA step's overhead over the floor depends on the rank?

The core benchmark model ("small", batch 4 x 128, all-linear, dropout 0) trained by lorakit at
r=1 and r=16, with and without the AdamW step, against the floor of bench_core_train.py
(frozen base, forward plus input-gradient backward). Interleaved rounds, medians. At r=1 the
branch's matmuls do 1/16 of the arithmetic of r=16, so what remains is the per-layer cost
that does not depend on the rank: the extra passes over each layer's input and output
(reading x for x Aᵀ, adding u Bᵀ into the output, reading the output gradient twice,
writing the branch's input-gradient) and the autograd bookkeeping.

  PYTHONPATH=$PWD/src python benchmarks/probe_rank_overhead.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import harness

# isort: split
import torch

import lorakit

ROUNDS = 9


def lorakit_step(ids: torch.Tensor, r: int, with_optimizer: bool) -> Callable[[], None]:
    model = lorakit.get_peft_model(harness.build_llama("small"), harness.lora_config(lorakit, r=r))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def floor_step(ids: torch.Tensor) -> Callable[[], None]:
    model = harness.build_llama("small")
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    return lambda: model(input_ids=ids, labels=ids).loss.backward()


def main() -> None:
    harness.pin_threads(2)
    ids = harness.token_batch(harness.MODEL_SIZES["small"]["vocab_size"], 4, 128)
    cases = {"floor": floor_step(ids)}
    for r in (1, 16):
        for with_optimizer in (False, True):
            name = f"r={r}, {'with' if with_optimizer else 'no'} AdamW"
            cases[name] = lorakit_step(ids, r, with_optimizer)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for step in cases.values():
        step()
        step()
    for _ in range(ROUNDS):
        for name, step in cases.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["floor"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:20s} {median * 1e3:7.1f} ms  {median / floor:.3f} x floor")


if __name__ == "__main__":
    main()
