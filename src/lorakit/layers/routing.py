"""One routing object per model says which adapters act, and for which rows.

Every LoRA layer of a model holds a reference to the same `AdapterRouting`; the model changes
it and the layers only read it. Switching adapters is therefore one assignment, whatever the
model size, and mixed-adapter batches need no change in the layers' bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
