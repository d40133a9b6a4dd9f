"""Initial values of A and B, one function per `init_lora_weights` option (a table, not a chain).

A is (r, in, *kernel) and B is (out, r, *1) for linear and conv layers. Embedding adapters
store A (r, num_embeddings) and B (dim, r) and start the other way round (A zero, B normal)
because their A acts as a lookup table.

Inits that read the base weight ("pissa", "pissa_niter_N", "olora", and "corda" with the
triplets `preprocess_corda` left on the base layer) or the layer's sizes ("orthogonal") are
a second table, `LAYER_INITS`, applied by `initialise_from_layer` once the adapter exists (to
`torch.nn.Linear` and transformers' `Conv1D` bases only, as in PEFT). "eva" starts as True
does (B zero): `initialize_lora_eva_weights` sets A from data afterwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.init_corda import CordaEigens, corda_factors
from ..ops.init_svd import olora_factors, orthogonal_factors, pissa_factors

if TYPE_CHECKING:
    from .linear import LoraLinear

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
    "eva": _kaiming_a_zero_b,  # A is replaced by initialize_lora_eva_weights
}

EMBEDDING_INITS: dict[object, InitFunction] = {
    True: _zero_a_normal_b,
    "gaussian": _zero_a_normal_b,  # as peft: an embedding's A is a table, B starts random
    False: _normal_a_normal_b,
    "eva": _zero_a_normal_b,  # EVA leaves embeddings as True sets them
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
            "layers, which it replaces by 4-bit QuantLinear (see lorakit.quant.loftq); "
            "'pissa', 'pissa_niter_N', 'olora' and 'orthogonal' by get_peft_model, "
            "PeftModel.add_adapter and inject_adapter_in_model to those layers only "
            "(initialise_from_layer)."
        )
    function(A, B, r)


# (W (out, in), r, scale, option, base layer) -> (A, B, residual base weight or None when W
# is unchanged)
LayerInitFunction = Callable[
    [torch.Tensor, int, float, str, nn.Module],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
]
# The attribute of a base layer where `preprocess_corda` leaves its `CordaEigens` (PEFT's name).
CORDA_EIGENS_ATTRIBUTE = "eigens"
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def _pissa(
    W: torch.Tensor, r: int, scale: float, option: str, base: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    match = PISSA_NITER.fullmatch(option)
    return pissa_factors(W, r, scale, niter=int(match.group(1)) if match else None)


def _olora(
    W: torch.Tensor, r: int, scale: float, option: str, base: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return olora_factors(W, r, scale)


def _orthogonal(
    W: torch.Tensor, r: int, scale: float, option: str, base: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    out_features, in_features = W.shape
    A, B = orthogonal_factors(in_features, out_features, r)
    return A, B, None


def _corda(
    W: torch.Tensor, r: int, scale: float, option: str, base: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    eigens = getattr(base, CORDA_EIGENS_ATTRIBUTE)
    assert isinstance(eigens, CordaEigens), "check_layer_init_targets checks the triplets"
    return corda_factors(W, eigens, scale)


LAYER_INITS: dict[str, LayerInitFunction] = {
    "pissa": _pissa,
    "olora": _olora,
    "orthogonal": _orthogonal,
    "corda": _corda,
}
# The layer inits that replace the base weight by a residual.
BASE_CHANGING_INITS: frozenset[str] = frozenset({"pissa", "olora", "corda"})


def layer_init_name(option: object) -> str | None:
    """The `LAYER_INITS` key of an `init_lora_weights` value ("pissa_niter_4" -> "pissa"),
    or None for the inits of the A/B tables."""
    if not isinstance(option, str):
        return None
    name = "pissa" if PISSA_NITER.fullmatch(option) else option
    return name if name in LAYER_INITS else None


@torch.no_grad()
def initialise_from_layer(layer: LoraLinear, adapter_name: str, option: str) -> None:
    """Set an existing adapter's A and B from its layer (and replace the base weight by the
    residual for PiSSA, OLoRA and CorDA, so the layer's output is unchanged).

    The base weight is read as (out, in) (transposed for `fan_in_fan_out`), the factors
    computed in float32 or float64 (`ops.init_svd`, `ops.init_corda`), then copied into the
    adapter's dtype and the residual into the base weight's dtype, in place.
    """
    name = layer_init_name(option)
    assert name is not None, "callers pass a LAYER_INITS option"
    weight = layer.base_weight()
    dense = weight.t() if layer.fan_in_fan_out else weight
    A, B, residual = LAYER_INITS[name](
        dense, layer.r[adapter_name], layer.scaling[adapter_name], option, layer.base_layer
    )
    adapter_A, adapter_B = layer._adapter_pair(adapter_name)
    adapter_A.copy_(A)
    adapter_B.copy_(B)
    if residual is not None:
        weight.copy_(residual.t() if layer.fan_in_fan_out else residual)
    if name == "corda":  # used up, as in PEFT
        delattr(layer.base_layer, CORDA_EIGENS_ATTRIBUTE)
