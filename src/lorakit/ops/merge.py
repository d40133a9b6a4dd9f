"""Merging a dense delta into a low-precision weight with one rounding, and undoing it exactly.

merge:   W' = round(W + ΔW), the sum taken in fp32 (ΔW = s · B A in fp32), rounded once into
         the weight's dtype.
unmerge: W  = round(W' - ΔW), then the entries where that does not give back the original
         bits are overwritten from a sparse record kept at merge time.

Why a record: round(W' - ΔW) equals W unless the merge moved an entry into a coarser binade
(its rounding error then exceeds half an ulp of the original) or hit a tie. Those entries are
few for a delta small against the weights (about 8% of entries for weights ~ N(0, 0.02)
and deltas ten times smaller, in bf16, fp16 and fp32); the record holds their flat indices
(int32) and original values, about a quarter of the weight's bytes there. Where that would
cost more than the weight itself (deltas as large as the weights), the record is the
original weight, so it never exceeds one copy. The ΔW used by unmerge must be
the one used by merge (same adapter tensors): the low-rank factors are the compact record of
everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MergeRecord:
    """Entries of a weight that `round(W' - ΔW)` would not restore: flat indices and values."""

    indices: torch.Tensor | None  # (k,) int32; None: `values` is the whole original weight
    values: torch.Tensor  # (k,) in the weight's dtype, or the original weight


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision weights, the weight's own dtype otherwise (fp32, fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (NaN == NaN of the same payload, +0 != -0)."""
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.view(integer) == b.view(integer)


@torch.no_grad()
def merge_delta(
    weight: torch.Tensor, delta: torch.Tensor, keep_record: bool = True
) -> MergeRecord | None:
    """Write round(W + ΔW) into `weight` in place; return what unmerge needs beyond ΔW.

    Args:
        weight: W, any floating dtype, modified in place.
        delta: ΔW with W's shape, preferably fp32 (it is used in the compute dtype).
        keep_record: False when the merge is never undone (merge_and_unload): no copy of W
            is made and None is returned.
    """
    compute = _compute_dtype(weight.dtype)
    delta = delta.to(device=weight.device, dtype=compute)
    if not keep_record:
        if weight.dtype == compute:
            weight.add_(delta)
        else:
            weight.copy_(weight.to(compute) + delta)  # one rounding, in copy_
        return None
    original = weight.clone()
    weight.copy_(original.to(compute) + delta)  # one rounding, in copy_
    return record_of(original, (weight.to(compute) - delta).to(weight.dtype))


def record_of(original: torch.Tensor, restored: torch.Tensor) -> MergeRecord:
    """The record that turns `restored` (what unmerge computes) back into `original`.

    Sparse (the differing entries) unless that would cost more than `original` itself, which
    is then the record. `original` is kept, not copied: pass a tensor nothing else writes to.
    """
    wrong = ~_same_bits(restored, original)
    indices = wrong.reshape(-1).nonzero().view(-1)  # (k,), row-major order as `put_` reads it
    sparse_bytes = indices.numel() * (4 + original.element_size())
    if sparse_bytes >= original.numel() * original.element_size() or original.numel() >= 2**31:
        return MergeRecord(indices=None, values=original)
    values = original.reshape(-1)[indices].clone()
    return MergeRecord(indices=indices.to(torch.int32), values=values)


@torch.no_grad()
def apply_record(weight: torch.Tensor, record: MergeRecord | None) -> None:
    """Write a record's original entries into `weight` (nothing if None or cast since)."""
    if record is None or record.values.dtype != weight.dtype:  # cast since: no longer applies
        return
    values = record.values.to(weight.device)  # the model may have moved since the merge
    if record.indices is None:
        weight.copy_(values)
    elif record.indices.numel():
        weight.put_(record.indices.to(weight.device, torch.long), values)  # row-major, any strides


@torch.no_grad()
def unmerge_delta(weight: torch.Tensor, delta: torch.Tensor, record: MergeRecord | None) -> None:
    """Write round(W' - ΔW) into `weight`, then the recorded original entries.

    With the record of the merge that produced W' (and the same ΔW), the original weight
    comes back bit for bit. Without one (`None`, e.g. the adapter was not the last one merged),
    each entry is off by at most one rounding of the merge plus one of the unmerge.
    """
    compute = _compute_dtype(weight.dtype)
    delta = delta.to(device=weight.device, dtype=compute)
    weight.copy_(weight.to(compute) - delta)
    apply_record(weight, record)
