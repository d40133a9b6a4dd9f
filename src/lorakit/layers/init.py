"""Initial values of A and B, one function per `init_lora_weights` option (a table, not a chain).

A is (r, in, *kernel) and B is (out, r, *1) for linear and conv layers. Embedding adapters
store A (r, num_embeddings) and B (dim, r) and start the other way round (A zero, B normal)
because their A acts as a lookup table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError

InitFunction = Callable[[torch.Tensor, torch.Tensor, int], None]


def _kaiming_a_zero_b(A: torch.Tensor, B: torch.Tensor, r: int) -> None:
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


def _gaussian_a_zero_b(A: torch.Tensor, B: torch.Tensor, r: int) -> None:
    nn.init.normal_(A, std=1 / r)
    nn.init.zeros_(B)


def _random_a_random_b(A: torch.Tensor, B: torch.Tensor, r: int) -> None:
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.kaiming_uniform_(B, a=math.sqrt(5))


def _zero_a_normal_b(A: torch.Tensor, B: torch.Tensor, r: int) -> None:
    nn.init.zeros_(A)
    nn.init.normal_(B)


def _normal_a_normal_b(A: torch.Tensor, B: torch.Tensor, r: int) -> None:
    nn.init.normal_(A)
    nn.init.normal_(B)


LINEAR_INITS: dict[object, InitFunction] = {
    True: _kaiming_a_zero_b,
    "gaussian": _gaussian_a_zero_b,
    False: _random_a_random_b,
}

EMBEDDING_INITS: dict[object, InitFunction] = {
    True: _zero_a_normal_b,
    "gaussian": _zero_a_normal_b,  # as peft: an embedding's A is a table, B starts random
    False: _normal_a_normal_b,
}


@torch.no_grad()
def initialise(
    table: dict[object, InitFunction], A: torch.Tensor, B: torch.Tensor, r: int, option: object
) -> None:
    """Fill A and B in place according to `option` (a `LoraConfig.init_lora_weights` value)."""
    function = table.get(option)
    if function is None:
        raise ConfigError(
            f"init_lora_weights={option!r} cannot initialise this layer here; allowed values "
            f"are {list(table)}. 'loftq' is applied by get_peft_model / "
            "PeftModel.add_adapter to full-precision torch.nn.Linear and transformers Conv1D "
            "layers, which it replaces by 4-bit QuantLinear (see lorakit.quant.loftq)."
        )
    function(A, B, r)
