"""LoRA+: groups and steps equal peft's create_loraplus_optimizer; TrainConfig, CLI and resume."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.optimizers import create_loraplus_optimizer
from lorakit.train import CheckpointError, TrainConfig, TrainConfigError, Trainer
from lorakit.train.schedule import build_optimizer
from parity.parity_support import Pair, build_pair, token_batch
from tiny_models import tiny_bert_classifier, tiny_llama
from train.cli_support import lorakit_train, save_tiny_causal_model, write_causal_rows
from train.conftest import CAUSAL_CORPUS, build_causal_tokenizer

LR = 1e-3
RATIO = 16.0
WEIGHT_DECAY = 0.1
# Two AdamW steps from the same weights and batch: the gradients agree to fp32 ulps, and Adam's
# division by sqrt(v) magnifies those differences (tests/parity's TRAIN_TOL for three steps).
STEP_TOL = 1e-5

# Each case: a base factory and the LoraConfig fields. Llama: LoRA on an embedding too (peft's
# embedding group) and a trained RMSNorm copy (1-D, not a LayerNorm: decayed B in peft). BERT:
# trained biases ("bias" in the name: B, not decayed), LayerNorm copies (B, not decayed) and a
# classifier head (its weight in group A).
CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama-embedding-norm": (
        tiny_llama,
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["norm"]},
    ),
    "bert-bias-layernorm-head": (
        tiny_bert_classifier,
        {
            "target_modules": ["query", "value"],
            "bias": "lora_only",
            "modules_to_save": ["classifier", "LayerNorm"],
        },
    ),
}


def _pair(case: str) -> Pair:
    make_base, fields = CASES[case]
    pair = build_pair(make_base, r=4, lora_alpha=8, init_lora_weights=False, **fields)
    pair.copy_peft_weights()
    return pair


def _groups_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> list[list[tuple[str, float, float]]]:
    """Per group, in order: (parameter name, lr, weight_decay) of each of its parameters."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [
        sorted((names[id(p)], group["lr"], group["weight_decay"]) for p in group["params"])
        for group in optimizer.param_groups
    ]


def _by_name(groups: list[list[tuple[str, float, float]]]) -> dict[str, tuple[float, float]]:
    return {name: (lr, decay) for group in groups for name, lr, decay in group}


@pytest.mark.parametrize("case", sorted(CASES))
def test_groups_equal_peft_create_loraplus_optimizer(case: str) -> None:
    pair = _pair(case)
    options: dict[str, Any] = {
        "lr": LR,
        "loraplus_lr_ratio": RATIO,
        "loraplus_lr_embedding": 3e-5,
        "loraplus_weight_decay": WEIGHT_DECAY,
        "betas": (0.8, 0.95),
    }
    expected = peft_create_loraplus_optimizer(pair.peft_model, torch.optim.AdamW, **options)
    got = create_loraplus_optimizer(pair.lorakit_model, torch.optim.AdamW, **options)
    assert type(got) is torch.optim.AdamW
    # Same four groups in the same order, each with the same names, lr and weight decay.
    assert _groups_by_name(pair.lorakit_model, got) == _groups_by_name(pair.peft_model, expected)
    assert [group["betas"] for group in got.param_groups] == [(0.8, 0.95)] * 4
    rates = {lr for lr, _ in _by_name(_groups_by_name(pair.lorakit_model, got)).values()}
    assert rates == {LR, LR * RATIO} | ({3e-5} if case.startswith("llama") else set())


def test_defaults_equal_peft() -> None:
    """Unset embedding lr (peft's 1e-6) and weight decay (0), and a group per role even empty."""
    pair = _pair("llama-embedding-norm")
    expected = peft_create_loraplus_optimizer(
        pair.peft_model, torch.optim.SGD, lr=LR, loraplus_lr_ratio=2.0
    )
    got = create_loraplus_optimizer(pair.lorakit_model, torch.optim.SGD, lr=LR, loraplus_lr_ratio=2)
    assert _groups_by_name(pair.lorakit_model, got) == _groups_by_name(pair.peft_model, expected)
    assert _by_name(_groups_by_name(pair.lorakit_model, got))[
        "base_model.model.model.embed_tokens.lora_embedding_A.default"
    ] == (1e-6, 0.0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_steps_equal_peft_loraplus_steps(case: str) -> None:
    pair = _pair(case)
    if case.startswith("llama"):
        batch = token_batch()
        inputs: dict[str, Any] = {"input_ids": batch, "labels": batch}
    else:
        inputs = {"input_ids": token_batch(), "labels": torch.tensor([0, 2])}
    options: dict[str, Any] = {
        "lr": LR,
        "loraplus_lr_ratio": RATIO,
        "loraplus_lr_embedding": 1e-2,
        "loraplus_weight_decay": WEIGHT_DECAY,
    }
    models = (pair.peft_model, pair.lorakit_model)
    before = {name: p.detach().clone() for name, p in pair.lorakit_model.named_parameters()}
    optimizers = (
        peft_create_loraplus_optimizer(pair.peft_model, torch.optim.AdamW, **options),
        create_loraplus_optimizer(pair.lorakit_model, torch.optim.AdamW, **options),
    )
    for _ in range(2):  # eval mode: no dropout masks to draw (gradients flow all the same)
        for model, optimizer in zip(models, optimizers, strict=True):
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    expected = dict(pair.peft_model.named_parameters())
    trained = 0
    for name, parameter in pair.lorakit_model.named_parameters():
        assert torch.allclose(parameter, expected[name], rtol=0, atol=STEP_TOL), name
        trained += parameter.requires_grad and not torch.equal(parameter, before[name])
    assert trained == sum(p.requires_grad for p in pair.lorakit_model.parameters())
    # B moved ~RATIO times farther than A: LoRA+ is in effect (Adam steps ~ lr in size).
    step_a = (parameter_named(pair, "lora_A") - before[name_of(pair, "lora_A")]).abs().max()
    step_b = (parameter_named(pair, "lora_B") - before[name_of(pair, "lora_B")]).abs().max()
    assert step_b > 4 * step_a


def name_of(pair: Pair, part: str) -> str:
    return next(name for name, _ in pair.lorakit_model.named_parameters() if f".{part}." in name)


def parameter_named(pair: Pair, part: str) -> torch.Tensor:
    return pair.lorakit_model.get_parameter(name_of(pair, part)).detach()


def test_trainer_optimizer_is_fused_and_matches_peft_on_lora_factors() -> None:
    """On LoRA factors only (all matrices) the trainer's groups give peft's lr and decay."""
    pair = build_pair(
        tiny_llama,
        r=4,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        init_lora_weights=False,
    )
    config = TrainConfig(learning_rate=LR, loraplus_lr_ratio=RATIO, weight_decay=WEIGHT_DECAY)
    got = build_optimizer(pair.lorakit_model, config)
    expected = peft_create_loraplus_optimizer(
        pair.peft_model,
        torch.optim.AdamW,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_weight_decay=WEIGHT_DECAY,
    )
    assert got.defaults["fused"] is True
    assert _by_name(_groups_by_name(pair.lorakit_model, got)) == _by_name(
        _groups_by_name(pair.peft_model, expected)
    )


def test_trainer_keeps_its_weight_decay_split_with_loraplus() -> None:
    """The trainer decays matrices only: a trained RMSNorm scale is B-rate but not decayed."""
    pair = _pair("llama-embedding-norm")
    config = TrainConfig(learning_rate=LR, loraplus_lr_ratio=RATIO, weight_decay=WEIGHT_DECAY)
    got = _by_name(_groups_by_name(pair.lorakit_model, build_optimizer(pair.lorakit_model, config)))
    norm = "base_model.model.model.norm.modules_to_save.default.weight"
    assert got[norm] == (LR * RATIO, 0.0)
    assert got["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"] == (
        LR * RATIO,
        WEIGHT_DECAY,
    )
    assert got["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (
        LR,
        WEIGHT_DECAY,
    )
    plain = build_optimizer(pair.lorakit_model, TrainConfig(learning_rate=LR))
    assert {group["lr"] for group in plain.param_groups} == {LR}


@pytest.mark.parametrize("ratio", [0, -2.0, float("nan"), float("inf"), "x", True])
def test_train_config_refuses_a_ratio_not_above_0(ratio: Any) -> None:
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.loraplus_lr_ratio = .* not allowed"):
        TrainConfig(loraplus_lr_ratio=ratio)


def test_train_config_reads_the_ratio_from_a_string_and_defaults_to_none() -> None:
    assert TrainConfig(loraplus_lr_ratio="8").loraplus_lr_ratio == 8.0  # type: ignore[arg-type]
    assert TrainConfig().loraplus_lr_ratio is None


@pytest.mark.parametrize("ratio", [0, -1.0, float("inf")])
def test_create_loraplus_optimizer_refuses_a_ratio_not_above_0(ratio: float) -> None:
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio=.* is not allowed; use a number > 0"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio)


def test_trainer_refuses_loraplus_without_lora_factors() -> None:
    model = tiny_llama()  # full fine-tuning: nothing for the ratio to act on but 1-D tensors
    with pytest.raises(TrainConfigError, match="no trainable LoRA B factor"):
        build_optimizer(model, TrainConfig(loraplus_lr_ratio=RATIO))


def test_eight_bit_optimizer_keeps_embeddings_in_32_bits_as_peft() -> None:
    bitsandbytes = pytest.importorskip("bitsandbytes")
    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    pair = _pair("llama-embedding-norm")
    overrides = []
    for model, create in (
        (pair.peft_model, peft_create_loraplus_optimizer),
        (pair.lorakit_model, create_loraplus_optimizer),
    ):
        start = len(manager.module_weight_config_triple)
        create(model, bitsandbytes.optim.AdamW8bit, lr=LR, loraplus_lr_ratio=RATIO)
        names = {id(module): name for name, module in model.named_modules()}
        added = manager.module_weight_config_triple[start:]
        overrides.append([(names[id(module)], key, value) for module, key, value in added])
    del manager.module_weight_config_triple[-len(overrides[0]) - len(overrides[1]) :]
    assert overrides[0] == overrides[1]
    assert [name for name, _, _ in overrides[1]] == [
        "base_model.model.model.embed_tokens.base_layer"
    ]
    assert overrides[1][0][1:] == ("weight", {"optim_bits": 32})


def _train(output_dir: Path, *, stop_after: int | None = None, **options: Any) -> nn.Module:
    """Train a tiny Llama's LoRA with LoRA+ for 4 steps, a checkpoint every 2; return the model."""
    tokenizer = build_causal_tokenizer()
    lora = lorakit.LoraConfig(r=4, lora_dropout=0.2, target_modules=["q_proj", "v_proj"])
    model = lorakit.get_peft_model(tiny_llama(vocab_size=len(tokenizer)), lora)
    fields: dict[str, Any] = {
        "max_steps": 4,
        "batch_size": 2,
        "learning_rate": 1e-2,
        "lr_scheduler": "cosine",
        "weight_decay": WEIGHT_DECAY,
        "loraplus_lr_ratio": RATIO,
        "save_steps": 2,
        "logging_steps": 1,
        "output_dir": str(output_dir),
    }
    config = TrainConfig(**{**fields, **options})

    class Stop(Exception):
        pass

    def stop(trainer: Trainer) -> None:
        if trainer.state.step == stop_after:
            raise Stop

    trainer = Trainer(
        model, tokenizer, config, [{"text": t} for t in CAUSAL_CORPUS], callbacks=[stop]
    )
    with contextlib.suppress(Stop):
        trainer.train()
    return model


def test_resume_with_loraplus_continues_exactly(tmp_path: Path) -> None:
    whole = _train(tmp_path / "whole")
    _train(tmp_path / "split", stop_after=2)
    saved = torch.load(
        tmp_path / "split" / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True
    )
    assert sorted(group["initial_lr"] for group in saved["param_groups"]) == [1e-2, 1e-2 * RATIO]
    resumed = _train(tmp_path / "split", resume=True)
    expected = whole.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with pytest.raises(CheckpointError, match=r"loraplus_lr_ratio: checkpoint 16\.0, now 4\.0"):
        _train(tmp_path / "split", resume=True, loraplus_lr_ratio=4.0)


@pytest.mark.parametrize("source", ["flag", "config file"])
def test_lorakit_train_takes_the_ratio(tmp_path: Path, source: str) -> None:
    save_tiny_causal_model(tmp_path / "model")
    write_causal_rows(tmp_path / "train.jsonl")
    args = ["--model", "model", "--train-data", "train.jsonl", "--target-modules", "q_proj,v_proj"]
    args += ["--max-steps", "2", "--save-steps", "2", "--learning-rate", "0.001"]
    if source == "flag":
        args += ["--loraplus-lr-ratio", "8"]
    else:
        (tmp_path / "run.json").write_text(json.dumps({"loraplus_lr_ratio": 8}))
        args += ["--config", "run.json"]
    result = lorakit_train(*args, "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    groups = [(group["initial_lr"], len(group["params"])) for group in saved["param_groups"]]
    # 2 layers x 2 modules: 4 lora_A at the learning rate, 4 lora_B at 8 times it.
    assert groups == [(0.001, 4), (0.008, 4)]
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["config"]["loraplus_lr_ratio"] == 8.0
