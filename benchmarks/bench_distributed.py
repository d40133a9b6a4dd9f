"""Issue 5: data-parallel LoRA training on CPU, 1 process vs 2 (DDP and FSDP), same global batch.

Model: the "small" Llama-style base (hidden 512, 8 layers, vocab 8000, ~33M parameters, fp32,
seeded), LoRA r=16 alpha=32 on all linear layers, global batch 8 x 128 tokens, AdamW. A step is
forward + backward + AdamW step + zero_grad, wrapped as ``lorakit.train`` wraps it
(``wrap_model``). Each case is its own launch (plain Python, or ``torchrun --standalone``, gloo
over loopback); rank 0 reports the median of its timed steps (the ranks meet at every
reduction, so rank 0's step is the run's step). The cases on the same 2 cores:

  1p x 2t     one process, 2 threads, batch 8
  2p DDP      two processes, 1 thread each, batch 4 each (the adapter gradients all-reduced)
  2p FSDP     two processes, 1 thread each, batch 4 each (base and adapter sharded)
  1p x 1t     one process, 1 thread, batch 8 (the one-core baseline; leave out with --no-1t)

Bytes per step: DDP's all-reduce, counted by a comm hook on its buckets (what the tests count);
FSDP's reduce-scatter input and all-gather output, counted at ``torch.distributed``. Full
fine-tuning would all-reduce a gradient for every parameter, i.e. the model's parameter bytes.

Scaling efficiency, same cores: t(1p x 2t) / t(2p); 1.0 means two processes use the 2 cores as
well as two threads of one process. Against one core: t(1p x 1t) / (2 x t(2p)), the classic
strong-scaling efficiency of 2 workers.

  PYTHONPATH=$PWD/src python benchmarks/bench_distributed.py [--steps 6] [--warmup 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness

# isort: split
import torch

GLOBAL_BATCH, LENGTH = 8, 128
LEARNING_RATE = 1e-4
SCRIPT = str(Path(__file__).resolve())


def count_bytes(strategy: str, wrapped: torch.nn.Module, sink: dict[str, int]) -> None:
    """Add the bytes each collective of a training step moves to ``sink``."""
    import torch.distributed as dist

    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP reads annotations
            buffer = bucket.buffer()
            sink["all-reduce"] += buffer.numel() * buffer.element_size()
            return default_hooks.allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, hook)  # type: ignore[operator]
        return
    real_scatter, real_gather = dist.reduce_scatter_single, dist.all_gather_single

    def scatter(*args: Any, **kwargs: Any) -> Any:
        tensor = kwargs["input"]
        sink["reduce-scatter"] += tensor.numel() * tensor.element_size()
        return real_scatter(*args, **kwargs)

    def gather(output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sink["all-gather"] += output.numel() * output.element_size()
        return real_gather(output, *args, **kwargs)

    dist.reduce_scatter_single = scatter
    dist.all_gather_single = gather  # type: ignore[assignment]


def child_main(strategy: str, threads: int, steps: int, warmup: int) -> None:
    """One launch: time ``steps`` training steps after ``warmup``; rank 0 reports."""
    harness.pin_threads(threads)
    from lorakit.train.distributed import detect_launch, start_process_group, stop_process_group

    run = detect_launch()
    start_process_group(run, torch.device("cpu"))
    try:
        # The DDP wrapper lives only inside this call: it must be gone before its process group
        # is destroyed (see Trainer.train).
        report = time_steps(run, strategy, steps, warmup)
    finally:
        stop_process_group()
    if run.is_main:
        harness.report_to_parent(report)


def time_steps(run: Any, strategy: str, steps: int, warmup: int) -> dict[str, Any]:
    """Build the model, wrap it as lorakit's trainer does, and time the steps."""
    import lorakit
    from lorakit.train.distributed import wrap_model

    device = torch.device("cpu")
    base = harness.build_llama("small")
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    model = lorakit.get_peft_model(base, harness.lora_config(lorakit))
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    wrapped = wrap_model(model, run, device, strategy)
    optimizer = torch.optim.AdamW(  # after wrapping: FSDP replaces the parameters by shards
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE
    )
    sink = {"all-reduce": 0, "reduce-scatter": 0, "all-gather": 0}
    if run.is_distributed:
        count_bytes(strategy, wrapped, sink)
    ids = harness.token_batch(8000, GLOBAL_BATCH, LENGTH)
    local = ids[run.rank :: run.world_size]  # this rank's share of the global batch
    seconds: list[float] = []
    for index in range(warmup + steps):
        sink.update(dict.fromkeys(sink, 0))
        start = time.perf_counter()
        wrapped(input_ids=local, labels=local).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(seconds),
        "bytes": dict(sink),  # the last step's
        "model_bytes": model_bytes,
        "adapter_bytes": adapter_bytes,
    }


def launch(case: str, strategy: str, processes: int, threads: int, args: Any) -> dict[str, Any]:
    child = ["--child", strategy, "--child-threads", str(threads)]
    child += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if processes == 1:
        argv = [SCRIPT, *child]
    else:
        runner = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        argv = [*runner, str(processes), SCRIPT, *child]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    for variable in harness.THREAD_VARIABLES:
        env[variable] = str(threads)
    report = harness.run_child(argv, env).report
    print(f"{case}: median step {report['step_s'] * 1e3:.0f} ms", file=sys.stderr)
    return report


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per launch (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="launches of each case, in turn")
    parser.add_argument("--no-1t", action="store_true", help="skip the 1-thread baseline")
    parser.add_argument("--child", choices=["ddp", "fsdp"], default=None)
    parser.add_argument("--child-threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.child_threads, args.steps, args.warmup)
        return
    harness.print_machine(["python", "benchmarks/bench_distributed.py", *argv])
    cases = [("1p x 2t", "ddp", 1, 2), ("2p DDP", "ddp", 2, 1), ("2p FSDP", "fsdp", 2, 1)]
    if not args.no_1t:
        cases.append(("1p x 1t", "ddp", 1, 1))
    reports: dict[str, list[dict[str, Any]]] = {case[0]: [] for case in cases}
    for _ in range(args.rounds):  # cases in turn, so a slow spell hits each alike
        for case, strategy, processes, threads in cases:
            reports[case].append(launch(case, strategy, processes, threads, args))
    print_results(reports, args)


def print_results(reports: dict[str, list[dict[str, Any]]], args: Any) -> None:
    step = {case: statistics.median(r["step_s"] for r in runs) for case, runs in reports.items()}
    first = reports["2p DDP"][0]
    model_bytes, adapter_bytes = first["model_bytes"], first["adapter_bytes"]
    print(
        f"\nglobal batch {GLOBAL_BATCH} x {LENGTH} tokens; median of {args.steps} steps after "
        f"{args.warmup} warm-up, {args.rounds} launch(es) per case\n"
    )
    headers = ["case", "median step", "tokens/s", "all-reduce", "reduce-scatter", "all-gather"]
    rows = []
    for case, runs in reports.items():
        moved = runs[0]["bytes"]
        rows.append(
            [
                case,
                harness.format_seconds(step[case]),
                f"{GLOBAL_BATCH * LENGTH / step[case]:.0f}",
                *(_mib(moved[kind]) for kind in ("all-reduce", "reduce-scatter", "all-gather")),
            ]
        )
    harness.print_markdown_table(headers, rows)
    reduced = first["bytes"]["all-reduce"]
    print(f"\nmodel parameters: {_mib(model_bytes)} (full fine-tuning all-reduces this per step)")
    print(f"trainable adapter: {_mib(adapter_bytes)}; DDP all-reduced per step: {_mib(reduced)}")
    print(f"adapter all-reduce / full fine-tuning all-reduce: {reduced / model_bytes:.4f}")
    for case in ("2p DDP", "2p FSDP"):
        same_cores = step["1p x 2t"] / step[case]
        line = f"{case} scaling efficiency, same 2 cores t(1p x 2t)/t(2p): {same_cores:.3f}"
        if "1p x 1t" in step:
            line += f"; vs one core t(1p x 1t)/(2 t(2p)): {step['1p x 1t'] / (2 * step[case]):.3f}"
        print(line)


def _mib(count: int) -> str:
    return f"{count / 2**20:.2f} MiB" if count else "-"


if __name__ == "__main__":
    main(sys.argv[1:])
