"""The training loop: schedules, optimizer groups, accumulation, evaluation, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.train import TrainConfig, Trainer, finetune
from lorakit.train.data import TokenizedDataset
from lorakit.train.data_errors import EmptyDatasetError
from lorakit.train.evaluation import evaluate, label_count
from lorakit.train.schedule import build_optimizer, lr_multiplier
from tiny_models import tiny_llama
from train.conftest import CAUSAL_CORPUS

ROWS = [{"text": text} for text in CAUSAL_CORPUS]
# Accumulating 2 micro-batches of 2 vs one batch of 4: same sums in another order and padding.
ACCUMULATION_ATOL = 1e-6


def _model(tokenizer: Any, dropout: float = 0.0) -> PeftModel:
    config = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]
    )
    return get_peft_model(tiny_llama(vocab_size=len(tokenizer)), config)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [
        ("constant", 0, 1 / 3),  # warmup 2: (0 + 1) / (2 + 1)
        ("constant", 1, 2 / 3),
        ("constant", 7, 1.0),
        ("linear", 2, 1.0),  # first step after warmup: progress 0
        ("linear", 6, 1 - 4 / 8),  # progress (6 - 2) / (10 - 2)
        ("cosine", 6, 0.5 * (1 + math.cos(math.pi * 4 / 8))),
        ("cosine", 4, 0.5 * (1 + math.cos(math.pi * 2 / 8))),
        ("linear", 10, 0.0),
    ],
)
def test_lr_multiplier_by_hand(name: Any, step: int, expected: float) -> None:
    assert lr_multiplier(step, name, warmup=2, total_steps=10) == pytest.approx(expected, abs=1e-12)


def test_warmup_ratio_rounds_to_steps() -> None:
    assert TrainConfig(warmup_ratio=0.25).warmup_for(10) == 3  # 2.5 rounds half up


def test_optimizer_holds_only_trainable_parameters_without_decay_on_vectors(
    causal_tokenizer: Any,
) -> None:
    model = _model(causal_tokenizer)
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a trainable 1-D parameter
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in decayed["params"] + plain["params"]} == trainable
    assert all(p.dim() == 2 for p in decayed["params"]) and len(decayed["params"]) == 8
    assert [p.dim() for p in plain["params"]] == [1]
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert optimizer.defaults["fused"] is True  # plain CPU fp32 tensors: one fused kernel


def test_fused_adamw_takes_the_steps_of_the_per_tensor_loop(causal_tokenizer: Any) -> None:
    models = [_model(causal_tokenizer) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], TrainConfig(weight_decay=0.1, learning_rate=1e-2))
    params = [p for p in models[1].parameters() if p.requires_grad]
    loop = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        for model, optimizer in ((models[0], fused), (models[1], loop)):
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.grad = torch.ones_like(parameter) * 0.5 + parameter.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_accumulation_equals_one_larger_batch(tmp_path: Path, causal_tokenizer: Any) -> None:
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = _model(causal_tokenizer)
        config = TrainConfig(
            max_steps=3,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-2,
            max_grad_norm=None,
            output_dir=str(tmp_path / f"run{batch_size}"),
        )
        Trainer(model, causal_tokenizer, config, ROWS).train()
        results.append(_trainable(model))
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, atol=ACCUMULATION_ATOL, rtol=0)


def test_training_lowers_the_loss_freezes_the_base_and_writes_outputs(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    model = _model(causal_tokenizer, dropout=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    summary = finetune(
        model,
        causal_tokenizer,
        ROWS,
        ROWS,
        max_steps=30,
        batch_size=2,
        learning_rate=3e-2,
        eval_steps=15,
        logging_steps=10,
        output_dir=str(tmp_path),
    )
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [
        ("train", 10),
        ("eval", 15),
        ("train", 20),
        ("train", 30),
        ("eval", 30),
    ]
    first_eval, last_eval = events[1], events[4]
    assert last_eval["eval_loss"] < first_eval["eval_loss"]
    assert last_eval["eval_perplexity"] == pytest.approx(math.exp(last_eval["eval_loss"]))
    # r=2 on q (32->32) and v (32->16) in 2 layers: 2 * (2*(32+32) + 2*(32+16))
    assert summary["trainable_params"] == 2 * (2 * 64 + 2 * 48)
    total = sum(p.numel() for p in model.parameters())
    assert summary["trainable_percent"] == pytest.approx(100 * 448 / total)
    assert summary["best_eval_loss"] == last_eval["eval_loss"] and summary["best_step"] == 30
    assert summary["steps"] == 30 and summary["peak_memory_mb"] > 0
    reloaded = PeftModel.from_pretrained(
        tiny_llama(vocab_size=len(causal_tokenizer)), tmp_path / "adapter"
    )
    for name, tensor in _trainable(model).items():
        assert torch.equal(dict(reloaded.named_parameters())[name], tensor)


def _gpt2(tokenizer: Any) -> PeftModel:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64
    )
    base = transformers.GPT2LMHeadModel(config)
    return get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(_gpt2, id="gpt2-conv1d"),
        pytest.param(_model, id="llama-linear"),
    ],
)
def test_bf16_autocast_trains(tmp_path: Path, causal_tokenizer: Any, build: Any) -> None:
    model = build(causal_tokenizer)
    before = _trainable(model)
    config = TrainConfig(max_steps=2, batch_size=2, precision="bf16", output_dir=str(tmp_path))
    summary = Trainer(model, causal_tokenizer, config, ROWS).train()
    assert math.isfinite(summary["final_train_loss"])
    assert any(not torch.equal(before[n], p) for n, p in _trainable(model).items())


def test_epochs_count_steps_with_a_short_last_step(tmp_path: Path, causal_tokenizer: Any) -> None:
    # 4 rows, batch 1: 4 micro-batches per epoch; 2 epochs = 8, accumulation 3 -> 3 + 3 + 2
    config = TrainConfig(
        epochs=2, batch_size=1, gradient_accumulation_steps=3, output_dir=str(tmp_path)
    )
    trainer = Trainer(_model(causal_tokenizer), causal_tokenizer, config, ROWS)
    summary = trainer.train()
    assert summary["steps"] == 3 and trainer.state.micro_batches == 8


def test_evaluate_weights_loss_by_label_items_and_scores_classes() -> None:
    class Scripted(torch.nn.Module):
        """Returns a set loss and logits per call, like a classifier would."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.outputs = [
                (0.5, [[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]),
                (2.0, [[0.0, 1.0]]),
            ]

        def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
            loss, logits = self.outputs.pop(0)
            return SimpleNamespace(loss=torch.tensor(loss), logits=torch.tensor(logits))

    batches = [
        {"input_ids": torch.zeros(3, 2), "labels": torch.tensor([0, 1, 1])},
        {"input_ids": torch.zeros(1, 2), "labels": torch.tensor([0])},
    ]
    metrics = evaluate(Scripted(), batches, "SEQ_CLS", torch.device("cpu"))
    # predictions 0, 1, 0, 1 vs labels 0, 1, 1, 0: 2 right of 4
    # class 0: TP 1, FP 1, FN 1 -> F1 1/2; class 1: same -> macro 1/2
    assert metrics == {"eval_loss": (0.5 * 3 + 2.0) / 4, "eval_accuracy": 0.5, "eval_macro_f1": 0.5}


def test_label_count_skips_the_first_causal_position() -> None:
    labels = torch.tensor([[5, 6, -100], [7, 8, 9]])
    assert label_count({"labels": labels}, "CAUSAL_LM") == 3  # 6 | 8, 9
    assert label_count({"labels": labels}, "TOKEN_CLS") == 5


def test_empty_training_data_is_an_error(tmp_path: Path, causal_tokenizer: Any) -> None:
    empty = TokenizedDataset([], "CAUSAL_LM", "text", "my list")
    with pytest.raises(EmptyDatasetError, match=r"training data \(my list\) has no rows"):
        Trainer(_model(causal_tokenizer), causal_tokenizer, TrainConfig(), empty)
    with pytest.raises(EmptyDatasetError, match=r"the data source 'list of rows' holds no rows"):
        Trainer(_model(causal_tokenizer), causal_tokenizer, TrainConfig(), [])


def test_gradient_checkpointing_trains_the_same_adapter(
    tmp_path: Path, causal_tokenizer: Any
) -> None:
    results = []
    for is_checkpointed in (False, True):
        model = _model(causal_tokenizer)
        config = TrainConfig(
            max_steps=2,
            batch_size=2,
            learning_rate=1e-2,
            gradient_checkpointing=is_checkpointed,
            output_dir=str(tmp_path / str(is_checkpointed)),
        )
        Trainer(model, causal_tokenizer, config, ROWS).train()
        results.append(_trainable(model))
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, atol=ACCUMULATION_ATOL, rtol=0)


def test_progress_lines_without_a_terminal(
    tmp_path: Path, causal_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = TrainConfig(
        max_steps=4,
        batch_size=2,
        logging_steps=2,
        lr_scheduler="constant",
        output_dir=str(tmp_path),
    )
    with caplog.at_level("INFO", logger="lorakit.train"):
        Trainer(_model(causal_tokenizer), causal_tokenizer, config, ROWS).train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split("  ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("  lr 2.00e-04  " in line for line in lines)
    assert all("tokens/s  ETA " in line for line in lines)
