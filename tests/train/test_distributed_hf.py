"""A lorakit ``PeftModel`` trains under ``LorakitTrainer`` on 2 ranks (gloo on CPU).

``LorakitTrainer`` (``transformers.Trainer`` for lorakit models; the plain class refuses them)
does its own DDP wrapping through accelerate; this checks that a lorakit model goes through
it, launched by ``torchrun`` and by ``accelerate launch``: both ranks see world size 2 and
rank 0 saves an adapter that moved (``tests/integrations/test_transformers_distributed.py``
checks that adapter against one process).

``accelerate launch --multi_gpu`` starts its processes with torchrun, so on a machine without
GPUs it runs CPU ranks over gloo. ``accelerate launch --cpu --num_processes N`` is not that:
without ``--mpirun_hostfile`` (and an MPI install) it starts a single process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from train.distributed_launch import ROOT, communicate, popen, read_adapter, torchrun_command


def worker(output_dir: str) -> None:
    """Train 2 steps with ``LorakitTrainer``; rank 0 saves the adapter."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    torch.set_num_threads(1)
    import transformers

    from lorakit import LoraConfig, get_peft_model
    from lorakit.integrations.transformers import LorakitTrainer
    from tiny_models import tiny_llama
    from train.conftest import CAUSAL_CORPUS, build_causal_tokenizer

    tokenizer = build_causal_tokenizer()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), lora)
    rows = []
    for text in CAUSAL_CORPUS * 2:
        ids = tokenizer(text)["input_ids"]
        rows.append({"input_ids": ids, "labels": ids})
    arguments = transformers.TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        max_steps=2,
        learning_rate=0.01,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
    )
    trainer = LorakitTrainer(model=model, args=arguments, train_dataset=rows)
    trainer.train()
    rank = os.environ.get("RANK", "0")
    report = {"world_size": trainer.args.world_size, "mode": str(trainer.args.parallel_mode)}
    Path(output_dir, f"rank-{rank}.json").write_text(json.dumps(report))
    if trainer.is_world_process_zero():
        model.save_pretrained(Path(output_dir) / "adapter")
    # Free the DDP wrapper and stop the process group before exit: left to interpreter
    # teardown, gloo's threads were still running and a rank aborted ("terminate called
    # without an active exception", exit -6) in about one launch in three.
    del trainer
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _accelerate_launch(processes: int) -> list[str]:
    options = f"--multi_gpu --num_processes {processes} --num_machines 1 --mixed_precision no"
    # --main_process_port 0: accelerate picks a free port (parallel launches never share one).
    options += " --dynamo_backend no --main_process_port 0"
    return [sys.executable, "-m", "accelerate.commands.launch", *options.split()]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_transformers_trainer_runs_a_peft_model_on_two_ranks(tmp_path: Path, launcher: str) -> None:
    pytest.importorskip("accelerate")
    command = torchrun_command(2) if launcher == "torchrun" else _accelerate_launch(2)
    process = popen([*command, __file__, str(tmp_path)], ROOT)
    _, stderr = communicate(process)
    assert process.returncode == 0, stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert report == {"world_size": 2, "mode": "ParallelMode.DISTRIBUTED"}
    adapter = read_adapter(tmp_path)
    assert len(adapter) == 8
    assert all(adapter[name].abs().max() > 0 for name in adapter if "lora_B" in name)  # from 0


if __name__ == "__main__":
    worker(sys.argv[1])
