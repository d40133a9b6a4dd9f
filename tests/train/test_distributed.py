"""Real ``torchrun`` launches (2 processes, gloo on CPU) of the trainer on a tiny Llama.

The worker (this file run as a script, by torchrun or plain Python) trains LoRA on
``q_proj``/``v_proj`` over 12 rows of different lengths, so ranks hold different label counts and
the steps cross epoch ends. Each subprocess is bounded by a timeout, so a hang fails the test.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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
    if options["count_bytes"]:
        _count_reduced_bytes(reduced_bytes, ignored)
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

    Trainer(model, tokenizer, config, rows, callbacks=[after_step]).train()
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


def _count_reduced_bytes(sink: list[int], ignored: list[str]) -> None:
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

    trainer_module.wrap_model = wrap  # type: ignore[assignment]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over loopback only
    return env


def _torchrun(processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    # --standalone: torchrun binds its own free port, so parallel launches never share one.
    return [*launcher, "--standalone"]


def _start(output_dir: Path, processes: int, **overrides: Any) -> subprocess.Popen[bytes]:
    """torchrun with ``processes`` ranks; ``processes=0``: plain Python, no torchrun."""
    options = json.dumps({**BASE_OPTIONS, **overrides, "output_dir": str(output_dir)})
    command = (_torchrun(processes) if processes else [sys.executable]) + [__file__, options]
    return _popen(command, ROOT)


def _popen(command: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # one process group: a timeout kills the whole launch
    )


def _communicate(process: subprocess.Popen[bytes]) -> tuple[str, str]:
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


def _finish(process: subprocess.Popen[bytes]) -> str:
    return _communicate(process)[1]


def _kill(process: subprocess.Popen[bytes], output_dir: Path) -> str:
    """SIGKILL the launcher's process group and every worker it wrote a pid file for."""
    pids = [int(path.read_text()) for path in output_dir.glob("pid-*")]
    os.killpg(process.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    return process.communicate(timeout=30)[1].decode(errors="replace")


def _run(output_dir: Path, processes: int, **overrides: Any) -> str:
    process = _start(output_dir, processes, **overrides)
    stderr = _finish(process)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def _adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-rank run (per-rank batch 2 x 2 ranks x 2 accumulated) counting reduced bytes.

    With gradient checkpointing (reentrant, so DDP's hooks fire in nested backward passes).
    """
    output_dir = tmp_path_factory.mktemp("ddp")
    _run(output_dir, 2, count_bytes=True, gradient_checkpointing=True)
    yield output_dir


def test_two_processes_match_one_process_with_the_same_global_batch(
    two_process_run: Path, tmp_path: Path
) -> None:
    _run(tmp_path, 0, batch_size=4)  # one process: batch 4 x 2 accumulated = 8, as above
    distributed, single = _adapter(two_process_run), _adapter(tmp_path)
    assert distributed.keys() == single.keys()
    initial_b = [name for name in single if "lora_B" in name]
    assert all(single[name].abs().max() > 1e-3 for name in initial_b)  # training moved B
    for name, tensor in single.items():
        torch.testing.assert_close(
            distributed[name], tensor, atol=MATCH_ONE_PROCESS_ATOL, rtol=0, msg=name
        )
    metrics = [json.loads(line) for line in (two_process_run / "metrics.jsonl").open()]
    single_metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    losses = [event["loss"] for event in metrics if event["event"] == "train"]
    single_losses = [event["loss"] for event in single_metrics if event["event"] == "train"]
    assert losses == pytest.approx(single_losses, abs=MATCH_ONE_PROCESS_ATOL)


def test_only_adapter_gradients_are_all_reduced(two_process_run: Path) -> None:
    adapter_bytes = sum(t.numel() * t.element_size() for t in _adapter(two_process_run).values())
    report = json.loads((two_process_run / BYTES_FILE).read_text())
    # q_proj, v_proj of 2 layers: A 4x32 and B (32 or 16)x4 in float32.
    assert adapter_bytes == 4 * 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert report["per_step"] == [adapter_bytes] * BASE_OPTIONS["max_steps"]  # once a step
    assert adapter_bytes * 20 < report["model_bytes"]
    # DDP's start-up broadcast skips the frozen base weights: only the adapter is sent.
    assert len(report["frozen"]) > 10 and set(report["frozen"]) <= set(report["ignored"])
    assert not [name for name in report["ignored"] if "lora_" in name]


def test_a_failing_rank_ends_the_whole_run_with_its_message(tmp_path: Path) -> None:
    process = _start(tmp_path, 2, fail_rank=1, save_steps=None)
    stderr = _finish(process)  # a hang would raise TimeoutExpired
    assert process.returncode != 0
    assert "deliberate failure in rank 1" in stderr
    assert "rank 1 of 2 failed" in stderr
    assert not (tmp_path / "adapter").exists()


def test_killed_run_resumes_under_torchrun_to_the_same_adapter(tmp_path: Path) -> None:
    uninterrupted, interrupted = tmp_path / "whole", tmp_path / "killed"
    _run(uninterrupted, 2, dropout=0.3)  # dropout: each rank's RNG state must be resumed
    process = _start(interrupted, 2, dropout=0.3, pause_after=3)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (interrupted / PAUSE_MARKER).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stderr = _kill(process, interrupted)
            pytest.fail(f"the run ended or hung before pausing: {stderr[-4000:]}")
        time.sleep(0.2)
    _kill(process, interrupted)
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2"]
    assert not (interrupted / "adapter").exists()
    _run(interrupted, 2, dropout=0.3)
    whole, resumed = _adapter(uninterrupted), _adapter(interrupted)
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name


def test_lorakit_train_command_under_torchrun(tmp_path: Path) -> None:
    from tiny_models import tiny_llama
    from train.conftest import CAUSAL_CORPUS, build_causal_tokenizer

    tokenizer = build_causal_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in CAUSAL_CORPUS)
    )
    arguments = "--model model --train-data train.jsonl --target-modules q_proj,v_proj "
    arguments += "--max-steps 2 --batch-size 1 --logging-steps 1 --output-dir out"
    command = [*_torchrun(2), "-m", "lorakit", "train", *arguments.split()]
    process = _popen(command, tmp_path)
    stdout, stderr = _communicate(process)
    assert process.returncode == 0, stderr[-4000:]
    assert stdout.count("trainable_params") == 1  # rank 0 prints the summary
    events = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert [event["step"] for event in events] == [1, 2]
    assert len(_adapter(tmp_path / "out")) == 8  # A and B of q_proj, v_proj in 2 layers


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
