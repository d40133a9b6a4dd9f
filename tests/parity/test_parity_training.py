"""lorakit against peft in training: the same AdamW steps on the same data from the same adapter
values must give the same losses and the same trained tensors (lora_dropout=0).

This checks the gradients as well as the forward: lorakit's LoRA update has its own backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from parity.parity_support import (
    TRAIN_TOL,
    build_pair,
    max_abs_diff,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    trainable_names,
)

STEPS = 3
LEARNING_RATE = 1e-2


def _batches(vocab_size: int = 128) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab_size, (2, 9), generator=generator) for _ in range(STEPS)]


def _train(model: nn.Module, batches: list[torch.Tensor], is_classifier: bool) -> list[float]:
    """AdamW over the trainable parameters in name order; returns the loss of every step."""
    model.train()
    parameters = [p for _, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    labels = torch.tensor([0, 2])
    losses = []
    for input_ids in batches:
        output = model(input_ids=input_ids, labels=labels if is_classifier else input_ids)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    return losses


def _without_dropout(make_base: Callable[[], nn.Module]) -> nn.Module:
    """The base with its own dropout off, so that both runs see the same function."""
    base = make_base()
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return base


@pytest.mark.parametrize(
    ("make_base", "config"),
    [
        (tiny_llama, {"target_modules": "all-linear"}),
        (tiny_llama, {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "r": 2}),
        (tiny_gpt2, {"target_modules": ["c_attn", "c_proj"], "bias": "lora_only"}),
        (tiny_bert_classifier, {"task_type": "SEQ_CLS", "target_modules": "all-linear"}),
    ],
    ids=["llama-all-linear", "llama-embedding", "gpt2-conv1d-bias", "bert-seq-cls-head"],
)
def test_adamw_steps_match_peft(make_base: Callable[[], nn.Module], config: dict[str, Any]) -> None:
    pair = build_pair(
        _without_dropout(make_base), init_lora_weights=False, lora_dropout=0.0, **config
    )
    pair.copy_peft_weights()
    is_classifier = make_base is tiny_bert_classifier
    batches = _batches()
    expected_losses = _train(pair.peft_model, batches, is_classifier)
    got_losses = _train(pair.lorakit_model, batches, is_classifier)
    assert got_losses == pytest.approx(expected_losses, abs=TRAIN_TOL)
    expected, got = pair.peft_model.state_dict(), pair.lorakit_model.state_dict()
    trained = trainable_names(pair.peft_model)
    assert trained == trainable_names(pair.lorakit_model)
    start = pair.base.state_dict()
    moved = 0.0
    for key in trained:
        assert max_abs_diff(got[key], expected[key]) <= TRAIN_TOL, key
        plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if plain in start:  # a trained base tensor (bias): it must have moved in both
            moved = max(moved, max_abs_diff(expected[key], start[plain]))
    # The frozen tensors are the base's, bit for bit, in both libraries.
    for key, value in expected.items():
        if key not in trained:
            assert torch.equal(got[key], value), key
    if "bias" in config:
        assert moved > 0
