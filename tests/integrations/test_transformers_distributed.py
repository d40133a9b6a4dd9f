"""`LorakitTrainer` under ``torchrun`` (2 CPU ranks, gloo) ends at the one-process adapter.

The same global batch of 4 rows, as 2 ranks × 2 rows and as 1 process × 4 rows: accelerate
hands rank r the r-th of each group of per-rank batches drawn from one seeded sampler, and
`Trainer` normalises the loss by the tokens of the whole global batch, so the averaged
gradients, and the adapters after each AdamW step, are the same up to float32 summation
order. Rows have one length (no padding) and dropout is 0 (each process would draw its own
masks).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from train.distributed_launch import (
    MATCH_ONE_PROCESS_ATOL,
    ROOT,
    communicate,
    popen,
    torchrun_command,
)

GLOBAL_BATCH, ROWS, LENGTH, VOCAB, STEPS = 4, 16, 12, 128, 3


def train(output_dir: str, processes: int) -> None:
    """Train STEPS steps of LorakitTrainer with GLOBAL_BATCH rows per step over `processes`
    ranks; the adapter goes to `output_dir/adapter` (written by rank 0 only)."""
    import transformers

    from lorakit import LoraConfig, get_peft_model
    from lorakit.integrations.transformers import LorakitTrainer
    from tiny_models import tiny_llama

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(vocab_size=VOCAB), config)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    arguments = transformers.TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // processes,
        max_steps=STEPS,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    rows = [{"input_ids": row, "labels": row} for row in ids]
    trainer = LorakitTrainer(model=model, args=arguments, train_dataset=rows)
    trainer.train()
    report = {"world_size": trainer.args.world_size, "mode": str(trainer.args.parallel_mode)}
    Path(output_dir, f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))
    trainer.save_model(str(Path(output_dir) / "adapter"))
    del trainer  # free the DDP wrapper before the process group goes (test_distributed_hf)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_two_ranks_give_the_one_process_adapter(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    distributed = tmp_path / "two"
    process = popen([*torchrun_command(2), __file__, str(distributed)], ROOT)
    _, stderr = communicate(process)
    assert process.returncode == 0, stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((distributed / f"rank-{rank}.json").read_text())
        assert report == {"world_size": 2, "mode": "ParallelMode.DISTRIBUTED"}
    single = tmp_path / "one"
    train(str(single), processes=1)
    expected, got = _adapter(single), _adapter(distributed)
    assert sorted(got) == sorted(expected) and len(got) == 8
    assert all(expected[name].abs().max() > 1e-3 for name in expected if "lora_B" in name)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=MATCH_ONE_PROCESS_ATOL, rtol=0)


def _main(arguments: list[str]) -> Any:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    torch.set_num_threads(1)
    return train(arguments[0], processes=int(os.environ.get("WORLD_SIZE", "1")))


if __name__ == "__main__":
    _main(sys.argv[1:])
