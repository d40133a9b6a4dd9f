"""DoRA's state in a LoRA layer: magnitude vectors, the cached ||W_o||², merging, conv/embedding.

A layer holds one `DoraMagnitude` per DoRA adapter in `lora_magnitude_vector` (peft's module
and key: `lora_magnitude_vector.<name>.weight`, saved as `lora_magnitude_vector`). Its shape
is peft's: (out,) for linear layers, (1, out, 1, ...) for convs, (embedding_dim,) for
embeddings. The maths is in `ops.dora`; this module reads a layer's weight in DoRA's row form:

    linear (out, in) as is; Conv1D / fan_in_fan_out (in, out) transposed; conv (out, in, *k)
    as (out, in·k); embedding (num, dim) transposed; a packed 4-bit base dequantized (fp32).

||W_o||² is cached per layer and recomputed whenever the base weight changes: another tensor
(a load with `assign`, a move), or the same one written in place (merge, unmerge,
`load_state_dict`), seen by its version counter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..errors import MergeError
from ..ops.dora import (
    DoraBranch,
    add_dora_output,
    as_rows,
    dora_merged,
    dora_unmerged,
    row_norm_sq,
    weight_norm,
    weight_times_at,
)
from ..ops.lora_bases import DenseBase
from ..ops.merge import MergeRecord, apply_record, record_of

if TYPE_CHECKING:
    from ..ops.lora_node import NodeBase
    from .base import LoraLayer
    from .routing import AdapterSlot

# What the fused node runs a base with: the base, its weight (None if packed), bias, dtype.
NodeOperands = tuple["NodeBase", torch.Tensor | None, torch.Tensor | None, torch.dtype]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class DoraMagnitude(nn.Module):
    """One adapter's learned magnitude m, as the parameter `weight` (peft's layout)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class RowNormCache:
    """||W_o||² (float64) of one base weight, recomputed when that weight changes."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._value: torch.Tensor | None = None

    def get(self, layer: LoraLayer) -> torch.Tensor:
        source = _weight_source(layer)
        if torch.compiler.is_compiling():  # version counters are not traced
            return row_norm_sq(weight_rows(layer))
        key = (source.data_ptr(), source._version, source.shape, source.dtype, source.device)
        if key != self._key or self._value is None:
            self._value = row_norm_sq(weight_rows(layer))
            self._key = key
        return self._value

    def __deepcopy__(self, memo: dict[int, Any]) -> RowNormCache:
        return RowNormCache()  # a copy's weight is another tensor


def _is_packed(layer: LoraLayer) -> bool:
    # On the class: a failed lookup on the module would go through nn.Module.__getattr__,
    # which raises and formats an AttributeError on every forward.
    return hasattr(type(layer), "dequantized_weight")


def _is_transposed(layer: LoraLayer) -> bool:
    """Whether the base stores the output axis second (Conv1D, fan_in_fan_out, embeddings)."""
    return bool(getattr(layer, "fan_in_fan_out", False)) or isinstance(
        layer.base_layer, nn.Embedding
    )


def _weight_source(layer: LoraLayer) -> torch.Tensor:
    """The tensor whose changes change W: the dense weight, or the packed codes."""
    if _is_packed(layer):
        base = layer.base_layer
        source = getattr(base, "weight_packed", None)
        return source if isinstance(source, torch.Tensor) else base.weight  # type: ignore[return-value]
    return layer.base_weight()


def weight_rows(layer: LoraLayer) -> torch.Tensor:
    """The base weight as DoRA's rows (out, in·k): a view of a dense weight, else fp32."""
    if _is_packed(layer):
        dequantized = cast(Callable[[], torch.Tensor], layer.dequantized_weight)
        return dequantized()
    weight = layer.base_weight()
    return weight.t() if _is_transposed(layer) else as_rows(weight)


def magnitude(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """The magnitude parameter m of one DoRA adapter."""
    holder = layer.lora_magnitude_vector[adapter_name]
    weight = holder.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _weight_times_at(layer: LoraLayer, A2: torch.Tensor) -> torch.Tensor:
    """P = W Aᵀ (out, r) in A's dtype; a 4-bit `QuantLinear` runs it as its own forward."""
    base = layer.base_layer
    if hasattr(type(base), "quantized"):  # on the class, as in `_is_packed`
        from ..ops.nf4 import linear_4bit_forward

        quantized = getattr(base, "quantized")  # noqa: B009
        dtype = cast(torch.dtype, getattr(base, "config").compute_dtype)  # noqa: B009
        return linear_4bit_forward(A2.to(dtype), quantized, None).t().to(A2.dtype)
    return weight_times_at(weight_rows(layer), A2)


@torch.no_grad()
def weight_norm_of(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """n (out,): the detached row norm of W + s·B A for one adapter, in the adapter's dtype."""
    A, B = layer._adapter_pair(adapter_name)
    return _weight_norm(layer, A, B, layer.scaling[adapter_name])


def _weight_norm(
    layer: LoraLayer, A: torch.Tensor, B: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """n (out,) for the factors A and B as they are now; run under `torch.no_grad`."""
    A2, B2 = as_rows(A), as_rows(B)
    P = _weight_times_at(layer, A2)
    return weight_norm(layer.dora_norms.get(layer), P, A2, B2, scale)


def magnitude_shape(layer: LoraLayer, out_features: int) -> tuple[int, ...]:
    """peft's shape of m: (1, out, 1, ...) on a conv, else (out,)."""
    base = layer.base_layer
    if isinstance(base, _CONVS):
        return (1, out_features, *(1,) * (base.weight.dim() - 2))
    return (out_features,)


@torch.no_grad()
def create_magnitude(
    layer: LoraLayer, adapter_name: str, dtype: torch.dtype, device: torch.device
) -> None:
    """Add the adapter's m: the norm n of W + s·B A at its initial A and B (so W' = W + s·B A
    to start with); on the meta device (a load fills it) left uninitialised."""
    if device.type == "meta":
        rows = layer._adapter_pair(adapter_name)[1].shape[0]  # B (out, r, ...)
        value = torch.empty(magnitude_shape(layer, rows), dtype=dtype, device=device)
    else:
        n = weight_norm_of(layer, adapter_name)
        value = n.to(dtype=dtype, device=device).reshape(magnitude_shape(layer, n.numel()))
    layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(value)


def factor(layer: LoraLayer, adapter_name: str, n: torch.Tensor) -> torch.Tensor:
    """g = m / n (out,), detached, in fp32 at least."""
    m = magnitude(layer, adapter_name).detach().reshape(-1)
    g = m / n.to(m.dtype)
    return g.float() if g.dtype in (torch.float16, torch.bfloat16) else g


def _in_weight_layout(layer: LoraLayer, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g shaped to scale each output row of the base weight in its own layout."""
    if _is_transposed(layer):
        return g.view(1, -1)
    return g.view(-1, *(1,) * (weight.dim() - 1))


@torch.no_grad()
def merged_dense(
    layer: LoraLayer, adapter_name: str, weight: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """W' = g ⊙ (W + s·B A) in fp32 (or W's wider dtype), W in the base's layout."""
    delta = layer.get_delta_weight(adapter_name)
    g = _in_weight_layout(layer, factor(layer, adapter_name, n), weight)
    return dora_merged(weight, delta, g.to(delta.dtype))


@torch.no_grad()
def merge(
    layer: LoraLayer, adapter_name: str, n: torch.Tensor, keep_record: bool
) -> MergeRecord | None:
    """Write round(g ⊙ (W + s·B A)) into the base weight; return the exact-unmerge record.

    `n` is the norm against the unmerged weight (taken before this call merged anything),
    as peft computes it. The factor g is kept in `layer.dora_merge_factors` for unmerge.
    """
    weight = layer.base_weight()
    original = weight.clone() if keep_record else None
    delta = layer.get_delta_weight(adapter_name)
    g = _in_weight_layout(layer, factor(layer, adapter_name, n), weight).to(delta.dtype)
    weight.copy_(dora_merged(weight, delta, g))  # one rounding, in copy_
    layer.dora_merge_factors[adapter_name] = g
    if original is None:
        return None
    return record_of(original, dora_unmerged(weight, delta, g).to(weight.dtype))


@torch.no_grad()
def unmerge(layer: LoraLayer, adapter_name: str, record: MergeRecord | None) -> None:
    """W = round(W' / g - s·B A), then the recorded entries: bit for bit with the record of
    the last merge; without one, off by the roundings of W' / g and the subtraction."""
    weight = layer.base_weight()
    g = layer.dora_merge_factors.pop(adapter_name)
    delta = layer.get_delta_weight(adapter_name)
    weight.copy_(dora_unmerged(weight, delta, g.to(weight.device)))
    apply_record(weight, record)


def check_unmerge_order(layer: LoraLayer, adapter_names: list[str]) -> None:
    """Refuse to unmerge a DoRA adapter, or one merged before it, out of order.

    A DoRA merge scales the whole weight, so adapters merged after it can only come off
    first: unmerging exactly the newest k adapters is the only order that gives W back.
    """
    merged = layer.merged_adapters
    count = sum(name in adapter_names for name in merged)
    newest = merged[len(merged) - count :]
    if set(newest) == {name for name in merged if name in adapter_names}:
        return
    dora = [name for name in merged if name in layer.lora_magnitude_vector]
    if dora:
        raise MergeError(
            f"Cannot unmerge {adapter_names} alone: DoRA adapters {dora} scale the whole "
            f"weight, so the adapters merged after them ({merged}, oldest first) must be "
            "unmerged first. Fix: call unmerge_adapter() (all of them), or unmerge the "
            "newest first."
        )


def conv_output(
    layer: LoraLayer, result: torch.Tensor, x: torch.Tensor, slot: AdapterSlot
) -> torch.Tensor:
    """result + the DoRA update of a conv adapter (plain autograd, peft's formulas)."""
    base = layer.base_layer
    assert isinstance(base, _CONVS)
    A_conv, B_conv = slot.holders
    A, _ = slot.pair()
    g = factor_view(layer, slot.adapter_name, result.dim())
    x_lora = x.to(A.dtype)
    on_dropped = None
    p = slot.dropout_p if layer.training else 0.0
    if p > 0:
        x_lora = nn.functional.dropout(x_lora, p, training=True)
        weight = base.weight
        on_dropped = base._conv_forward(x_lora.to(weight.dtype), weight, None)
    lora_out = B_conv(A_conv(x_lora)) * slot.forward_scale()
    bias = None if base.bias is None else base.bias.view(1, -1, *(1,) * (result.dim() - 2))
    return add_dora_output(result, bias, lora_out, g, on_dropped).to(result.dtype)


def embedding_output(
    layer: LoraLayer, result: torch.Tensor, x: torch.Tensor, slot: AdapterSlot
) -> torch.Tensor:
    """g ⊙ (result + s·Aᵀ[x] Bᵀ) for an embedding adapter (plain autograd, peft's formula)."""
    A, B = slot.pair()
    g = factor_view(layer, slot.adapter_name, result.dim())
    lora_out = (nn.functional.embedding(x, A.t()) @ B.t()) * slot.forward_scale()
    return add_dora_output(result, None, lora_out, g).to(result.dtype)


def factor_view(layer: LoraLayer, adapter_name: str, ndim: int) -> torch.Tensor:
    """g = m / n (with m's autograd) shaped to broadcast over an output of `ndim` dims."""
    m = magnitude(layer, adapter_name)
    n = weight_norm_of(layer, adapter_name)
    g = m / n.view(m.shape).to(m.dtype)
    if m.dim() > 1:  # conv: (1, out, 1, ...) already lines up with (N, out, ...)
        return g
    return g.view(*(1,) * (ndim - 1), -1)


def linear_branch(
    layer: LoraLayer, slot: AdapterSlot, operands: NodeOperands | None
) -> tuple[DoraBranch, tuple[torch.Tensor, ...]]:
    """A DoRA adapter of a linear layer as the fused node's branch, and its tensors (A, B, m).

    With the node's `operands` the branch runs W on the dropped input through the node's own
    base; without (the reference path) through the dense weight (dequantized if packed).
    """
    A, B = slot.pair()
    p = slot.dropout_p if layer.training else 0.0
    with torch.no_grad():
        n = _weight_norm(layer, A, B, layer.scaling[slot.adapter_name])
    if operands is not None:
        base, weight, bias, _ = operands
    else:
        base = DenseBase(_is_transposed(layer) and not _is_packed(layer))
        weight = weight_rows(layer) if _is_packed(layer) else layer.base_weight()
        bias = getattr(layer.base_layer, "bias", None)
    branch = DoraBranch(
        slot.forward_scale(), p, n, base, weight, bias, layer.routing.shared_dropout
    )
    return branch, (A, B, magnitude(layer, slot.adapter_name))


def node_fits(branches: Sequence[object], weight: torch.Tensor | None) -> bool:
    """Whether the fused node can run these branches: a DoRA branch rescales the base output,
    so it must be the only one, and the node's weight gradient would miss DoRA's factor."""
    if not any(isinstance(branch, DoraBranch) for branch in branches):
        return True
    return len(branches) == 1 and (weight is None or not weight.requires_grad)
