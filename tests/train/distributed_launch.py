"""Launch helpers of the ``torchrun`` tests: a training worker and bounded subprocess launches.

The worker (this file run as a script, by torchrun or plain Python) trains LoRA on
``q_proj``/``v_proj`` of a tiny Llama over 12 rows of different lengths, so ranks hold
different label counts and the steps cross epoch ends. Each launch is bounded by a timeout, so
a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PAUSE_MARKER = "paused-at-step"
BYTES_FILE = "reduced-bytes.json"
RUN_TIMEOUT_S = 120
# Different padding per process and DDP's divide-then-sum reorder float32 sums: a few ulps.
MATCH_ONE_PROCESS_ATOL = 1e-5
BASE_OPTIONS: dict[str, Any] = {
    "batch_size": 2,
    "accumulation": 2,
    "max_steps": 6,
    "dropout": 0.0,
    "save_steps": 2,
    "pause_after": 0,
    "fail_rank": -1,
    "count_bytes": False,
    "gradient_checkpointing": False,
    "strategy": "ddp",
    "evaluate": False,
}


def worker(options: dict[str, Any]) -> None:
    """Train once with ``options``; a rank of a torchrun launch when its variables are set."""
    if str(ROOT / "tests") not in sys.path:
        sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    torch.set_num_threads(1)
    from lorakit import LoraConfig, get_peft_model
    from lorakit.train import TrainConfig, Trainer
    from tiny_models import tiny_llama
    from train.conftest import CAUSAL_CORPUS, build_causal_tokenizer

    faulthandler.dump_traceback_later(RUN_TIMEOUT_S - 20)  # a hung rank shows where it waits
    rank = int(os.environ.get("RANK", "0"))
    output_dir = Path(options["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"pid-{rank}").write_text(str(os.getpid()))
    reduced_bytes: list[int] = []
    ignored: list[str] = []
    if options["count_bytes"] and options["strategy"] == "fsdp":
        count_scattered_bytes(reduced_bytes)
    elif options["count_bytes"]:
        count_reduced_bytes(reduced_bytes, ignored)
    config = TrainConfig(
        max_steps=options["max_steps"],
        batch_size=options["batch_size"],
        gradient_accumulation_steps=options["accumulation"],
        learning_rate=0.01,
        lr_scheduler="cosine",
        warmup_steps=1,
        weight_decay=0.01,
        save_steps=options["save_steps"],
        save_total_limit=3,
        logging_steps=1,
        seed=3,
        gradient_checkpointing=options["gradient_checkpointing"],
        output_dir=str(output_dir),
        resume=True,
        strategy=options["strategy"],
    )
    tokenizer = build_causal_tokenizer()
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=options["dropout"], target_modules=["q_proj", "v_proj"]
    )
    torch.manual_seed(11)
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), lora)
    rows = [{"text": text} for text in CAUSAL_CORPUS] * 3
    step_bytes: list[int] = []

    def after_step(trainer: Trainer) -> None:
        step_bytes.append(sum(reduced_bytes))
        reduced_bytes.clear()
        if rank == options["fail_rank"] and trainer.state.step == 2:
            raise RuntimeError(f"deliberate failure in rank {rank}")
        if rank == 0 and trainer.state.step == options["pause_after"]:
            (output_dir / PAUSE_MARKER).write_text(str(trainer.state.step))
            time.sleep(RUN_TIMEOUT_S)  # the test kills us here

    eval_rows = rows[:4] if options["evaluate"] else None  # at the last step
    Trainer(model, tokenizer, config, rows, eval_rows, callbacks=[after_step]).train()
    if options["count_bytes"] and rank == 0:
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        report = {
            "per_step": step_bytes,
            "model_bytes": model_bytes,
            "ignored": ignored,
            "frozen": frozen,
        }
        (output_dir / BYTES_FILE).write_text(json.dumps(report))


def count_reduced_bytes(sink: list[int], ignored: list[str]) -> None:
    """Make the trainer's DDP wrapper log the bytes of every bucket it all-reduces.

    ``ignored`` receives the names DDP leaves out of its start-up broadcast.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import lorakit.train.trainer as trainer_module

    real_wrap = trainer_module.wrap_model

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP reads annotations
        buffer = bucket.buffer()
        sink.append(buffer.numel() * buffer.element_size())
        return default_hooks.allreduce_hook(state, bucket)

    def wrap(*args: Any) -> Any:
        wrapped = real_wrap(*args)
        wrapped.register_comm_hook(None, counting_hook)
        ignored.extend(sorted(wrapped.parameters_to_ignore))
        return wrapped

    trainer_module.wrap_model = wrap


def count_scattered_bytes(sink: list[int]) -> None:
    """Log the input bytes of every gradient reduce-scatter FSDP2 issues (its one reduction)."""
    import torch.distributed as dist

    real_reduce_scatter = dist.reduce_scatter_single

    def counting(*args: Any, **kwargs: Any) -> Any:
        tensor = kwargs["input"]
        sink.append(tensor.numel() * tensor.element_size())
        return real_reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = counting


def launch_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over loopback only
    return env


def torchrun_command(processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    # --standalone: torchrun binds its own free port, so parallel launches never share one.
    return [*launcher, "--standalone"]


def start_worker(output_dir: Path, processes: int, **overrides: Any) -> subprocess.Popen[bytes]:
    """torchrun with ``processes`` ranks; ``processes=0``: plain Python, no torchrun."""
    options = json.dumps({**BASE_OPTIONS, **overrides, "output_dir": str(output_dir)})
    command = (torchrun_command(processes) if processes else [sys.executable]) + [__file__, options]
    return popen(command, ROOT)


def popen(command: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=launch_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # one process group: a timeout kills the whole launch
    )


def communicate(process: subprocess.Popen[bytes]) -> tuple[str, str]:
    """(stdout, stderr) of a launch; on a timeout, stop it and raise ``TimeoutExpired``."""
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # torchrun passes it on to its workers
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
        text = stderr.decode(errors="replace")
        pytest.fail(f"the launch hung for {RUN_TIMEOUT_S} s:\n{text[:3000]}\n...\n{text[-3000:]}")
    return stdout.decode(errors="replace"), stderr.decode(errors="replace")


def finish(process: subprocess.Popen[bytes]) -> str:
    return communicate(process)[1]


def kill(process: subprocess.Popen[bytes], output_dir: Path) -> str:
    """SIGKILL the launcher's process group and every worker it wrote a pid file for."""
    pids = [int(path.read_text()) for path in output_dir.glob("pid-*")]
    os.killpg(process.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    return process.communicate(timeout=30)[1].decode(errors="replace")


def run_worker(output_dir: Path, processes: int, **overrides: Any) -> str:
    process = start_worker(output_dir, processes, **overrides)
    stderr = finish(process)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def read_adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
