"""A bf16 tiny Llama wrapped by peft and by lorakit with the same (non-trivial) adapter weights."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import torch
from torch import nn

import lorakit
from tiny_models import tiny_llama, token_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bf16_llama() -> nn.Module:
    return tiny_llama().to(torch.bfloat16)


def llama_pair(**options: Any) -> tuple[nn.Module, nn.Module]:
    """(peft model, lorakit model) on copies of one bf16 tiny Llama, with peft's A/B in both.

    B is drawn too (`init_lora_weights=False`) so the adapters change the output.
    """
    base = bf16_llama()
    torch.manual_seed(3)
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), **options)
    lorakit_model = lorakit.get_peft_model(
        copy.deepcopy(base), lorakit.LoraConfig(**config), **options
    )
    lorakit_model.load_state_dict(peft_model.state_dict(), strict=True)
    return peft_model.eval(), lorakit_model.eval()


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    output: torch.Tensor = model(input_ids=token_batch()).logits
    return output.double()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every `base_layer.weight` (the tensors merging writes into)."""
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if name.endswith("base_layer.weight")
    }
