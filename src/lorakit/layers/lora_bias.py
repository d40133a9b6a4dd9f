"""`lora_bias`: a trained bias b on lora_B, added to the output as s·b, merged into the base bias.

As in PEFT, `lora_B` is then a Linear (or 1×1 conv) with a bias, saved as `lora_B.bias`; the
fused node's LoRA branch adds s·b (`ops.lora_branch`) and a conv adapter's B adds it itself.
Merging writes round(bias + s·b) into the base layer's bias with the record `ops.merge` keeps
for the weight, so unmerging restores the bias bit for bit; a base without a bias cannot hold
s·b, so merging such an adapter is refused before anything changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import MergeError
from ..ops.merge import merge_delta, unmerge_delta

if TYPE_CHECKING:
    from .base import LoraLayer


def lora_B_bias(layer: LoraLayer, adapter_name: str) -> torch.Tensor | None:
    """The bias of an adapter's lora_B, or None without `lora_bias`."""
    if not layer.lora_bias.get(adapter_name, False):
        return None
    holders = layer._modules["lora_B"]
    assert isinstance(holders, nn.ModuleDict)
    bias = holders[adapter_name].bias
    assert isinstance(bias, torch.Tensor)
    return bias


@torch.no_grad()
def init_lora_B_bias(
    layer: LoraLayer, adapter_name: str, r: int, init_lora_weights: object
) -> None:
    """Zero with `init_lora_weights=True` (the model starts unchanged); with False, the draw
    `torch.nn.Linear` gives its bias, uniform in ±1/√r, which PEFT leaves in place."""
    bias = lora_B_bias(layer, adapter_name)
    if bias is None:
        return
    if init_lora_weights is False:
        bound = 1 / math.sqrt(r)
        bias.uniform_(-bound, bound)
    else:
        bias.zero_()


def _base_bias(layer: LoraLayer) -> torch.Tensor | None:
    bias = getattr(layer.base_layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def bias_delta(layer: LoraLayer, adapter_name: str) -> torch.Tensor | None:
    """s·b in fp32 (or the adapter's wider dtype), or None without `lora_bias`."""
    bias = lora_B_bias(layer, adapter_name)
    if bias is None:
        return None
    wide = bias.float() if bias.dtype in (torch.float16, torch.bfloat16) else bias
    return wide.detach() * layer.scaling[adapter_name]


def check_bias_merge(layer: LoraLayer, adapter_names: Iterable[str]) -> None:
    """Refuse, before anything merges, adapters with `lora_bias` on a base without a bias."""
    names = [
        name
        for name in adapter_names
        if name not in layer.merged_adapters and lora_B_bias(layer, name) is not None
    ]
    if names and _base_bias(layer) is None:
        raise MergeError(
            f"Adapters {names} have lora_bias=True, but the base layer "
            f"{type(layer.base_layer).__name__} has no bias to merge s·b into (peft refuses "
            "this too). Fix: keep these adapters unmerged, or give the base a bias."
        )


def merged_bias_is_finite(layer: LoraLayer, adapter_name: str) -> bool:
    """Whether bias + s·b would be free of NaN/inf (True without `lora_bias`)."""
    delta, base = bias_delta(layer, adapter_name), _base_bias(layer)
    return delta is None or base is None or bool(torch.isfinite(base + delta).all())


def merge_bias(layer: LoraLayer, adapter_name: str, keep_record: bool) -> None:
    """Write round(bias + s·b) into the base bias (after `check_bias_merge`), keeping what
    `unmerge_bias` needs to restore it exactly."""
    delta, base = bias_delta(layer, adapter_name), _base_bias(layer)
    if delta is None:
        return
    assert base is not None, "check_bias_merge refuses a base without a bias"
    record = merge_delta(base.data, delta, keep_record)
    if record is not None:
        layer.bias_merge_records[adapter_name] = record


def unmerge_bias(layer: LoraLayer, adapter_name: str) -> None:
    """Subtract s·b from the base bias; call before `adapter_name` leaves `merged_adapters`.

    As for the weight, the record restores the bits only when the adapter is the last one
    merged: unmerging an earlier one drops its record and those merged after it.
    """
    delta, base = bias_delta(layer, adapter_name), _base_bias(layer)
    if delta is None or base is None:
        return
    position = layer.merged_adapters.index(adapter_name)
    if position != len(layer.merged_adapters) - 1:
        for later in layer.merged_adapters[position:]:
            layer.bias_merge_records.pop(later, None)
    unmerge_delta(base.data, delta, layer.bias_merge_records.pop(adapter_name, None))
