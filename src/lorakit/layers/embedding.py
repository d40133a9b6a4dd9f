"""LoRA around `torch.nn.Embedding`: a low-rank table added to the looked-up rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.lora import add_lora_embedding, delta_weight
from . import dora
from .base import LoraLayer
from .init import EMBEDDING_INITS
from .routing import AdapterRouting, AdapterSlot


class LoraEmbedding(LoraLayer):
    """y = W[i] + s · (A^T[i]) B^T, with A (r, num_embeddings) and B (dim, r) as parameters.

    Parameter names are PEFT's: `lora_embedding_A` and `lora_embedding_B`. Dropout does not
    apply to an embedding's input (it is a token index).
    """

    init_table = EMBEDDING_INITS

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting) -> None:
        super().__init__(base_layer, routing)
        self.num_embeddings, self.embedding_dim = self.base_weight().shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

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

    def _add_slot_output(
        self, result: torch.Tensor, x: torch.Tensor, slot: AdapterSlot
    ) -> torch.Tensor:
        if slot.adapter_name in self.lora_magnitude_vector:
            return dora.embedding_output(self, result, x, slot)
        A, B = slot.pair()
        return add_lora_embedding(result, x, A, B, slot.forward_scale())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self._adapter_pair(adapter_name)
        return delta_weight(A, B, self.scaling[adapter_name]).t()  # (num_embeddings, dim)
