"""Shared benchmark harness: pinned threads, interleaved repetitions, medians, ratios, RSS.

Every benchmark script imports this module before torch, so the thread variables below are set
before torch starts its thread pools. Timings interleave the cases (case1, case2, case3, case1,
...) so that a slow spell on a shared machine hits every case alike instead of one case only.
Memory is measured in a fresh child process per case, because a process's peak RSS never goes
down and an allocator keeps freed pages.
"""

from __future__ import annotations

import os

DEFAULT_THREADS = 2
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
for _variable in THREAD_VARIABLES:
    os.environ.setdefault(_variable, str(DEFAULT_THREADS))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

KNOWN_LIBS = ("peft", "lorakit")
LIB_API = ("LoraConfig", "get_peft_model", "PeftModel")
RESULT_PREFIX = "BENCH_RESULT "
QUICK_REPS = 3
REPO_ROOT = Path(__file__).resolve().parent.parent

# Llama-style bases named in issue 2: "small" (~33M parameters) for speed and adapter files,
# "medium" (~370M parameters) for memory.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 8000,
    },
    "medium": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
    },
}


# ---------------------------------------------------------------------------------------------
# Set-up: threads, command line, libraries, models
# ---------------------------------------------------------------------------------------------


def pin_threads(threads: int) -> None:
    """Pins torch (and any child process) to `threads` intra-op threads and one inter-op thread."""
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)
    # The inter-op pool can be sized only before its first use; later calls raise and keep it.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def add_common_arguments(parser: argparse.ArgumentParser, default_reps: int = 7) -> None:
    """Adds the flags every timing script shares: libraries, repetitions, threads, quick mode."""
    parser.add_argument(
        "--libs",
        default=",".join(KNOWN_LIBS),
        help="comma-separated libraries to run, from: peft, lorakit (default: both)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"timed rounds; median of these (default {default_reps}, {QUICK_REPS} if --quick)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads")
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds: only checks that the script runs"
    )
    parser.set_defaults(default_reps=default_reps)


def resolve_reps(args: argparse.Namespace) -> int:
    """The number of timed rounds: `--reps` if given, else the quick or the normal default."""
    if args.reps is not None:
        if args.reps < 1:
            raise SystemExit(f"--reps got {args.reps}; it must be at least 1")
        return int(args.reps)
    return QUICK_REPS if args.quick else int(args.default_reps)


def parse_libs(text: str) -> list[str]:
    """Parses the `--libs` value into a list of known library names, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in KNOWN_LIBS]
    if unknown or not names:
        raise SystemExit(f"--libs got {text!r}; allowed names: {', '.join(KNOWN_LIBS)}")
    return names


def load_libs(names: Sequence[str]) -> dict[str, ModuleType]:
    """Imports each named library; both expose LoraConfig, get_peft_model and PeftModel."""
    libs: dict[str, ModuleType] = {}
    for name in names:
        try:
            libs[name] = importlib.import_module(name)
        except ImportError as error:
            hint = " (run from the repo root with PYTHONPATH=$PWD/src)" if name == "lorakit" else ""
            raise SystemExit(
                f"cannot import {name!r}: {error}{hint}; or leave it out with --libs"
            ) from error
        missing = [api for api in LIB_API if not hasattr(libs[name], api)]
        if missing:
            raise SystemExit(
                f"{name} imported from {_module_location(libs[name])} lacks {', '.join(missing)};"
                " run from a tree where it exists (PYTHONPATH=$PWD/src) or leave it out with --libs"
            )
    return libs


def model_config(size: str) -> Any:
    """Returns the transformers LlamaConfig of a named benchmark size ("small" or "medium")."""
    from transformers import LlamaConfig

    config = LlamaConfig(**MODEL_SIZES[size], tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return config


def build_llama(size: str, seed: int = 0) -> Any:
    """Builds a seeded fp32 Llama-style causal LM in training mode with its cache turned off.

    Returns:
        A transformers `LlamaForCausalLM` (typed Any: transformers is imported lazily).
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(size))
    model.config.use_cache = False
    return model.float().train()


def token_batch(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Returns a seeded [batch, length] tensor of token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def lora_config(lib: ModuleType, **overrides: Any) -> Any:
    """The benchmarks' LoRA config (r=16, alpha=32, all-linear) built with `lib`'s LoraConfig."""
    options: dict[str, Any] = {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
    }
    options.update(overrides)
    return lib.LoraConfig(**options)


def randomize_lora_b(model: torch.nn.Module, seed: int = 0, std: float = 0.01) -> int:
    """Fills every `lora_B` weight with seeded noise so no library can skip a zero branch.

    Returns:
        The number of tensors filled (0 means the model has no `lora_B`, which is an error).
    """
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator) * std
                parameter.copy_(noise.to(parameter.dtype))
                count += 1
    if count == 0:
        raise RuntimeError("no lora_B parameter found: did the wrapping fail?")
    return count


def count_trainable(model: torch.nn.Module) -> int:
    """Number of parameter elements that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Timing: interleaved rounds, statistics, tables
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One timed operation.

    Attributes:
        name: label in the table.
        run: the timed call.
        before: untimed preparation called before every timed call (e.g. a fresh base model).
        number: calls per round; a round's time is divided by it (for fast operations).
    """

    name: str
    run: Callable[[], object]
    before: Callable[[], object] | None = None
    number: int = 1


@dataclass
class Timings:
    """Per-round seconds per call of each case, in round order."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def paired_ratio(self, name: str, reference: str) -> float:
        """Median over rounds of t(name)/t(reference) in the same round: robust to drift."""
        pairs = zip(self.seconds[name], self.seconds[reference], strict=True)
        return statistics.median(a / b for a, b in pairs)


def with_attribute(
    run: Callable[[], object], owner: object, name: str, value: object
) -> Callable[[], None]:
    """`run` with `owner.name` set to `value` while it runs, restored after (probes that time
    the same step with one piece swapped)."""

    def patched_run() -> None:
        saved = getattr(owner, name)
        setattr(owner, name, value)
        try:
            run()
        finally:
            setattr(owner, name, saved)

    return patched_run


def training_step_case(
    name: str, model: torch.nn.Module, ids: torch.Tensor, learning_rate: float
) -> Case:
    """A training step of `model` on `ids` as a case: forward, backward, AdamW step, zero_grad."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    print(f"{name}: {sum(p.numel() for p in trainable):,} trainable parameters")

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Case(name, step)


def _time_once(case: Case) -> float:
    total = 0.0
    for _ in range(case.number):
        if case.before is not None:
            case.before()
        start = time.perf_counter()
        case.run()
        total += time.perf_counter() - start
    return total / case.number


def run_interleaved(cases: Sequence[Case], reps: int, warmup: int = 1) -> Timings:
    """Times the cases round-robin: every round runs each case once, in the order given.

    Warm-up rounds are interleaved the same way and discarded. The garbage collector runs
    between calls (untimed) so that one case's garbage is not collected inside another's timing.
    """
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    timings = Timings({case.name: [] for case in cases})
    for round_index in range(warmup + reps):
        for case in cases:
            gc.collect()
            seconds = _time_once(case)
            if round_index >= warmup:
                timings.seconds[case.name].append(seconds)
    return timings


def format_seconds(seconds: float) -> str:
    """Formats a duration with a unit that keeps three significant figures."""
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def print_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Prints a Markdown table (pasteable into RESULTS.md), columns padded for the terminal."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def print_timings(title: str, timings: Timings, reference: str) -> None:
    """Prints median, min, max and both ratios (of medians, and paired per round) to `reference`."""
    print(f"\n### {title}\n")
    headers = ["case", "median", "min", "max", f"x {reference}", "paired x"]
    rows = []
    for name, values in timings.seconds.items():
        rows.append(
            [
                name,
                format_seconds(statistics.median(values)),
                format_seconds(min(values)),
                format_seconds(max(values)),
                f"{timings.median(name) / timings.median(reference):.3f}",
                f"{timings.paired_ratio(name, reference):.3f}",
            ]
        )
    print_markdown_table(headers, rows)
    rounds = len(next(iter(timings.seconds.values())))
    print(f"\n({rounds} interleaved rounds; 'paired x' is the median of per-round ratios)")


# ---------------------------------------------------------------------------------------------
# Memory: one child process per case
# ---------------------------------------------------------------------------------------------


def read_status_kib(field_name: str) -> int:
    """Reads a `/proc/self/status` field given in kB (VmRSS, VmHWM) as KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no field {field_name!r} (Linux only)")


def report_to_parent(result: dict[str, Any]) -> None:
    """Called in a child at its end: prints its result, with its own peak RSS (VmHWM) as
    `vmhwm_kib`, as one tagged JSON line for `run_child`."""
    result = {"vmhwm_kib": read_status_kib("VmHWM"), **result}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


@dataclass
class ChildResult:
    """What a child process reported, its peak RSS (its own VmHWM) and its wall time."""

    report: dict[str, Any]
    peak_rss_kib: int
    wall_seconds: float


def run_child(argv: Sequence[str], env: dict[str, str] | None = None) -> ChildResult:
    """Runs `python argv...` in a fresh process and returns its report and its peak RSS.

    The peak is the child's own VmHWM, which `report_to_parent` reads at its end. Not
    `wait4`'s ru_maxrss: Linux counts in it the RSS the forked process had before its exec,
    that is this parent's, so a parent that had grown (a time section run before) gave every
    child the same "peak" (2156 MiB for both libraries in bench_dora). The child's stderr
    goes straight to ours; its stdout is scanned for the line written by `report_to_parent`.
    """
    start = time.perf_counter()
    child_env = dict(os.environ if env is None else env)
    process = subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, text=True, env=child_env
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, _usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(
            f"child {' '.join(argv)} exited with {process.returncode}; its stdout:\n{output}"
        )
    reports = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if len(reports) != 1:
        raise RuntimeError(f"child {' '.join(argv)} printed {len(reports)} result lines:\n{output}")
    report = json.loads(reports[0][len(RESULT_PREFIX) :])
    return ChildResult(report=report, peak_rss_kib=int(report["vmhwm_kib"]), wall_seconds=wall)


def parse_cases(text: str, allowed: Sequence[str]) -> list[str]:
    """The comma-separated `--cases` value as a list; exits naming the allowed cases."""
    cases = [case.strip() for case in text.split(",") if case.strip()]
    if not cases or any(case not in allowed for case in cases):
        raise SystemExit(f"--cases got {text!r}; allowed: {', '.join(allowed)}")
    return cases


def run_children(
    cases: Sequence[str], argv_of: Callable[[str], Sequence[str]]
) -> dict[str, ChildResult]:
    """Runs one fresh child per case, one after another, printing each one's wall time."""
    results: dict[str, ChildResult] = {}
    for case in cases:
        results[case] = run_child(argv_of(case))
        print(f"{case}: done in {results[case].wall_seconds:.1f} s", flush=True)
    return results


def self_peak_rss_kib() -> int:
    """This process's own peak RSS so far (getrusage RUSAGE_SELF, KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def format_mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Machine description, so a result can be recorded with what made it
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        completed = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return completed.stdout.strip()


def _version(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return "not importable"
    version = str(getattr(module, "__version__", "?"))
    if module_name == "lorakit":
        version += f" from {_module_location(module)}"
    return version


def _module_location(module: ModuleType) -> str:
    """The folder a package was imported from (namespace packages have no __file__)."""
    if module.__file__ is not None:
        return str(Path(module.__file__).parent)
    return ", ".join(getattr(module, "__path__", ["?"]))


def machine_info() -> dict[str, str]:
    """Describes the machine and software a result was made with."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    commit = _git("rev-parse", "--short", "HEAD")
    if dirty not in ("", "unknown"):
        commit += " (uncommitted changes)"
    try:
        affinity = str(len(os.sched_getaffinity(0)))
    except AttributeError:
        affinity = "?"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {affinity} usable",
        "load average (1, 5, 15 min)": load,
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()}"
        " inter-op",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "lorakit": _version("lorakit"),
        "git commit": f"{_git('rev-parse', '--abbrev-ref', 'HEAD')} {commit}",
    }


def print_machine(command: Sequence[str] | None = None) -> None:
    """Prints the command line and machine description as a Markdown list."""
    argv = sys.argv if command is None else command
    pythonpath = os.environ.get("PYTHONPATH")
    prefix = f"PYTHONPATH={pythonpath} " if pythonpath else ""
    print(f"command: `{prefix}python {' '.join(argv)}`\n")
    for key, value in machine_info().items():
        print(f"- {key}: {value}")
