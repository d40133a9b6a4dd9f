"""torch.compile of a lorakit model: eager outputs and gradients, and recompiles on switching.

The backend is "aot_eager": dynamo's graph capture and AOT autograd (what inductor sees too)
without inductor's C++ build, which takes ~20 s on this CPU (inductor gave the same loss to
5e-7 and gradients to 3e-8 when checked by hand).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import lorakit
from tiny_models import tiny_llama, token_batch

BACKEND = "aot_eager"
# fp32: the same ops in the same order, so equal in practice; 1e-5 allows reassociation.
COMPILE_TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model_with_two_adapters() -> lorakit.PeftModel:
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = lorakit.get_peft_model(tiny_llama(), config)
    model.add_adapter("other", copy.deepcopy(config))
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def test_compiled_training_step_matches_eager() -> None:
    eager = _model_with_two_adapters().train()
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, backend=BACKEND)
    x = token_batch()
    eager_loss = eager(input_ids=x, labels=x).loss
    eager_loss.backward()
    compiled_loss = compiled(input_ids=x, labels=x).loss
    compiled_loss.backward()
    assert abs(compiled_loss.item() - eager_loss.item()) <= COMPILE_TOL
    pairs = zip(eager.named_parameters(), compiled_source.named_parameters(), strict=True)
    grads = [(p.grad, q.grad) for (_, p), (_, q) in pairs if p.requires_grad]
    assert grads and all(q is not None for _, q in grads)
    assert max((p - q).abs().max().item() for p, q in grads) <= COMPILE_TOL
    assert not counters["graph_break"]  # one graph: the LoRA path does not break it


def test_switching_adapters_recompiles_only_while_warming_up() -> None:
    model = _model_with_two_adapters().eval()
    x = token_batch()
    with torch.no_grad():
        eager = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            eager[name] = model(input_ids=x).logits
        compiled = torch.compile(model, backend=BACKEND)
        for name in ("default", "other"):  # warm-up: one graph per active adapter
            model.set_adapter(name)
            compiled(input_ids=x)
        frames_after_warm_up = counters["frames"]["total"]
        for step in range(8):
            name = ("default", "other")[step % 2]
            model.set_adapter(name)
            output = compiled(input_ids=x).logits
            assert (output - eager[name]).abs().max().item() <= COMPILE_TOL
    assert (eager["default"] - eager["other"]).abs().max().item() > 100 * COMPILE_TOL
    # The active adapter is guarded on: warming up compiled one frame per adapter...
    assert frames_after_warm_up == 2
    # ...and the eight switches after it reused those graphs.
    assert counters["frames"]["total"] == frames_after_warm_up
