"""TRL's `SFTTrainer` trains a lorakit model (`LorakitSFTTrainer`); peft reads its adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import UnsupportedOptionError
from tiny_models import tiny_llama
from train.conftest import CAUSAL_CORPUS, EOS, build_causal_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from lorakit.integrations.trl import LorakitSFTTrainer  # noqa: E402

STEPS = 30
# A trained adapter run by lorakit and by peft: both fp32, LoRA summed in another order.
PEFT_OUTPUT_ATOL = 1e-5
# The 4-sentence corpus starts at ln(vocab) ≈ 5.77 on the random base; 30 steps of LoRA on
# every linear layer of the 2 blocks take it about 0.13 lower (the head stays frozen).
MIN_LOSS_DROP = 0.05


def _mean_loss(model: torch.nn.Module, tokenizer: Any) -> float:
    """The causal-LM loss of each corpus sentence (as SFTTrainer tokenizes it), averaged."""
    model.eval()
    losses = []
    with torch.no_grad():
        for text in CAUSAL_CORPUS:
            ids = tokenizer(text + EOS, return_tensors="pt").input_ids
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def _lorakit_model(tokenizer: Any, **overrides: Any) -> PeftModel:
    options: dict[str, Any] = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": "all-linear",
        "task_type": "CAUSAL_LM",
    }
    options.update(overrides)
    return get_peft_model(tiny_llama(vocab_size=len(tokenizer)), LoraConfig(**options))


def _arguments(folder: Path, **overrides: Any) -> Any:
    # SFTConfig's own defaults otherwise: bf16 autocast, gradient checkpointing.
    options: dict[str, Any] = {
        "output_dir": str(folder),
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-1,
        "save_strategy": "steps",
        "save_steps": STEPS,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(overrides)
    return trl.SFTConfig(**options)


def _corpus() -> Any:
    return datasets.Dataset.from_dict({"text": CAUSAL_CORPUS})


def test_sft_trainer_trains_a_lorakit_model_and_peft_loads_its_adapter(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    tokenizer = build_causal_tokenizer()
    model = _lorakit_model(tokenizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss_before = _mean_loss(model, tokenizer)
    trainer = LorakitSFTTrainer(
        model=model, args=_arguments(tmp_path), train_dataset=_corpus(), processing_class=tokenizer
    )
    trainer.train()
    # accelerate ran the forward under bf16 autocast; take that wrapper off (fp32 from here)
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert model.forward.__func__ is type(model).forward
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == STEPS
    assert all("mean_token_accuracy" in row for row in logged)  # TRL's fused head ran
    assert _mean_loss(model, tokenizer) < loss_before - MIN_LOSS_DROP
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name

    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    names = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert "model.safetensors" not in names
    assert json.loads((checkpoint / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    trainer.save_model(str(tmp_path / "final"))
    reference = peft.PeftModel.from_pretrained(
        tiny_llama(vocab_size=len(tokenizer)), str(tmp_path / "final")
    ).eval()
    ids = tokenizer(CAUSAL_CORPUS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = reference(ids).logits, model(input_ids=ids).logits
        base = tiny_llama(vocab_size=len(tokenizer))(ids).logits
    assert torch.allclose(got, expected, atol=PEFT_OUTPUT_ATOL, rtol=0)
    assert not torch.allclose(got, base, atol=1e-3)


def test_a_lorakit_config_as_peft_config_is_refused_with_the_supported_way(
    tmp_path: Path,
) -> None:
    tokenizer = build_causal_tokenizer()
    with pytest.raises(
        UnsupportedOptionError,
        match=r"peft_config=<lorakit LoraConfig>.*get_peft_model\(model, config\)",
    ):
        LorakitSFTTrainer(
            model=tiny_llama(vocab_size=len(tokenizer)),
            args=_arguments(tmp_path),
            train_dataset=_corpus(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_a_peft_config_beside_a_lorakit_model_is_refused(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    tokenizer = build_causal_tokenizer()
    with pytest.raises(
        UnsupportedOptionError, match=r"second, peft adapter.*leave out peft_config"
    ):
        LorakitSFTTrainer(
            model=_lorakit_model(tokenizer),
            args=_arguments(tmp_path),
            train_dataset=_corpus(),
            processing_class=tokenizer,
            peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_an_adapter_on_lm_head_is_refused(tmp_path: Path) -> None:
    tokenizer = build_causal_tokenizer()
    model = _lorakit_model(tokenizer, target_modules=["q_proj", "lm_head"])
    with pytest.raises(UnsupportedOptionError, match=r"lm_head.*neither act nor train"):
        LorakitSFTTrainer(
            model=model,
            args=_arguments(tmp_path),
            train_dataset=_corpus(),
            processing_class=tokenizer,
        )


def test_plain_sft_trainer_with_a_lorakit_model_is_refused_when_built(tmp_path: Path) -> None:
    """trl.SFTTrainer is a transformers.Trainer: it would save the whole state dict (and TRL
    1.16's fused LM head patches the wrapper, failing at the first step); it raises when built,
    naming LorakitSFTTrainer."""
    tokenizer = build_causal_tokenizer()
    with pytest.raises(
        UnsupportedOptionError,
        match=r"whole state dict.*lorakit\.integrations\.trl\.LorakitSFTTrainer in place of "
        r"trl\.SFTTrainer",
    ):
        trl.SFTTrainer(
            model=_lorakit_model(tokenizer, target_modules=["q_proj"]),
            args=_arguments(tmp_path / "out"),
            train_dataset=_corpus(),
            processing_class=tokenizer,
        )
    assert not any((tmp_path / "out").glob("checkpoint-*"))
