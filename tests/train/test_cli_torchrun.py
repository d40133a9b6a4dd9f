"""`torchrun ... -m lorakit train` with flags only (no config file): every flag reaches lorakit.

Two ranks of per-rank batch 2 train the same adapter as one process of batch 4 (the global batch
is per-process batch x processes x accumulation), within the DDP tests' tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from train.cli_support import read_events, save_tiny_causal_model, write_causal_rows
from train.distributed_launch import (
    MATCH_ONE_PROCESS_ATOL,
    communicate,
    popen,
    read_adapter,
    torchrun_command,
)

# Flags whose names torchrun's own parser could take for its options if any were a prefix:
# the rank as --lora-r, plus the steps, seed, scheduler and logging flags.
COMMON_FLAGS = [
    "--model",
    "model",
    "--train-data",
    "train.jsonl",
    "--target-modules",
    "q_proj,v_proj",
    "--lora-r",
    "4",
    "--lora-alpha",
    "8",
    "--lora-dropout",
    "0",
    "--use-rslora",
    "--init-lora-weights",
    "true",
    "--gradient-accumulation-steps",
    "2",
    "--max-steps",
    "4",
    "--learning-rate",
    "0.01",
    "--lr-scheduler",
    "cosine",
    "--warmup-steps",
    "1",
    "--max-grad-norm",
    "1.0",
    "--seed",
    "3",
    "--logging-steps",
    "1",
    "--save-total-limit",
    "1",
]


def _train(cwd: Path, processes: int, batch_size: int, output_dir: str) -> str:
    launcher = torchrun_command(processes) if processes else [sys.executable]
    command = [*launcher, "-m", "lorakit", "train", *COMMON_FLAGS]
    command += ["--batch-size", str(batch_size), "--output-dir", output_dir]
    process = popen(command, cwd)
    stdout, stderr = communicate(process)
    assert process.returncode == 0, stderr[-4000:]
    return stdout


def test_torchrun_with_flags_only_matches_one_process(tmp_path: Path) -> None:
    save_tiny_causal_model(tmp_path / "model")
    write_causal_rows(tmp_path / "train.jsonl")
    stdout = _train(tmp_path, 2, batch_size=2, output_dir="ddp")
    assert stdout.count("trainable_params") == 1  # rank 0 alone prints the summary
    _train(tmp_path, 0, batch_size=4, output_dir="single")
    distributed, single = read_adapter(tmp_path / "ddp"), read_adapter(tmp_path / "single")
    assert distributed.keys() == single.keys()
    # q_proj and v_proj of 2 layers, A and B each, at rank 4.
    assert len(single) == 8 and all(
        tensor.shape[0] == 4 or tensor.shape[1] == 4 for tensor in single.values()
    )
    assert all(single[name].abs().max() > 1e-3 for name in single if "lora_B" in name)
    for name, tensor in single.items():
        torch.testing.assert_close(
            distributed[name], tensor, atol=MATCH_ONE_PROCESS_ATOL, rtol=0, msg=name
        )
    ddp_losses = [event["loss"] for event in read_events(tmp_path / "ddp")]
    single_losses = [event["loss"] for event in read_events(tmp_path / "single")]
    assert len(ddp_losses) == 4
    torch.testing.assert_close(
        torch.tensor(ddp_losses), torch.tensor(single_losses), atol=MATCH_ONE_PROCESS_ATOL, rtol=0
    )
