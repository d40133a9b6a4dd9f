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
# An entry whose gradient stays below this fraction of its tensor's largest gradient at every
# step gets no gradient in exact arithmetic: what fp32 computes for it is rounding noise.
GRADIENT_NOISE = 1e-6
# Same fp32 gradients summed in another order (lorakit's own LoRA backward), relative to the
# tensor's largest gradient: at most 2e-6 over the four cases here; a wrong scale or a missing
# term in a backward is 1e-2 or more.
GRADIENT_RTOL = 2e-5

Gradients = list[dict[str, torch.Tensor]]


def _batches(vocab_size: int = 128) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab_size, (2, 9), generator=generator) for _ in range(STEPS)]


def _train(
    model: nn.Module, batches: list[torch.Tensor], is_classifier: bool
) -> tuple[list[float], Gradients]:
    """AdamW over the trainable parameters in name order: the loss and gradients of each step."""
    model.train()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=LEARNING_RATE)
    labels = torch.tensor([0, 2])
    losses, gradients = [], []
    for input_ids in batches:
        output = model(input_ids=input_ids, labels=labels if is_classifier else input_ids)
        output.loss.backward()
        gradients.append({name: p.grad.clone() for name, p in named if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    return losses, gradients


def _without_dropout(make_base: Callable[[], nn.Module]) -> nn.Module:
    """The base with its own dropout off, so that both runs see the same function."""
    base = make_base()
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return base


def _noise_entries(gradients: Gradients, key: str) -> torch.Tensor:
    """Where `key`'s gradient was rounding noise (see GRADIENT_NOISE) at every step.

    Entries whose gradient is exactly zero at every step (embedding rows of tokens that no
    batch holds) are not noise: AdamW leaves them alone in both libraries alike.
    """
    noise = torch.ones_like(gradients[0][key], dtype=torch.bool)
    is_zero = torch.ones_like(noise)
    for step in gradients:
        noise &= step[key].abs() <= GRADIENT_NOISE * step[key].abs().max()
        is_zero &= step[key] == 0
    return noise & ~is_zero


def _zero_gradient_entries(model: nn.Module, key: str) -> torch.Tensor:
    """The entries of `key` that get no gradient in exact arithmetic.

    GPT-2's fused c_attn bias is (query, key, value) thirds; the key third adds q·b_k to every
    score of a softmax row, which the softmax ignores. Every other trained entry here has a
    gradient.
    """
    parameter = model.get_parameter(key)
    expected = torch.zeros_like(parameter, dtype=torch.bool)
    if key.endswith("attn.c_attn.base_layer.bias"):
        width = parameter.shape[0] // 3
        expected[width : 2 * width] = True
    return expected


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
@pytest.mark.parametrize("products", ["auto", "onednn"])
def test_adamw_steps_match_peft(
    make_base: Callable[[], nn.Module],
    config: dict[str, Any],
    products: str,
    request: pytest.FixtureRequest,
) -> None:
    """Same losses, same gradients at every step and the same trained tensors.

    An entry with no gradient in exact arithmetic (GPT-2's key bias) is the exception: AdamW
    divides its rounding-noise gradient (~1e-10) by sqrt(v) + eps and so moves it by up to lr
    per step in a direction that no two fp32 implementations share (a change in lorakit's
    summation order for grad_B moved GPT-2's key biases 2e-4 away from peft's). Such entries
    must get noise in both libraries; their values are not compared.

    With `products="onednn"` every frozen base product of lorakit runs through oneDNN (at
    these sizes it would stay on F.linear), as on the benchmark models.
    """
    if products == "onednn":
        request.getfixturevalue("onednn_everywhere")
    pair = build_pair(
        _without_dropout(make_base), init_lora_weights=False, lora_dropout=0.0, **config
    )
    pair.copy_peft_weights()
    is_classifier = make_base is tiny_bert_classifier
    batches = _batches()
    expected_losses, expected_gradients = _train(pair.peft_model, batches, is_classifier)
    got_losses, got_gradients = _train(pair.lorakit_model, batches, is_classifier)
    assert got_losses == pytest.approx(expected_losses, abs=TRAIN_TOL)
    expected, got = pair.peft_model.state_dict(), pair.lorakit_model.state_dict()
    trained = trainable_names(pair.peft_model)
    assert trained == trainable_names(pair.lorakit_model)
    start = pair.base.state_dict()
    moved = 0.0
    for key in trained:
        for step, (want, have) in enumerate(zip(expected_gradients, got_gradients, strict=True)):
            scale = float(want[key].abs().max())
            assert max_abs_diff(have[key], want[key]) <= GRADIENT_RTOL * scale, (key, step)
        noise = _noise_entries(expected_gradients, key)
        assert torch.equal(noise, _zero_gradient_entries(pair.peft_model, key)), key
        assert torch.equal(_noise_entries(got_gradients, key), noise), key
        kept = ~noise
        assert max_abs_diff(got[key][kept], expected[key][kept]) <= TRAIN_TOL, key
        plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if plain in start:  # a trained base tensor (bias): it must have moved in both
            moved = max(moved, max_abs_diff(expected[key][kept], start[plain][kept]))
    # The frozen tensors are the base's, bit for bit, in both libraries.
    for key, value in expected.items():
        if key not in trained:
            assert torch.equal(got[key], value), key
    if "bias" in config:
        assert moved > 0
