"""One routing object per model says which adapters act, and for which rows.

Every LoRA layer of a model holds a reference to the same `AdapterRouting`; the model changes
it and the layers only read it. Mixed-adapter batches need no change in the layers'
bookkeeping.

The choice of active adapters reaches a layer's forward as data, not as a Python value it
branches on: setting `active_adapters` resolves, in each layer attached to the routing, the
acting adapters into `AdapterSlot`s (the modules holding A and B, the scale also as a
tensor). A forward reads its slots, so under `torch.compile` dynamo guards on the slots'
types and tensor shapes, not on adapter names or scales: switching among adapters of one
shape reuses the compiled graph.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import AdapterNameError
from ..ops.dropout import SharedDropout


@dataclass
class RowGroup:
    """The rows of a batch that use one adapter (`BASE_ADAPTER_NAME` for none)."""

    adapter_name: str
    rows: torch.Tensor  # (k,) int64 row indices


@dataclass(frozen=True, eq=False)
class AdapterSlot:
    """One adapter of one layer as its forward reads it.

    A and B are looked up in their holder modules at each call (`pair`), so a parameter
    replaced in its module (a load with `assign`, FSDP's sharding) is seen at once.

    Attributes:
        adapter_name: The adapter's name (for bookkeeping; a forward never branches on it).
        holders: The modules whose `_parameters` hold A and B.
        keys: The names of A and B in their holders: `"weight"` for every layer type
            (an embedding's adapters are read through one module per adapter that holds
            its entry of PEFT's `ParameterDict`, see `layers.embedding`).
        scale: s as a Python number (eager forward: a matmul's `alpha`).
        scale_tensor: s as a 0-dim fp32 tensor (compiled forward: a graph input, not a
            guarded constant).
        dropout_p: The adapter's dropout probability in training.
    """

    adapter_name: str
    holders: tuple[nn.Module, nn.Module]
    keys: tuple[str, str]
    scale: float
    scale_tensor: torch.Tensor
    dropout_p: float

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's (A, B) tensors as they are now."""
        A = self.holders[0]._parameters[self.keys[0]]
        B = self.holders[1]._parameters[self.keys[1]]
        assert A is not None and B is not None
        return A, B

    def forward_scale(self) -> float | torch.Tensor:
        """s for a forward: the tensor while `torch.compile` traces, the number otherwise."""
        return self.scale_tensor if torch.compiler.is_compiling() else self.scale


class RoutedLayer(Protocol):
    """What the routing calls on the layers attached to it."""

    def refresh_slots(self) -> None: ...


class AdapterRouting:
    """Which adapters a forward uses.

    Attributes:
        active_adapters: Adapters applied to every row, in order. Setting it refreshes the
            slots of every attached layer (see the module docstring).
        is_disabled: No adapter acts; the base model alone runs.
        row_groups: Set for one forward whose rows use different adapters; overrides
            `active_adapters` while set.
        shared_dropout: Dropout draws shared by layers that read the same input tensor.
    """

    def __init__(
        self,
        active_adapters: tuple[str, ...] = (),
        is_disabled: bool = False,
        row_groups: tuple[RowGroup, ...] | None = None,
        shared_dropout: SharedDropout | None = None,
    ) -> None:
        self._active_adapters = tuple(active_adapters)
        self.is_disabled = is_disabled
        self.row_groups = row_groups
        self.shared_dropout = SharedDropout() if shared_dropout is None else shared_dropout
        self._layers: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self._active_adapters

    @active_adapters.setter
    def active_adapters(self, names: tuple[str, ...]) -> None:
        self._active_adapters = tuple(names)
        for layer in self.layers():
            layer.refresh_slots()

    def attach(self, layer: RoutedLayer) -> None:
        """Have `layer` refresh its slots whenever the active adapters change."""
        self._layers.add(layer)

    def layers(self) -> Iterator[RoutedLayer]:
        """The live layers attached to this routing."""
        return iter(list(self._layers))

    def __getstate__(self) -> dict[str, Any]:
        # Layers attach themselves again when they are unpickled or deep-copied.
        state = self.__dict__.copy()
        del state["_layers"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._layers = weakref.WeakSet()

    def __repr__(self) -> str:
        return (
            f"AdapterRouting(active_adapters={self._active_adapters!r}, "
            f"is_disabled={self.is_disabled!r}, row_groups={self.row_groups!r})"
        )


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
