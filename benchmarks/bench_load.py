"""Issue 14, load test: `lorakit serve` under concurrent streamed clients, 8 adapters vs one.

A real `lorakit serve` process on loopback serves the "small" Llama-style base (hidden 512,
8 layers; harness.build_llama) with bench_serving's 8 all-linear r=16 adapters, and
`lorakit.serve.loadgen` loads it with CLIENTS concurrent clients (greedy, streamed, prompts of
PROMPT_TOKENS token ids, 16, 32 or 48 completion tokens) for a bounded time per case:
  8 adapters   requests spread evenly over the 8 adapters;
  1 adapter    the same load on adapter0 only;
  mixed        the 8 adapters plus base rows and two blends (about a quarter of the requests).
The cases run in interleaved rounds (8, 1, mixed, 8, 1, ...) after a warm-up, so a slow spell
of a shared machine hits every case alike; each round's throughput ratio is paired and the
median printed. Figures per case (all rounds pooled): requests/s, completion tokens/s, p50/p99
latency and time to first token. Target (issue 14): 8-adapter tokens/s >= 0.8x one adapter.

Every answer is checked against a reference computed in this process before the server
starts: transformers' greedy `generate` on the base with the adapter merged
(`merge_and_unload`) or the blend merged (`add_weighted_adapter(..., "cat")`, exactly
Σ wᵢ · sᵢ BᵢAᵢ). Only prompts whose greedy choice wins by at least MIN_MARGIN in logits at every
step are used, so float32 rounding (merged weights vs the server's separate low-rank pass,
different batch shapes) cannot flip a token. Any lost or wrong request fails the script.
The client runs in this process and shares the machine's cores with the server.

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_load.py
  PYTHONPATH=$PWD/src python benchmarks/bench_load.py --quick
"""

from __future__ import annotations

import argparse
import copy
import gc
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import harness

# isort: split
import torch

import bench_serving
from lorakit.serve.loadgen import LoadReport, LoadRequest, run_load_sync, wait_until_ready

CLIENTS = 16
MAX_BATCH_SIZE = 16
MAX_QUEUE = 64
PROMPT_TOKENS = 16
# Completion lengths, cycled over each case's mix (32 on average): requests end at different
# steps, so the clients do not move in lock-step waves.
MAX_TOKENS = (16, 32, 48)
RAMP_UP_S = 2.0  # the clients start over this many seconds
PROMPTS_PER_SPEC = 4  # distinct prompts per adapter in the 8-adapter case
MIN_MARGIN = 1e-3  # logits: merged vs unmerged fp32 logits differ by ~3e-6 on this model
# Prompts generated per batch when looking for ones with a clear margin: twice those needed
# (about 2 in 3 pass), at least MIN_CANDIDATES; one batched generate per spec, usually.
MIN_CANDIDATES = 8
BLENDS = ({"adapter0": 0.7, "adapter1": 0.5}, {"adapter2": 0.6, "adapter5": -0.4})
START_TIMEOUT = 600  # seconds: a loaded 2-core machine can make start-up slow
TARGET = 0.8
CASES = ("8 adapters", "1 adapter", "mixed")
Spec = str | dict[str, float] | None  # an adapter, a blend, or the base
Reference = tuple[Spec, tuple[int, ...], list[int]]  # spec, prompt ids, greedy ids


def word_tokenizer(vocab_size: int) -> Any:
    """A tokenizer with one word per id ("w17" is id 17): any generated id decodes to text."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)


def save_base(template: torch.nn.Module, folder: Path) -> Any:
    """Save the base without an end-of-sequence token (every answer runs to its max_tokens)."""
    for config in (template.config, template.generation_config):
        config.eos_token_id = config.bos_token_id = config.pad_token_id = None
    tokenizer = word_tokenizer(template.config.vocab_size)
    template.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def merged_model(template: torch.nn.Module, folders: dict[str, Path], spec: Spec) -> Any:
    """The base with the adapter or blend of `spec` merged into its weights."""
    import lorakit

    if spec is None:
        return copy.deepcopy(template).eval()
    blend = {spec: 1.0} if isinstance(spec, str) else spec
    names = list(blend)
    model = lorakit.PeftModel.from_pretrained(
        copy.deepcopy(template), folders[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    if isinstance(spec, dict):
        model.add_weighted_adapter(names, list(blend.values()), "blend", combination_type="cat")
        model.set_adapter("blend")
    return model.merge_and_unload().eval()


def clear_references(model: Any, count: int, seed: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """(prompt ids, greedy ids) of `count` random prompts whose every step has a clear winner."""
    vocab_size = model.config.vocab_size
    found: list[tuple[tuple[int, ...], list[int]]] = []
    tried = 0
    candidates = max(MIN_CANDIDATES, 2 * count)
    while len(found) < count:
        prompts = harness.token_batch(vocab_size, candidates, PROMPT_TOKENS, seed=seed)
        seed += 1
        with torch.no_grad():
            output = model.generate(
                prompts, max_new_tokens=max(MAX_TOKENS), do_sample=False, use_cache=True,
                output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        # scores: one (candidates, vocab) tensor per step; the top-two gap of each step
        top2 = torch.stack(output.scores, dim=1).topk(2, dim=-1).values
        margins = (top2[..., 0] - top2[..., 1]).amin(dim=1)
        tried += candidates
        for row in range(candidates):
            if margins[row] >= MIN_MARGIN and len(found) < count:
                prompt = tuple(prompts[row].tolist())
                found.append((prompt, output.sequences[row, PROMPT_TOKENS:].tolist()))
    print(f"  {count} of {tried} prompts taken (margin >= {MIN_MARGIN} at every step)", flush=True)
    return found


def build_mixes(
    template: torch.nn.Module, folders: dict[str, Path], tokenizer: Any
) -> dict[str, list[LoadRequest]]:
    """The three cases' request mixes with their reference texts."""
    adapters = sorted(folders)
    specs: list[Spec] = [*adapters, None, *BLENDS]
    references: list[list[Reference]] = []
    for number, spec in enumerate(specs):
        model = merged_model(template, folders, spec)
        # adapter0 also has the 1-adapter case's prompts, as many as the 8-adapter case's
        count = PROMPTS_PER_SPEC * (len(adapters) if number == 0 else 1)
        print(f"references for {spec or 'base'}:", flush=True)
        found = clear_references(model, count, seed=1000 * (number + 1))
        references.append([(spec, prompt, tokens) for prompt, tokens in found])
        del model
        gc.collect()
    # adapter0, adapter1, ..., adapter7, adapter0, ...: the clients' shared cycle spreads them
    spread = [references[a][p] for p in range(PROMPTS_PER_SPEC) for a in range(len(adapters))]
    extras = [entry for entries in references[len(adapters) :] for entry in entries]
    # base and blend rows placed evenly among the adapters' rows
    positions = [(k / len(spread), entry) for k, entry in enumerate(spread)]
    positions += [((k + 0.5) / len(extras), entry) for k, entry in enumerate(extras)]
    mixed = [entry for _, entry in sorted(positions, key=lambda pair: pair[0])]
    cases = {"8 adapters": spread, "1 adapter": references[0][: len(spread)], "mixed": mixed}
    return {case: load_requests(entries, tokenizer) for case, entries in cases.items()}


def load_requests(entries: list[Reference], tokenizer: Any) -> list[LoadRequest]:
    """The requests of a mix: lengths cycle over MAX_TOKENS by position, the same in each case."""
    requests = []
    for position, (spec, prompt, tokens) in enumerate(entries):
        max_tokens = MAX_TOKENS[position % len(MAX_TOKENS)]
        requests.append(
            LoadRequest(
                prompt=prompt,
                expected=tokenizer.decode(tokens[:max_tokens]),
                model=spec if isinstance(spec, str) else "base",
                blend=spec if isinstance(spec, dict) else None,
                max_tokens=max_tokens,
            )
        )
    return requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_server(base: Path, folders: dict[str, Path], log: Path) -> Iterator[str]:
    """A `lorakit serve` process on loopback with the adapters; yields its URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "lorakit", "serve", "--base", str(base),
        *(f"--adapter={name}={folder}" for name, folder in sorted(folders.items())),
        "--port", str(port), "--max-batch-size", str(MAX_BATCH_SIZE),
        "--max-queue", str(MAX_QUEUE),
    ]  # fmt: skip
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, START_TIMEOUT, process=process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def run_rounds(
    targets: dict[str, tuple[str, list[LoadRequest]]],
    rounds: int,
    duration_s: float,
    warmup_s: float,
    ramp_up_s: float,
) -> dict[str, list[LoadReport]]:
    """Each named (url, mix) for `duration_s` per round, interleaved, after an untimed warm-up.

    bench_ray uses it too, with one mix over several servers.
    """
    for url, mix in targets.values():
        warm_ramp = min(ramp_up_s, warmup_s / 2)
        run_load_sync(url, mix, clients=CLIENTS, duration_s=warmup_s, ramp_up_s=warm_ramp).check()
    reports: dict[str, list[LoadReport]] = {name: [] for name in targets}
    for number in range(rounds):
        for name, (url, mix) in targets.items():
            report = run_load_sync(
                url, mix, clients=CLIENTS, duration_s=duration_s, ramp_up_s=ramp_up_s
            )
            print(f"round {number + 1}, {name}: {report.summary().splitlines()[1]}", flush=True)
            reports[name].append(report)
    return reports


def parse_round_arguments(
    argv: list[str] | None, description: str, duration_s: float, ramp_up_s: float
) -> argparse.Namespace:
    """The load benchmarks' shared options (--duration, --rounds, --warmup, --threads, --quick)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--duration", type=float, default=duration_s, help="seconds per case per round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--warmup", type=float, default=5.0, help="untimed seconds per case")
    parser.add_argument(
        "--threads", type=int, default=harness.DEFAULT_THREADS, help="torch threads of the server"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one round of 4 s: only checks that it runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 4.0, 1, 2.0
    if args.rounds < 1 or args.duration <= ramp_up_s or args.warmup <= 0:
        raise SystemExit(
            f"--rounds must be >= 1, --duration > {ramp_up_s} (the ramp-up) and --warmup > 0; "
            f"got {args.rounds}, {args.duration}, {args.warmup}"
        )
    return args


def pooled(reports: Sequence[LoadReport]) -> LoadReport:
    """One report over every round's answers and time."""
    answers = [answer for report in reports for answer in report.answers]
    return LoadReport.from_answers(answers, CLIENTS, sum(r.duration_s for r in reports))


def print_results(reports: dict[str, list[LoadReport]]) -> float:
    """The per-case table and the paired throughput ratio; returns the ratio."""
    rows = []
    for case in CASES:
        total = pooled(reports[case])
        rows.append(
            [
                case, str(total.requests), f"{total.requests_per_s:.2f}",
                f"{total.tokens_per_s:.1f}",
                *(f"{seconds * 1e3:.0f} ms" for seconds in (
                    total.latency_p50_s, total.latency_p99_s, total.ttft_p50_s, total.ttft_p99_s
                )),
                f"{total.lost} / {total.wrong}",
            ]
        )  # fmt: skip
    lengths = "/".join(map(str, MAX_TOKENS))
    print(f"\n### Load test: {CLIENTS} clients, {PROMPT_TOKENS} + {lengths} tokens\n")
    headers = ["case", "requests", "req/s", "tokens/s", "latency p50", "p99", "TTFT p50", "p99"]
    harness.print_markdown_table([*headers, "lost / wrong"], rows)
    ratios = [
        spread.tokens_per_s / single.tokens_per_s
        for spread, single in zip(reports["8 adapters"], reports["1 adapter"], strict=True)
    ]
    ratio = statistics.median(ratios)
    print(
        f"\n8 adapters / 1 adapter, tokens/s: {ratio:.3f} (median of rounds "
        f"{', '.join(f'{r:.3f}' for r in ratios)}; target >= {TARGET})"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    args = parse_round_arguments(argv, __doc__.splitlines()[0], 30.0, RAMP_UP_S)
    harness.pin_threads(args.threads)  # the server inherits the thread variables
    harness.print_machine(sys.argv)
    libs = harness.load_libs(["lorakit"])
    template = harness.build_llama("small").eval()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        tokenizer = save_base(template, root / "base")
        paths = bench_serving.save_adapters(libs, template, root / "adapters")
        folders = {path.name: path for path in paths}
        mixes = build_mixes(template, folders, tokenizer)
        del template
        gc.collect()
        try:
            with running_server(root / "base", folders, root / "serve.log") as url:
                targets = {case: (url, mixes[case]) for case in CASES}
                reports = run_rounds(targets, args.rounds, args.duration, args.warmup, RAMP_UP_S)
        except Exception:
            print((root / "serve.log").read_text()[-5000:], file=sys.stderr)
            raise
    print_results(reports)
    return report_failures(reports)


def report_failures(reports: dict[str, list[LoadReport]]) -> int:
    """Prints the first failures of every case that lost or got wrong answers; 1 if any did."""
    failed = [case for case, runs in reports.items() if any(r.lost or r.wrong for r in runs)]
    for case in failed:
        for report in reports[case]:
            print(f"{case}: " + "\n".join(report.failures()[:10]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
