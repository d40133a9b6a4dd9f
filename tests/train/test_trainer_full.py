"""The trainer on a plain transformers model: full fine-tuning, saved whole to ``model/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.train import DistributedSetupError, TrainConfig, Trainer
from lorakit.train import trainer as trainer_module
from lorakit.train.data import make_loader
from lorakit.train.distributed import DistributedRun
from lorakit.train.train_errors import UnsavableModelError
from tiny_models import tiny_llama
from train.conftest import CAUSAL_CORPUS

ROWS = [{"text": text} for text in CAUSAL_CORPUS]
# The trainer's fused AdamW against torch's per-tensor loop on the same gradients: a few ulps of
# the update (lr 1e-2); weights are O(0.02-1).
HAND_STEP_ATOL = 1e-6


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_full_fine_tuning_trains_every_parameter_and_saves_the_whole_model(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    import transformers

    model = tiny_llama(vocab_size=len(causal_tokenizer))
    before = _weights(model)
    config = TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-2, output_dir=str(tmp_path))
    summary = Trainer(model, causal_tokenizer, config, ROWS, ROWS).train()

    parameters = dict(model.named_parameters())
    assert all(not torch.equal(before[name], p) for name, p in parameters.items())
    total = sum(p.numel() for p in parameters.values())
    assert summary["trainable_params"] == summary["total_params"] == total
    assert summary["trainable_percent"] == 100.0
    folder = tmp_path / "model"
    assert summary["model_dir"] == str(folder) and "adapter_dir" not in summary
    assert json.loads((tmp_path / "summary.json").read_text())["model_dir"] == str(folder)
    assert not (tmp_path / "adapter").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    trained = _weights(model)
    assert reloaded.state_dict().keys() == trained.keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)  # saved beside the model
    assert (
        tokenizer(CAUSAL_CORPUS[1])["input_ids"] == causal_tokenizer(CAUSAL_CORPUS[1])["input_ids"]
    )


def test_a_full_fine_tuning_step_is_one_adamw_step_on_every_parameter(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    model = tiny_llama(vocab_size=len(causal_tokenizer))
    by_hand = tiny_llama(vocab_size=len(causal_tokenizer))
    config = TrainConfig(
        max_steps=1,
        batch_size=len(ROWS),
        learning_rate=1e-2,
        lr_scheduler="constant",
        max_grad_norm=None,
        output_dir=str(tmp_path),
    )
    trainer = Trainer(model, causal_tokenizer, config, ROWS)
    trainer.train()

    # The same batch (the trainer's loader, same seed) and AdamW over all parameters, by hand.
    loader = make_loader(trainer.train_dataset, causal_tokenizer, batch_size=len(ROWS), seed=0)
    batch = next(iter(loader))
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    by_hand.train()
    by_hand(**batch).loss.backward()
    optimizer.step()
    expected = dict(by_hand.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, expected[name], atol=HAND_STEP_ATOL, rtol=0)


def test_the_adapter_of_a_peft_model_still_goes_to_adapter(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    config = LoraConfig(r=2, target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(vocab_size=len(causal_tokenizer)), config)
    summary = finetune_steps(model, causal_tokenizer, tmp_path)
    assert summary["adapter_dir"] == str(tmp_path / "adapter") and "model_dir" not in summary
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "model").exists()


def finetune_steps(model: torch.nn.Module, tokenizer: Any, folder: Path) -> dict[str, Any]:
    config = TrainConfig(max_steps=1, batch_size=2, output_dir=str(folder))
    return Trainer(model, tokenizer, config, ROWS).train()


class _NoSave(torch.nn.Module):
    """A model the trainer can run but not save: no save_pretrained."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.inner(**batch)


def test_a_model_without_save_pretrained_is_refused_before_training(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    model = _NoSave(tiny_llama(vocab_size=len(causal_tokenizer)))
    before = _weights(model)
    with pytest.raises(UnsavableModelError, match=r"_NoSave .* has no save_pretrained"):
        finetune_steps(model, causal_tokenizer, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_full_fine_tuning_under_fsdp_is_refused_before_training(
    tmp_path: Path, causal_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2-rank launch as rank 0 sees it; no process group is needed to reach the check.
    monkeypatch.setattr(trainer_module, "detect_launch", lambda: DistributedRun(0, 2, 0))
    monkeypatch.setattr(trainer_module, "start_process_group", lambda run, device: False)
    model = tiny_llama(vocab_size=len(causal_tokenizer))
    config = TrainConfig(max_steps=1, batch_size=2, strategy="fsdp", output_dir=str(tmp_path))
    with pytest.raises(DistributedSetupError, match="LlamaForCausalLM is not a PeftModel"):
        Trainer(model, causal_tokenizer, config, ROWS).train()
    assert not any(tmp_path.iterdir())


class _Stop(Exception):
    """Raised by a callback to end a run as a kill would, after a checkpoint."""


def test_full_fine_tuning_checkpoints_resume_to_the_same_weights(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    def run(folder: Path, stop_at: int | None) -> torch.nn.Module:
        torch.manual_seed(0)
        model = tiny_llama(vocab_size=len(causal_tokenizer))
        config = TrainConfig(
            max_steps=4,
            batch_size=2,
            learning_rate=1e-2,
            save_steps=2,
            resume=True,
            output_dir=str(folder),
        )

        def stop(trainer: Trainer) -> None:
            if trainer.state.step == stop_at:
                raise _Stop(f"stopped at step {stop_at}")

        Trainer(model, causal_tokenizer, config, ROWS, callbacks=[stop]).train()
        return model

    straight = run(tmp_path / "straight", stop_at=None)
    with pytest.raises(_Stop, match="stopped at step 2"):
        run(tmp_path / "resumed", stop_at=2)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "checkpoint-2"
    # The whole model is the trainable state: no second copy of it as an adapter folder.
    assert sorted(path.name for path in checkpoint.iterdir() if path.is_dir()) == []
    resumed = run(tmp_path / "resumed", stop_at=None)
    expected = _weights(straight)
    for name, tensor in _weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name
