"""One routing object per model says which adapters act, and for which rows.

Every LoRA layer of a model holds a reference to the same `AdapterRouting`; the model changes
it and the layers only read it. Switching adapters is therefore one assignment, whatever the
model size, and mixed-adapter batches need no change in the layers' bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AdapterNameError
from ..ops.dropout import SharedDropout


@dataclass
class RowGroup:
    """The rows of a batch that use one adapter (`BASE_ADAPTER_NAME` for none)."""

    adapter_name: str
    rows: torch.Tensor  # (k,) int64 row indices


@dataclass
class AdapterRouting:
    """Which adapters a forward uses.

    Attributes:
        active_adapters: Adapters applied to every row, in order.
        is_disabled: No adapter acts; the base model alone runs.
        row_groups: Set for one forward whose rows use different adapters; overrides
            `active_adapters` while set.
        shared_dropout: Dropout draws shared by layers that read the same input tensor.
    """

    active_adapters: tuple[str, ...] = ()
    is_disabled: bool = False
    row_groups: tuple[RowGroup, ...] | None = field(default=None)
    shared_dropout: SharedDropout = field(default_factory=SharedDropout)


def row_groups_for(
    adapter_names: Sequence[str],
    known: Set[str],
    batch_size: int | None,
    device: torch.device,
) -> tuple[RowGroup, ...]:
    """Group batch rows by the adapter each names; validates names and the row count."""
    unknown = sorted(set(adapter_names) - known)
    if unknown:
        raise AdapterNameError(
            f"adapter_names has unknown adapters {unknown}; known: {sorted(known)}."
        )
    if batch_size is not None and batch_size != len(adapter_names):
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} "
            "rows; give one adapter name per row."
        )
    groups = []
    for name in dict.fromkeys(adapter_names):
        rows = [i for i, row_name in enumerate(adapter_names) if row_name == name]
        groups.append(RowGroup(name, torch.tensor(rows, dtype=torch.long, device=device)))
    return tuple(groups)


def batch_size_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Rows in the first tensor argument of a model call, if any."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None
