"""LoRA around `torch.nn.Embedding`: a low-rank table added to the looked-up rows.

PEFT keeps an embedding's adapters straight in `nn.ParameterDict`s keyed by adapter name
(`lora_embedding_A.<name>`), so a forward that found A and B by name would make
`torch.compile` guard on the name and compile one graph per adapter. `AdapterTables` keeps
PEFT's dict (its keys, parameters and state dict unchanged) and also holds each entry, under
the one name "weight", in a small module per adapter that is not part of the model. Every
write to the dict's entries (adding, deleting, `load_state_dict(assign=True)`, `.to()`,
FSDP's swaps of sharded and whole parameters) goes through `_parameters[name] = value` or
`del`, which `MirroredEntries` repeats on the adapter's module; forwards read those modules,
so switching among embedding adapters of one shape reuses the compiled graph, as for
linear adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.lora import add_lora_embedding, delta_weight
from . import dora
from .base import LoraLayer
from .init import EMBEDDING_INITS
from .routing import AdapterRouting, AdapterSlot

# The name under which each adapter's module holds its entry (as `nn.Linear` holds `weight`).
MIRROR_KEY = "weight"


class MirroredEntries(dict[str, Any]):
    """An `nn.ParameterDict`'s `_parameters` whose entries are repeated in `mirrors`.

    `mirrors[name]` is a bare `nn.Module` holding entry `name` as `_parameters["weight"]`;
    it is created with the entry, follows every assignment to it and goes with its deletion
    (every method of dict that adds, replaces or removes entries keeps them joined).
    The mirrors are part of this dict's pickled and deep-copied state, so copies of a model
    keep them joined to the copied entries.
    """

    mirrors: dict[str, nn.Module]

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        mirrors = self.__dict__.setdefault("mirrors", {})  # unpickling sets items first
        if key not in mirrors:
            mirrors[key] = nn.Module()
        mirrors[key]._parameters[MIRROR_KEY] = value

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.__dict__.setdefault("mirrors", {}).pop(key, None)

    def pop(self, key: str, *default: Any) -> Any:
        self.__dict__.setdefault("mirrors", {}).pop(key, None)
        return super().pop(key, *default)

    def clear(self) -> None:
        super().clear()
        self.__dict__.setdefault("mirrors", {}).clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def popitem(self) -> tuple[str, Any]:
        key, value = super().popitem()
        self.__dict__.setdefault("mirrors", {}).pop(key, None)
        return key, value


class AdapterTables(nn.ParameterDict):
    """PEFT's `ParameterDict` of one embedding factor per adapter, with `mirror(name)`: a
    module holding that adapter's factor under the constant name "weight"."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_parameters", MirroredEntries())  # as nn.Module.__init__ does

    def mirror(self, adapter_name: str) -> nn.Module:
        """The module holding `self[adapter_name]` as its `_parameters["weight"]`."""
        entries = self._parameters
        assert isinstance(entries, MirroredEntries)
        return entries.mirrors[adapter_name]


class LoraEmbedding(LoraLayer):
    """y = W[i] + s · (A^T[i]) B^T, with A (r, num_embeddings) and B (dim, r) as parameters.

    Parameter names are PEFT's: `lora_embedding_A` and `lora_embedding_B`. Dropout does not
    apply to an embedding's input (it is a token index).
    """

    init_table = EMBEDDING_INITS

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting) -> None:
        super().__init__(base_layer, routing)
        self.num_embeddings, self.embedding_dim = self.base_weight().shape
        self.lora_embedding_A = AdapterTables()
        self.lora_embedding_B = AdapterTables()

    def _create_adapter(
        self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        options: dict[str, Any] = {"dtype": dtype, "device": device}
        self.lora_embedding_A[adapter_name] = nn.Parameter(
            torch.empty(r, self.num_embeddings, **options)
        )
        self.lora_embedding_B[adapter_name] = nn.Parameter(
            torch.empty(self.embedding_dim, r, **options)
        )

    def _adapter_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _remove_adapter_tensors(self, adapter_name: str) -> None:
        del self.lora_embedding_A[adapter_name]
        del self.lora_embedding_B[adapter_name]

    def _adapter_holders(
        self, adapter_name: str
    ) -> tuple[tuple[nn.Module, nn.Module], tuple[str, str]]:
        # PEFT's keys put the tables straight in ParameterDicts, keyed by adapter name.
        return (self.lora_embedding_A, self.lora_embedding_B), (adapter_name, adapter_name)

    def _slot_holders(
        self, adapter_name: str
    ) -> tuple[tuple[nn.Module, nn.Module], tuple[str, str]]:
        # The same tables under one name for every adapter (module docstring).
        holders = (
            self.lora_embedding_A.mirror(adapter_name),
            self.lora_embedding_B.mirror(adapter_name),
        )
        return holders, (MIRROR_KEY, MIRROR_KEY)

    def _add_slot_output(
        self, result: torch.Tensor, x: torch.Tensor, slot: AdapterSlot
    ) -> torch.Tensor:
        # Emptiness first: without DoRA adapters, a compiled forward guards on no name.
        if self.lora_magnitude_vector and slot.adapter_name in self.lora_magnitude_vector:
            return dora.embedding_output(self, result, x, slot)
        A, B = slot.pair()
        return add_lora_embedding(result, x, A, B, slot.forward_scale())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self._adapter_pair(adapter_name)
        return delta_weight(A, B, self.scaling[adapter_name]).t()  # (num_embeddings, dim)
