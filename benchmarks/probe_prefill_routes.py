"""Probe (issue 13): a mixed prefill on the grouped route (rows in order) vs the sliced route.

bench_serving's model, 8 adapters and 16 x 64 prefill, rows in the engine's order (2 per
adapter). The engine's routing picks the grouped route for it; this probe also runs it with
the grouped route withheld (so the sliced route runs), and one adapter for reference.
Prints each case and the throughput ratios single / mixed.

  PYTHONPATH=$PWD/src python benchmarks/probe_prefill_routes.py
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import bench_serving
import harness

# isort: split
from lorakit.serve import routing


def without_grouped(run: Callable[[], object]) -> Callable[[], None]:
    """`run` with the grouped route never chosen (the plans' route cache bypassed)."""
    choose = routing.RowPlan.route

    def route(plan: routing.RowPlan, rows: int, seq: int) -> str:
        grouped, plan_routes = plan.grouped, plan._routes
        object.__setattr__(plan, "grouped", None)
        object.__setattr__(plan, "_routes", {})
        try:
            return choose(plan, rows, seq)
        finally:
            object.__setattr__(plan, "grouped", grouped)
            object.__setattr__(plan, "_routes", plan_routes)

    def step() -> None:
        routing.RowPlan.route = route  # type: ignore[method-assign]
        try:
            run()
        finally:
            routing.RowPlan.route = choose  # type: ignore[method-assign]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, default_reps=9)
    args = parser.parse_args()
    harness.pin_threads(args.threads)
    libs = harness.load_libs(["lorakit"])
    harness.print_machine()
    template = harness.build_llama("small").eval()
    with tempfile.TemporaryDirectory() as workdir:  # the loads copy the files' tensors
        folders = bench_serving.save_adapters(libs, template, Path(workdir))
        engine = bench_serving.EngineCases(template, folders)
    ids = engine.prefill_ids
    single = [engine.names[0]] * bench_serving.ROWS
    mixed = bench_serving.engine_order(engine, bench_serving.spread(engine.names))
    cases = [
        harness.Case("one adapter", lambda: engine.forward(ids, single)),
        harness.Case("8 adapters, grouped", lambda: engine.forward(ids, mixed)),
        harness.Case("8 adapters, sliced", without_grouped(lambda: engine.forward(ids, mixed))),
    ]
    timings = harness.run_interleaved(cases, harness.resolve_reps(args), args.warmup)
    harness.print_timings(
        f"Prefill {bench_serving.ROWS} x {bench_serving.PREFILL}", timings, "one adapter"
    )
    print()
    for name in ("8 adapters, grouped", "8 adapters, sliced"):
        ratio = timings.paired_ratio("one adapter", name)
        print(f"- one adapter / {name} (throughput, paired): {ratio:.3f}")


if __name__ == "__main__":
    main()
