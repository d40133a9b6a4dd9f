"""A lorakit PeftModel trains under transformers' Trainer (through `LorakitTrainer`, the
subclass lorakit models need), and its saved adapter loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.integrations.transformers import LorakitTrainer
from lorakit.train.collate import DataCollator
from lorakit.train.data import prepare_datasets
from tiny_models import tiny_llama
from train.conftest import CAUSAL_CORPUS


def _mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_peft_model_trains_under_transformers_trainer(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    train, _ = prepare_datasets([{"text": t} for t in CAUSAL_CORPUS], causal_tokenizer)
    collator = DataCollator.for_tokenizer(causal_tokenizer)
    whole = collator(train.features)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(vocab_size=len(causal_tokenizer)), lora)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss_before = _mean_loss(model, whole)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=15,
        per_device_train_batch_size=2,
        learning_rate=3e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=5,
        seed=0,
        # PeftModel.forward takes **kwargs, so transformers cannot tell which columns it reads.
    )
    trainer = LorakitTrainer(
        model=model, args=arguments, train_dataset=train.features, data_collator=collator
    )
    trainer.train()
    loss_after = _mean_loss(model, whole)
    assert loss_after < loss_before - 0.1
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        tiny_llama(vocab_size=len(causal_tokenizer)), tmp_path / "adapter"
    )
    assert _mean_loss(reloaded, whole) == loss_after
