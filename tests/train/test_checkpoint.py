"""Checkpoint files, rotation, RNG states, resume checks and the non-finite loss stop."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.train import CheckpointError, NonFiniteLossError, TrainConfig, Trainer
from lorakit.train.checkpoint import capture_rng_state, list_checkpoints, restore_rng_state
from tiny_models import tiny_llama
from train.conftest import CAUSAL_CORPUS

ROWS = [{"text": text} for text in CAUSAL_CORPUS]


def _model(tokenizer: Any) -> Any:
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(tiny_llama(vocab_size=len(tokenizer)), config)


def _config(output_dir: Path, **changes: Any) -> TrainConfig:
    options: dict[str, Any] = dict(
        max_steps=6, batch_size=2, learning_rate=1e-2, save_steps=1, save_total_limit=2
    )
    options.update(changes)
    return TrainConfig(output_dir=str(output_dir), **options)


def test_rng_states_round_trip() -> None:
    state = capture_rng_state()
    first = (random.random(), numpy.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), numpy.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_only_the_newest_checkpoints_are_kept_and_hold_every_part(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    Trainer(_model(causal_tokenizer), causal_tokenizer, _config(tmp_path), ROWS).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-6"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-5",
        "checkpoint-6",
    ]  # no temporary folders left behind
    newest = tmp_path / "checkpoints" / "checkpoint-6"
    parts = {p.name for p in newest.iterdir()}
    assert parts == {
        "adapter",
        "optimizer.pt",
        "scheduler.pt",
        "trainable.safetensors",
        "trainer_state.json",
        "trainer_state.pt",
    }
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["loader"]["position"] == 2  # 4 rows / 2 = 2 per epoch
    assert state["loader"]["epoch"] == 2  # 6 batches of 2 per epoch: epochs 0, 1, 2


def test_a_save_failing_midway_keeps_the_earlier_checkpoints_whole(
    tmp_path: Path, causal_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save
    saved_schedulers: list[Path] = []

    def save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "scheduler.pt":
            saved_schedulers.append(Path(path))
            if len(saved_schedulers) == 3:  # the third checkpoint dies half-way through a file
                Path(path).write_bytes(b"half a scheduler")
                raise OSError("disk full while writing scheduler.pt")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    config = _config(tmp_path, save_total_limit=5)
    trainer = Trainer(_model(causal_tokenizer), causal_tokenizer, config, ROWS)
    with pytest.raises(OSError, match=r"disk full while writing scheduler\.pt"):
        trainer.train()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert all(path.parent.name.startswith(".checkpoint-") for path in saved_schedulers)
    for step in (1, 2):
        state = torch.load(folder / f"checkpoint-{step}" / "trainer_state.pt", weights_only=True)
        assert state["step"] == step
        scheduler = torch.load(folder / f"checkpoint-{step}" / "scheduler.pt", weights_only=True)
        assert scheduler["last_epoch"] == step


def test_resume_refuses_other_batch_size(tmp_path: Path, causal_tokenizer: Any) -> None:
    Trainer(
        _model(causal_tokenizer), causal_tokenizer, _config(tmp_path, max_steps=2), ROWS
    ).train()
    config = _config(tmp_path, batch_size=1, resume=True)
    trainer = Trainer(_model(causal_tokenizer), causal_tokenizer, config, ROWS)
    with pytest.raises(CheckpointError, match=r"batch_size: checkpoint 2, now 1"):
        trainer.train()


def test_resume_from_a_folder_that_is_no_checkpoint(tmp_path: Path, causal_tokenizer: Any) -> None:
    config = _config(tmp_path, resume=str(tmp_path / "nowhere"))
    trainer = Trainer(_model(causal_tokenizer), causal_tokenizer, config, ROWS)
    with pytest.raises(CheckpointError, match=r"is not a checkpoint folder .* Checkpoints in"):
        trainer.train()


def test_resume_true_without_checkpoint_starts_afresh(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    config = _config(tmp_path, max_steps=2, save_steps=None, resume=True)
    summary = Trainer(_model(causal_tokenizer), causal_tokenizer, config, ROWS).train()
    assert summary["steps"] == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    model = _model(causal_tokenizer)

    def poison(trainer: Trainer) -> None:
        if trainer.state.step == 3:  # after checkpoint 2 (save_steps=2), before 4
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    config = _config(tmp_path, save_steps=2, save_total_limit=3)
    trainer = Trainer(model, causal_tokenizer, config, ROWS, callbacks=[poison])
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 4.*checkpoint-2"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    good = torch.load(tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.pt")
    assert good["step"] == 2
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"event": "error", "step": 4, "error": "non-finite loss: nan"}


def test_fresh_run_refuses_an_output_dir_with_earlier_checkpoints(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    Trainer(
        _model(causal_tokenizer), causal_tokenizer, _config(tmp_path, max_steps=2), ROWS
    ).train()
    trainer = Trainer(_model(causal_tokenizer), causal_tokenizer, _config(tmp_path), ROWS)
    with pytest.raises(
        CheckpointError, match=r"already holds checkpoints .*checkpoint-2.*resume=True"
    ):
        trainer.train()
