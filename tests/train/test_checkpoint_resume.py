"""A run killed with SIGKILL after a checkpoint, then resumed, ends bit-identical to one run.

The worker (this file run as a script) trains a tiny Llama with LoRA (dropout on, so the RNG
state matters) from a YAML config: 8 optimizer steps of 2 accumulated micro-batches, crossing
epochs, a checkpoint every 2 steps. The interrupted run pauses after step 5 (checkpoint 4
written, 6 not) and the test SIGKILLs it there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PAUSE_MARKER = "paused-at-step"
KILL_AFTER_STEP = 5
CONFIG_YAML = """\
max_steps: 8
batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 0.01
lr_scheduler: cosine
warmup_steps: 2
weight_decay: 0.01
save_steps: 2
save_total_limit: 3
logging_steps: 1
seed: 3
"""


def worker(config_path: str, output_dir: str, pause_after: int) -> None:
    """Train from the config; with ``pause_after > 0``, stop (sleep) after that step."""
    if str(ROOT / "tests") not in sys.path:
        sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    torch.set_num_threads(1)
    from lorakit import LoraConfig, get_peft_model
    from lorakit.train import Trainer, load_train_config
    from tiny_models import tiny_llama
    from train.conftest import CAUSAL_CORPUS, build_causal_tokenizer

    config = load_train_config(config_path, {"output_dir": output_dir, "resume": True})
    tokenizer = build_causal_tokenizer()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), lora)
    rows = [{"text": text} for text in CAUSAL_CORPUS] * 2  # 8 rows: 4 micro-batches per epoch

    def pause(trainer: Trainer) -> None:
        if trainer.state.step == pause_after:
            (Path(output_dir) / PAUSE_MARKER).write_text(str(trainer.state.step))
            time.sleep(120)  # the test kills us here

    Trainer(model, tokenizer, config, rows, callbacks=[pause]).train()


def _start(config: Path, output_dir: Path, pause_after: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, str(config), str(output_dir), str(pause_after)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen[bytes]) -> None:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()


def _adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))


def _train_losses(output_dir: Path) -> list[tuple[int, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_sigkilled_run_resumes_to_a_bit_identical_adapter(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG_YAML)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    worker(str(config), str(straight), pause_after=0)  # in this process: one start less

    victim = _start(config, interrupted, pause_after=KILL_AFTER_STEP)
    deadline = time.monotonic() + 60
    while not (interrupted / PAUSE_MARKER).exists():
        assert victim.poll() is None, victim.communicate()[1].decode()
        assert time.monotonic() < deadline, "the worker never reached the pause step"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert not (interrupted / "adapter").exists()

    _finish(_start(config, interrupted, pause_after=0))  # resume=True in the worker
    expected, resumed = _adapter(straight), _adapter(interrupted)
    assert sorted(expected) == sorted(resumed) and len(expected) == 8  # 2 layers x q, v x A, B
    assert all(tensor.abs().sum() > 0 for key, tensor in expected.items() if "lora_B" in key)
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), key
    assert _train_losses(interrupted) == _train_losses(straight)
    assert [step for step, _ in _train_losses(straight)] == list(range(1, 9))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
