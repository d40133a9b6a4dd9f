"""`LorakitTrainer`: transformers' Trainer writes adapter checkpoints and resumes them exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from lorakit.errors import AdapterStateError, UnsupportedOptionError
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from lorakit.integrations.transformers import LorakitTrainer  # noqa: E402

ROWS, LENGTH, VOCAB = 16, 12, 128
# 16 rows in batches of 4: an epoch is 4 steps, so a resume at step 3 crosses an epoch.
STEPS, SAVE_EVERY = 6, 3
# Outputs of lorakit and peft on the same adapter: both fp32, LoRA summed in another order.
PEFT_OUTPUT_ATOL = 1e-5


def _dataset(seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def _model(lora_alpha: int = 8, seed: int = 0) -> PeftModel:
    base = tiny_llama(vocab_size=VOCAB)
    torch.manual_seed(seed)  # the adapter's initial A, B
    config = LoraConfig(
        r=4,
        lora_alpha=lora_alpha,
        lora_dropout=0.1,  # random masks: resuming must restore the RNG too
        target_modules=["q_proj", "v_proj"],
        init_lora_weights="gaussian",
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # B is zero at init: make the starting point count
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return model


def _arguments(folder: Path, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "output_dir": str(folder),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "save_strategy": "steps",
        "save_steps": SAVE_EVERY,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _adapter(model: PeftModel) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}


def _losses(trainer: Any) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of STEPS steps, a checkpoint every SAVE_EVERY: its folder, losses and adapter."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    model = _model()
    trainer = LorakitTrainer(model=model, args=_arguments(folder), train_dataset=_dataset(1))
    trainer.train()
    return {
        "folder": folder,
        "model": model,
        "losses": _losses(trainer),
        "adapter": _adapter(model),
    }


def test_checkpoints_are_adapter_folders_peft_reads(uninterrupted: dict[str, Any]) -> None:
    peft = pytest.importorskip("peft")
    model: PeftModel = uninterrupted["model"]
    for step in (SAVE_EVERY, STEPS):
        checkpoint = uninterrupted["folder"] / f"checkpoint-{step}"
        names = {path.name for path in checkpoint.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not names & {
            "model.safetensors",
            "pytorch_model.bin",
            "model.safetensors.index.json",
        }
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"} <= names
        saved = load_file(checkpoint / "adapter_model.safetensors")
        assert set(saved) == set(uninterrupted["adapter"])
        assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 4
    last = load_file(uninterrupted["folder"] / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    for key, value in uninterrupted["adapter"].items():
        assert torch.equal(last[key], value), key
    reference = peft.PeftModel.from_pretrained(
        tiny_llama(vocab_size=VOCAB), str(uninterrupted["folder"] / f"checkpoint-{STEPS}")
    ).eval()
    ids = _dataset(2)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        expected, got = reference(ids).logits, model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=PEFT_OUTPUT_ATOL, rtol=0)
    assert not torch.allclose(got, tiny_llama(vocab_size=VOCAB)(ids).logits, atol=1e-3)


def test_resume_from_checkpoint_continues_exactly(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    """A fresh model with other adapter weights, resumed from step 3, ends bit for bit where
    the uninterrupted run ended (same CPU, same ops): tolerance zero."""
    model = _model(seed=5)
    assert not torch.equal(
        _adapter(model)[next(iter(uninterrupted["adapter"]))],
        uninterrupted["adapter"][next(iter(uninterrupted["adapter"]))],
    )
    trainer = LorakitTrainer(model=model, args=_arguments(tmp_path), train_dataset=_dataset(1))
    trainer.train(resume_from_checkpoint=str(uninterrupted["folder"] / f"checkpoint-{SAVE_EVERY}"))
    resumed = _losses(trainer)  # steps 1-3 come from the checkpoint's trainer_state.json
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        assert resumed[step] == uninterrupted["losses"][step], step
    for key, value in _adapter(model).items():
        assert torch.equal(value, uninterrupted["adapter"][key]), key


def test_resume_refuses_a_checkpoint_of_another_config(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    model = _model(lora_alpha=16)
    before = _adapter(model)
    trainer = LorakitTrainer(model=model, args=_arguments(tmp_path), train_dataset=_dataset(1))
    with pytest.raises(
        AdapterStateError, match=r"lora_alpha is 16 in the model, 8 in the checkpoint"
    ):
        trainer.train(resume_from_checkpoint=str(uninterrupted["folder"] / "checkpoint-3"))
    for key, value in _adapter(model).items():
        assert torch.equal(value, before[key]), key


def test_load_best_model_at_end_puts_the_best_adapter_back(tmp_path: Path) -> None:
    """ "Best" here is the highest loss on training rows (which falls as the run learns), so
    the best checkpoint is the first, not the last the model ends at."""
    model = _model()
    arguments = _arguments(
        tmp_path,
        save_steps=2,
        learning_rate=5e-2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    trainer = LorakitTrainer(
        model=model, args=arguments, train_dataset=_dataset(1), eval_dataset=_dataset(1)[:8]
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2"
    saved = load_file(best / "adapter_model.safetensors")
    last = load_file(tmp_path / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert any(not torch.equal(saved[key], last[key]) for key in saved)
    for key, value in _adapter(model).items():
        assert torch.equal(value, saved[key]), key


def test_label_smoothing_on_a_lorakit_causal_lm_is_refused(tmp_path: Path) -> None:
    arguments = _arguments(tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(UnsupportedOptionError, match=r"label_smoothing_factor=0\.1.*unshifted"):
        LorakitTrainer(model=_model(), args=arguments, train_dataset=_dataset(1))


def test_other_models_are_saved_as_trainer_saves_them(tmp_path: Path) -> None:
    model = tiny_llama(vocab_size=VOCAB)
    arguments = _arguments(tmp_path, max_steps=1, save_steps=1)
    LorakitTrainer(model=model, args=arguments, train_dataset=_dataset(1)).train()
    names = {path.name for path in (tmp_path / "checkpoint-1").iterdir()}
    assert "model.safetensors" in names
    assert "adapter_config.json" not in names


def test_lorakit_trainer_class_puts_the_mixin_first() -> None:
    from lorakit.integrations.transformers import LorakitTrainerMixin, lorakit_trainer_class

    class CustomTrainer(transformers.Trainer):
        pass

    combined = lorakit_trainer_class(CustomTrainer)
    assert combined.__name__ == "LorakitCustomTrainer"
    assert combined.__mro__[1:3] == (LorakitTrainerMixin, CustomTrainer)
    assert LorakitTrainer.__mro__[1:3] == (LorakitTrainerMixin, transformers.Trainer)


def _tiny_bert_question_answering() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertForQuestionAnswering(config).eval()


def test_the_inner_models_inputs_and_labels_are_kept(tmp_path: Path) -> None:
    """A QA model reads `start_positions`/`end_positions`, which the wrapper's forward does not
    name: they stay in the batches (train loss) and are the labels (eval loss)."""
    model = get_peft_model(
        _tiny_bert_question_answering(),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="QUESTION_ANS"),
    )
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (8, LENGTH), generator=generator)
    starts = torch.randint(0, LENGTH // 2, (8,), generator=generator)
    rows = [
        {"input_ids": row, "start_positions": start, "end_positions": start + 2}
        for row, start in zip(ids, starts, strict=True)
    ]
    arguments = _arguments(tmp_path, max_steps=2, save_strategy="no", per_device_eval_batch_size=8)
    trainer = LorakitTrainer(model=model, args=arguments, train_dataset=rows, eval_dataset=rows)
    assert trainer.label_names == ["start_positions", "end_positions"]
    trainer.train()
    assert len(_losses(trainer)) == 2
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, start_positions=starts, end_positions=starts + 2).loss
    assert trainer.evaluate()["eval_loss"] == pytest.approx(float(expected), abs=1e-6)


def test_plain_trainer_with_a_lorakit_model_is_refused_when_built(tmp_path: Path) -> None:
    """transformers.Trainer saves a model it does not know (not peft's classes) as its whole
    state dict; with a lorakit model it raises when built, before anything is written."""
    arguments = _arguments(tmp_path / "out", max_steps=1, save_steps=1)
    with pytest.raises(
        UnsupportedOptionError,
        match=r"whole state dict.*lorakit\.integrations\.transformers\.LorakitTrainer in place "
        r"of transformers\.Trainer.*lorakit_trainer_class\(YourTrainer\)",
    ):
        transformers.Trainer(model=_model(), args=arguments, train_dataset=_dataset(1))

    class CustomTrainer(transformers.Trainer):
        pass

    with pytest.raises(UnsupportedOptionError, match=r"LorakitTrainer in place"):
        CustomTrainer(model=_model(), args=arguments, train_dataset=_dataset(1))
    assert not any((tmp_path / "out").glob("checkpoint-*"))


def test_lorakit_trainers_read_the_models_loss_kwargs_as_trainer_did(tmp_path: Path) -> None:
    """Inside LorakitTrainer the model answers as before the guard: the inner model's
    attribute if it has one, else Trainer's fallback to the wrapper's forward (**kwargs)."""
    from lorakit.integrations.transformers import lorakit_trainer_class

    model = _model()
    assert not hasattr(model.get_base_model(), "accepts_loss_kwargs")  # tiny Llama: none
    arguments = _arguments(tmp_path, max_steps=1, save_strategy="no")
    assert LorakitTrainer(model=model, args=arguments).model_accepts_loss_kwargs is True
    model.get_base_model().accepts_loss_kwargs = False  # as many transformers models set
    custom = lorakit_trainer_class(transformers.Trainer)
    assert custom(model=model, args=arguments).model_accepts_loss_kwargs is False
