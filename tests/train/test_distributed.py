"""Real ``torchrun`` launches (2 processes, gloo on CPU) of the trainer on a tiny Llama (DDP).

The worker and the bounded launches live in ``distributed_launch.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from train.distributed_launch import (
    BASE_OPTIONS,
    BYTES_FILE,
    MATCH_ONE_PROCESS_ATOL,
    PAUSE_MARKER,
    RUN_TIMEOUT_S,
    communicate,
    finish,
    kill,
    popen,
    read_adapter,
    run_worker,
    start_worker,
    torchrun_command,
)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-rank run (per-rank batch 2 x 2 ranks x 2 accumulated) counting reduced bytes.

    With gradient checkpointing (reentrant, so DDP's hooks fire in nested backward passes).
    """
    output_dir = tmp_path_factory.mktemp("ddp")
    run_worker(output_dir, 2, count_bytes=True, gradient_checkpointing=True)
    yield output_dir


def test_two_processes_match_one_process_with_the_same_global_batch(
    two_process_run: Path, tmp_path: Path
) -> None:
    run_worker(tmp_path, 0, batch_size=4)  # one process: batch 4 x 2 accumulated = 8, as above
    distributed, single = read_adapter(two_process_run), read_adapter(tmp_path)
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
    adapter = read_adapter(two_process_run)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    report = json.loads((two_process_run / BYTES_FILE).read_text())
    # q_proj, v_proj of 2 layers: A 4x32 and B (32 or 16)x4 in float32.
    assert adapter_bytes == 4 * 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert report["per_step"] == [adapter_bytes] * BASE_OPTIONS["max_steps"]  # once a step
    assert adapter_bytes * 20 < report["model_bytes"]
    # DDP's start-up broadcast skips the frozen base weights: only the adapter is sent.
    assert len(report["frozen"]) > 10 and set(report["frozen"]) <= set(report["ignored"])
    assert not [name for name in report["ignored"] if "lora_" in name]


def test_a_failing_rank_ends_the_whole_run_with_its_message(tmp_path: Path) -> None:
    process = start_worker(tmp_path, 2, fail_rank=1, save_steps=None)
    stderr = finish(process)  # a hang would raise TimeoutExpired
    assert process.returncode != 0
    assert "deliberate failure in rank 1" in stderr
    assert "rank 1 of 2 failed" in stderr
    assert not (tmp_path / "adapter").exists()


def test_killed_run_resumes_under_torchrun_to_the_same_adapter(tmp_path: Path) -> None:
    uninterrupted, interrupted = tmp_path / "whole", tmp_path / "killed"
    run_worker(uninterrupted, 2, dropout=0.3)  # dropout: each rank's RNG state must be resumed
    process = start_worker(interrupted, 2, dropout=0.3, pause_after=3)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (interrupted / PAUSE_MARKER).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stderr = kill(process, interrupted)
            pytest.fail(f"the run ended or hung before pausing: {stderr[-4000:]}")
        time.sleep(0.2)
    kill(process, interrupted)
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2"]
    assert not (interrupted / "adapter").exists()
    run_worker(interrupted, 2, dropout=0.3)
    whole, resumed = read_adapter(uninterrupted), read_adapter(interrupted)
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
    command = [*torchrun_command(2), "-m", "lorakit", "train", *arguments.split()]
    process = popen(command, tmp_path)
    stdout, stderr = communicate(process)
    assert process.returncode == 0, stderr[-4000:]
    assert stdout.count("trainable_params") == 1  # rank 0 prints the summary
    events = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert [event["step"] for event in events] == [1, 2]
    assert len(read_adapter(tmp_path / "out")) == 8  # A and B of q_proj, v_proj in 2 layers
