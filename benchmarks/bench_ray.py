"""Issue 14, scale-out: the same load through Ray Serve replicas against one `lorakit serve`.

The base, the 8 adapters, the request mix (bench_load's "mixed" case: the 8 adapters, base
rows and two blends), the clients and the reference check of every answer are bench_load's.
Three setups serve it, all started once and idle while another is loaded:
  server    one `lorakit serve` process, torch on --threads threads;
  ray 2x1   lorakit.serve.ray_app, 2 engine replicas of 1 CPU (1 torch thread) each;
  ray 1x2   lorakit.serve.ray_app, 1 engine replica of --threads CPUs: Ray's own cost
            (ingress hop, handle call, relayed stream) against the same engine as `server`.
Both Ray apps share one local Ray instance (logical CPUs: 2 + --threads, more than the
machine has; only one setup runs at a time). Rounds interleave the setups after a warm-up
(which also loads the adapters on the replicas), and each round's tokens/s ratio against
`server` is paired; medians printed.

On one machine two replicas share its cores, so `ray 2x1` shows what splitting the cores
into replicas costs or gains. With one replica per machine, each replica has a whole machine,
as `server` has here: N machines would serve about N x the `ray 1x2` throughput while the
adapters spread evenly over the replicas (multiplexing keeps each adapter on the replicas that
hold it), which the last line prints for N = 2.

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_ray.py
  PYTHONPATH=$PWD/src python benchmarks/bench_ray.py --quick
"""

from __future__ import annotations

import gc
import socket
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import harness

# isort: split
import bench_load
import bench_serving
from lorakit.serve.loadgen import LoadReport, wait_until_ready

CASE = "mixed"  # bench_load's mix: 8 adapters, base rows and two blends
SETUPS = ("server", "ray 2x1", "ray 1x2")
RAY_ADAPTER_IDS = 10  # the 8 adapters and the 2 blends' adapter sets: none is ever evicted
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray's minimum is 75 MiB; answers are small


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_ray(base: Path, adapters_root: Path, threads: int) -> Iterator[dict[str, str]]:
    """A local Ray instance with the two Ray setups deployed; yields their URLs."""
    import ray
    from ray import serve

    from lorakit.serve.ray_app import build_app

    port = free_port()
    ray.init(
        num_cpus=2 + threads,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {
            "base": str(base),
            "adapters_root": str(adapters_root),
            "max_adapters_per_replica": str(RAY_ADAPTER_IDS),
            "max_batch_size": str(bench_load.MAX_BATCH_SIZE),
            "max_queue": str(bench_load.MAX_QUEUE),
        }
        shapes = {"ray 2x1": ("2", "1"), "ray 1x2": ("1", str(threads))}
        urls = {}
        for setup, (replicas, cpus) in shapes.items():
            prefix = "/" + setup.replace(" ", "-")
            app = build_app({**common, "replicas": replicas, "cpus_per_replica": cpus})
            serve.run(app, name=setup.replace(" ", "-"), route_prefix=prefix)
            urls[setup] = f"http://127.0.0.1:{port}{prefix}"
            wait_until_ready(urls[setup], bench_load.START_TIMEOUT)
        yield urls
    finally:
        serve.shutdown()
        ray.shutdown()


def print_results(reports: dict[str, list[LoadReport]]) -> None:
    """The per-setup table, the paired ratios against `server` and the N-machine estimate."""
    rows = []
    for setup in SETUPS:
        total = bench_load.pooled(reports[setup])
        rows.append(
            [
                setup, str(total.requests), f"{total.requests_per_s:.2f}",
                f"{total.tokens_per_s:.1f}",
                *(f"{seconds * 1e3:.0f} ms" for seconds in (
                    total.latency_p50_s, total.latency_p99_s, total.ttft_p50_s, total.ttft_p99_s
                )),
                f"{total.lost} / {total.wrong}",
            ]
        )  # fmt: skip
    print(
        f"\n### Scale-out: {bench_load.CLIENTS} clients, {bench_load.PROMPT_TOKENS} + "
        f"{bench_load.MAX_TOKENS} tokens, mix '{CASE}'\n"
    )
    headers = ["setup", "requests", "req/s", "tokens/s", "latency p50", "p99", "TTFT p50", "p99"]
    harness.print_markdown_table([*headers, "lost / wrong"], rows)
    ratios = {}
    for setup in SETUPS[1:]:
        paired = [
            ray.tokens_per_s / single.tokens_per_s
            for ray, single in zip(reports[setup], reports["server"], strict=True)
        ]
        ratios[setup] = statistics.median(paired)
        shown = ", ".join(f"{r:.3f}" for r in paired)
        print(f"{setup} / server, tokens/s: {ratios[setup]:.3f} (median of rounds {shown})")
    server_rate = bench_load.pooled(reports["server"]).tokens_per_s
    print(
        f"one replica per machine, 2 machines like this one: about 2 x {ratios['ray 1x2']:.3f} = "
        f"{2 * ratios['ray 1x2']:.2f} x server ({2 * ratios['ray 1x2'] * server_rate:.0f} "
        "tokens/s), with the adapters spread evenly over the replicas"
    )


def main(argv: list[str] | None = None) -> int:
    args = bench_load.parse_round_arguments(argv, __doc__.splitlines()[0], 20.0, 0.0)
    harness.pin_threads(args.threads)  # the server inherits the thread variables
    harness.print_machine(sys.argv)
    libs = harness.load_libs(["lorakit"])
    template = harness.build_llama("small").eval()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        tokenizer = bench_load.save_base(template, root / "base")
        paths = bench_serving.save_adapters(libs, template, root / "adapters")
        folders = {path.name: path for path in paths}
        mix = bench_load.build_mixes(template, folders, tokenizer)[CASE]
        del template
        gc.collect()
        log = root / "serve.log"
        try:
            with (
                bench_load.running_server(root / "base", folders, log) as server_url,
                running_ray(root / "base", root / "adapters", args.threads) as ray_urls,
            ):
                urls = {"server": server_url, **ray_urls}
                targets = {setup: (urls[setup], mix) for setup in SETUPS}
                reports = bench_load.run_rounds(
                    targets, args.rounds, args.duration, args.warmup, ramp_up_s=0.0
                )
        except Exception:
            print(log.read_text()[-5000:], file=sys.stderr)
            raise
    print_results(reports)
    return bench_load.report_failures(reports)


if __name__ == "__main__":
    raise SystemExit(main())
