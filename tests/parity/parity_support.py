"""Shared helpers of the peft-parity tests: one base wrapped twice, and ways to compare the two.

peft is the oracle. Each helper takes a base model, deep-copies it for peft and for lorakit (so
both start from bit-identical weights), and reads back what a user of either library sees:
adapted module paths, per-module ranks and scalings, trainable parameters, state-dict keys and
outputs. Because lorakit mirrors peft's module tree and state-dict keys, peft's A/B values load
into lorakit with a strict `load_state_dict`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn

import lorakit

try:
    from tiny_models import (
        tiny_bert_classifier,
        tiny_gpt2,
        tiny_llama,
        tiny_t5,
        tiny_vit,
        token_batch,
    )
except ImportError:  # the factories lived in conftest.py before tests/tiny_models.py existed
    from conftest import (
        tiny_bert_classifier,
        tiny_gpt2,
        tiny_llama,
        tiny_t5,
        tiny_vit,
        token_batch,
    )

__all__ = [
    "FORWARD_TOL",
    "MERGE_TOL",
    "STATE_TOL",
    "TRAIN_TOL",
    "Pair",
    "TinyCNN",
    "adapted_names",
    "assert_forward_matches_peft",
    "build_pair",
    "changes_output",
    "image_batch",
    "layer_settings",
    "main_output",
    "max_abs_diff",
    "run",
    "tiny_bert_classifier",
    "tiny_cnn",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_t5",
    "tiny_vit",
    "token_batch",
    "trainable_names",
]

# Same fp32 products, summed in a possibly different order: a few ulps of values of order 1.
# For outputs of the same base layers only (no adapter in between); a forward through adapters
# is judged by `assert_forward_matches_peft`, whose limit is measured, not fixed.
FORWARD_TOL = 1e-6
# An fp32 forward through adapters rounds at the size of the values inside the network (hidden
# states plus s·BA x with random, non-small B), not at the size of its output: a fixed 1e-6 was
# 1.2e-6 short for rsLoRA's scalings on tiny Llama, where peft's own fp32 logits (|y| <= 0.35)
# are 1.3e-6 from exact. So the limit is peft's own fp32 error against peft run in float64 (the
# exact answer) times this factor: lorakit's fp32 may sum in another order, not be less exact.
FP32_ERROR_FACTOR = 4.0
# ... with peft's error taken as at least this many fp32 ulps of the largest output: a peft run
# that happens to be nearly exact (e.g. a tiny CNN, 2e-9) would otherwise leave no room for
# lorakit's different summation order. Over the 92 comparisons of tests/parity, lorakit's error
# is at most 1.35 x this limit before FP32_ERROR_FACTOR.
FP32_ERROR_FLOOR_ULPS = 4.0
# Merging rounds W + s·BA once into fp32 weights, and those roundings pass through every layer.
MERGE_TOL = 1e-5
# Merged weights: one fp32 add of the same delta in both libraries.
STATE_TOL = 1e-6
# Three AdamW steps; Adam divides by sqrt(v) and so magnifies ulp-level gradient differences.
TRAIN_TOL = 1e-5


@dataclass
class Pair:
    """The same base wrapped by peft and by lorakit, plus an untouched copy of the base."""

    base: nn.Module
    peft_model: Any
    lorakit_model: lorakit.PeftModel

    def copy_peft_weights(self) -> None:
        """Load peft's adapter values (and head copies) into lorakit; every key must match.

        peft's trained copies of `modules_to_save` modules are first moved away from the
        originals, so running the original instead of the copy cannot go unnoticed.
        """
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, parameter in self.peft_model.named_parameters():
                if ".modules_to_save." in name:
                    noise = torch.randn(parameter.shape, generator=generator)
                    parameter.add_(0.5 * noise.to(parameter.dtype))
        self.lorakit_model.load_state_dict(self.peft_model.state_dict(), strict=True)


def build_pair(
    make_base: Callable[[], nn.Module] | nn.Module,
    adapter_name: str = "default",
    **config: Any,
) -> Pair:
    """Wrap deep copies of one base with `peft.LoraConfig(**config)` and `lorakit.LoraConfig`.

    `make_base` is a factory or a model (a model is deep-copied, never wrapped itself).
    """
    base = make_base if isinstance(make_base, nn.Module) else make_base()
    base.eval()
    torch.manual_seed(1)  # adapter initialisation draws from the global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out and rsLoRA patterns
        peft_model = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(**config), adapter_name=adapter_name
        )
    lorakit_model = lorakit.get_peft_model(
        copy.deepcopy(base), lorakit.LoraConfig(**config), adapter_name=adapter_name
    )
    return Pair(base, peft_model, lorakit_model)


def adapted_names(model: nn.Module) -> list[str]:
    """Paths (relative to the user's model) of every module that holds LoRA factors."""
    prefix = "base_model.model."
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"):
            names.append(name.removeprefix(prefix))
    return sorted(names)


def layer_settings(model: nn.Module) -> dict[str, tuple[dict[str, int], dict[str, float]]]:
    """Per adapted module: (`r` by adapter, `scaling` by adapter)."""
    prefix = "base_model.model."
    settings = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"):
            r = {key: int(value) for key, value in module.r.items()}
            scaling = {key: float(value) for key, value in module.scaling.items()}
            settings[name.removeprefix(prefix)] = (r, scaling)
    return settings


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def main_output(output: Any) -> torch.Tensor:
    """The tensor a model is judged by: logits, else last_hidden_state, else the tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    hidden = output.last_hidden_state
    assert isinstance(hidden, torch.Tensor)
    return hidden


def changes_output(changed: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether the adapters moved the output by 100 times FORWARD_TOL or more, so that an
    agreement within FORWARD_TOL says something about the adapters."""
    return max_abs_diff(changed, reference) >= 100 * FORWARD_TOL


def assert_forward_matches_peft(
    got: torch.Tensor,
    peft_model: nn.Module,
    inputs: Mapping[str, Any] | torch.Tensor,
    **kwargs: Any,
) -> None:
    """Assert lorakit's fp32 output `got` is as exact as peft's own fp32 forward of `inputs`.

    peft run in float64 on a copy gives the exact answer; peft's fp32 forward sets the rounding
    error this network has (see FP32_ERROR_FACTOR); lorakit may be that far from exact, times
    the factor. A wrong scale, a missing adapter or a wrong layer is orders of magnitude past it.
    """
    expected = run(peft_model, inputs, **kwargs)
    exact = run(copy.deepcopy(peft_model).double(), _as_float64(inputs), **kwargs)
    floor = FP32_ERROR_FLOOR_ULPS * torch.finfo(torch.float32).eps * float(exact.abs().max())
    limit = FP32_ERROR_FACTOR * max(max_abs_diff(expected, exact), floor)
    error = max_abs_diff(got, exact)
    assert error <= limit, (
        f"lorakit is {error:.3g} from peft's float64 output, past {limit:.3g} "
        f"({FP32_ERROR_FACTOR} x peft's own fp32 error); |lorakit - peft| = "
        f"{max_abs_diff(got, expected):.3g}"
    )


def _as_float64(inputs: Any) -> Any:
    """`inputs` with floating tensors (pixel values) in float64; token ids as they are."""
    if isinstance(inputs, torch.Tensor):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping):
        return {key: _as_float64(value) for key, value in inputs.items()}
    return inputs


def max_abs_diff(first: torch.Tensor, second: torch.Tensor) -> float:
    assert first.shape == second.shape, (first.shape, second.shape)
    return float((first.double() - second.double()).abs().max())


def run(model: nn.Module, inputs: Mapping[str, Any] | torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Eval-mode, no-grad forward returning `main_output`."""
    model.eval()
    with torch.no_grad():
        if isinstance(inputs, torch.Tensor):
            return main_output(model(inputs, **kwargs))
        return main_output(model(**inputs, **kwargs))


class TinyCNN(nn.Sequential):
    """A plain torch CNN (no transformers): two Conv2d layers and a Linear head."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 4, 3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 5),
        )


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def image_batch(batch: int = 2) -> torch.Tensor:
    """Pixel values (batch, 3, 16, 16) from a fixed generator."""
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, 16, 16, generator=generator)
