"""Trainable tokens: new rows for a few token ids of an embedding, the rest frozen.

A `TrainableTokensWrapper` takes the embedding's place and holds `token_adapter`, a
`TrainableTokensLayer` with the original module as `base_layer` and one (k, d) table per
adapter in `trainable_tokens_delta` (PEFT's names, so state-dict and file keys are PEFT's).
Each table starts as the base's own rows (the model starts unchanged) and replaces them in
the forward (`ops.token_rows`). An output layer whose weight is the embedding's (tied
`lm_head`) gets a wrapper that reads the embedding's tables, so both stay tied; it holds no
tensor of its own and saves nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LorakitError, MergeError, UnsupportedModuleError
from ..ops.token_rows import embed_with_rows, project_with_rows, token_slots, weight_with_rows
from .routing import AdapterRouting

INDEX_BUFFER = "token_indices_{}"
SLOTS_BUFFER = "token_slots_{}"
SUPPORTED_BASES = "torch.nn.Embedding (plain lookup) and torch.nn.Linear"


class TrainableTokensLayer(nn.Module):
    """The base module plus, per adapter, the new rows of its chosen token ids."""

    def __init__(
        self,
        base_layer: nn.Module,
        routing: AdapterRouting,
        source: TrainableTokensLayer | None = None,
    ) -> None:
        super().__init__()
        _check_base(base_layer)
        self.base_layer = base_layer
        self.routing: AdapterRouting = routing
        # A tied layer reads its source's tables; a list keeps the source out of this
        # module's children (and state dict): the tables are saved once, by the source.
        self._source = [source] if source is not None else []
        if source is None:
            self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self.merged_adapters: list[str] = []
        self._replaced_rows: dict[str, torch.Tensor] = {}

    @property
    def source(self) -> TrainableTokensLayer | None:
        """The embedding's layer this one is tied to, or None."""
        return self._source[0] if self._source else None

    @property
    def tables(self) -> nn.ParameterDict:
        """Adapter name -> (k, d) new rows: this layer's own, or its source's when tied."""
        owner = self.source or self
        tables: nn.ParameterDict = owner.trainable_tokens_delta
        return tables

    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_indices)

    def add_adapter(self, adapter_name: str, indices: list[int]) -> None:
        """Add an adapter whose new rows start as the base's rows for `indices`."""
        weight = self.base_weight()
        index = torch.tensor(indices, dtype=torch.long, device=weight.device)
        self.token_indices[adapter_name] = list(indices)
        self.register_buffer(INDEX_BUFFER.format(adapter_name), index, persistent=False)
        if isinstance(self.base_layer, nn.Embedding):
            slots = token_slots(index, weight.shape[0])
            self.register_buffer(SLOTS_BUFFER.format(adapter_name), slots, persistent=False)
        if self.source is None:
            rows = weight.detach()[index].clone()
            self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows)

    def base_weight(self) -> torch.Tensor:
        """The base module's (V, d) weight: its rows are the token ids."""
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def index(self, adapter_name: str) -> torch.Tensor:
        """(k,) int64: the adapter's token ids, on the weight's device."""
        index = self.get_buffer(INDEX_BUFFER.format(adapter_name))
        return index

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge([adapter_name])
        del self.token_indices[adapter_name]
        delattr(self, INDEX_BUFFER.format(adapter_name))
        if hasattr(self, SLOTS_BUFFER.format(adapter_name)):
            delattr(self, SLOTS_BUFFER.format(adapter_name))
        if self.source is None:
            del self.trainable_tokens_delta[adapter_name]

    def set_adapter_trainable(self, adapter_name: str, is_trainable: bool) -> None:
        if self.source is None:
            self.trainable_tokens_delta[adapter_name].requires_grad_(is_trainable)

    # --- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        routing = self.routing
        if routing.is_disabled:
            return result
        if routing.row_groups is None:
            return self._with_rows(result, x, list(routing.active_adapters))
        for group in routing.row_groups:
            if group.adapter_name in self.token_indices:
                rows = group.rows
                changed = self._with_rows(result[rows], x[rows], [group.adapter_name])
                result = result.index_copy(0, rows, changed)
        return result

    def _with_rows(
        self, result: torch.Tensor, x: torch.Tensor, adapter_names: list[str]
    ) -> torch.Tensor:
        names = [
            name
            for name in adapter_names
            if name in self.token_indices and name not in self.merged_adapters
        ]
        self._check_disjoint(names)
        for name in names:
            T = self.tables[name]
            base = self.base_layer
            if isinstance(base, nn.Embedding):
                slots = self.get_buffer(SLOTS_BUFFER.format(name))
                padding_slot = self._padding_slot(name)
                result = embed_with_rows(result, x, slots, T, padding_slot, _embed_scale(base))
            else:
                assert isinstance(base, nn.Linear)
                result = project_with_rows(result, x, self.index(name), T, base.bias)
        return result

    def _padding_slot(self, adapter_name: str) -> int | None:
        padding_idx = getattr(self.base_layer, "padding_idx", None)
        indices = self.token_indices[adapter_name]
        return indices.index(padding_idx) if padding_idx in indices else None

    def _check_disjoint(self, adapter_names: list[str]) -> None:
        seen: set[int] = set()
        for name in adapter_names:
            indices = set(self.token_indices[name])
            if seen & indices:
                raise LorakitError(
                    f"Active adapters {adapter_names} give new rows to the same token ids "
                    f"{sorted(seen & indices)} (trainable_token_indices): which one wins is "
                    "undefined. Fix: activate one of them, or use disjoint token ids."
                )
            seen |= indices

    # --- merging -------------------------------------------------------------------------
    def merged_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """The weight with these adapters' rows in it (a new tensor; PEFT's `.weight`)."""
        weight = self.base_weight()
        for name in adapter_names:
            if name in self.token_indices and name not in self.merged_adapters:
                weight = weight_with_rows(weight, self.index(name), self.tables[name])
        return weight

    def check_merge(self, adapter_names: list[str], safe_merge: bool) -> None:
        """Raise before anything is written if these adapters cannot merge here: their ids
        overlap (with each other or with merged ones), or, with `safe_merge`, a table to
        merge holds NaN/inf (`MergeError`)."""
        held = [name for name in adapter_names if name in self.token_indices]
        self._check_disjoint(list(dict.fromkeys(self.merged_adapters + held)))
        for name in held if safe_merge else []:
            if not bool(torch.isfinite(self.tables[name]).all()):
                raise MergeError(
                    f"The new token rows of adapter {name!r} hold NaN/inf; nothing was merged. "
                    "Check the adapter weights."
                )

    def merge(self, adapter_names: list[str]) -> None:
        """Write these adapters' rows into the base weight (idempotent; undone by `unmerge`).

        A tied layer whose weight is its source's tensor writes nothing: the source's merge
        already changed that very tensor.
        """
        names = [
            n for n in adapter_names if n in self.token_indices and n not in self.merged_adapters
        ]
        self._check_disjoint(list(self.merged_adapters) + names)
        weight = self.base_weight()
        is_shared = self.source is not None and self.source.base_weight() is weight
        with torch.no_grad():
            for name in names:
                if not is_shared:
                    index = self.index(name)
                    self._replaced_rows[name] = weight[index].clone()
                    weight.index_copy_(0, index, self.tables[name].to(weight.dtype))
                self.merged_adapters.append(name)

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Put back the rows the merge of these adapters (default: all merged) replaced."""
        names = list(self.merged_adapters) if adapter_names is None else adapter_names
        weight = self.base_weight()
        with torch.no_grad():
            for name in reversed(names):
                if name not in self.merged_adapters:
                    continue
                original = self._replaced_rows.pop(name, None)
                if original is not None:
                    weight.index_copy_(0, self.index(name), original)
                self.merged_adapters.remove(name)


class TrainableTokensWrapper(nn.Module):
    """Takes the place of an embedding (or tied output layer) with trainable token rows."""

    def __init__(
        self,
        module: nn.Module,
        routing: AdapterRouting,
        source: TrainableTokensWrapper | None = None,
    ) -> None:
        super().__init__()
        self.token_adapter: TrainableTokensLayer = TrainableTokensLayer(
            module, routing, None if source is None else source.token_adapter
        )

    @property
    def original_module(self) -> nn.Module:
        """The base model's own module."""
        module: nn.Module = self.token_adapter.base_layer
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The weight this module computes with: the base's, with the active rows in it."""
        return self.token_adapter.merged_weight(list(self.token_adapter.routing.active_adapters))

    @property
    def routing(self) -> AdapterRouting:
        return self.token_adapter.routing

    @property
    def is_tied(self) -> bool:
        return self.token_adapter.source is not None

    @property
    def adapter_names(self) -> list[str]:
        return self.token_adapter.adapter_names

    def add_adapter(self, adapter_name: str, indices: list[int]) -> None:
        self.token_adapter.add_adapter(adapter_name, indices)

    def delete_adapter(self, adapter_name: str) -> None:
        self.token_adapter.delete_adapter(adapter_name)

    def set_adapter_trainable(self, adapter_name: str, is_trainable: bool) -> None:
        self.token_adapter.set_adapter_trainable(adapter_name, is_trainable)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.token_adapter(x, *args, **kwargs)
        return result


def _check_base(module: nn.Module) -> None:
    is_plain_embedding = isinstance(module, nn.Embedding) and (
        module.max_norm is None and not module.scale_grad_by_freq
    )
    if is_plain_embedding or type(module) is nn.Linear:
        return
    raise UnsupportedModuleError(
        f"trainable_token_indices: cannot give new rows to a {type(module).__name__} "
        f"({module!r}); supported: {SUPPORTED_BASES} (no max_norm, no scale_grad_by_freq). "
        "Fix: name the model's input embedding in trainable_token_indices."
    )


def _embed_scale(module: nn.Module) -> torch.Tensor | float | None:
    """The factor an embedding subclass applies to its rows (Gemma's `embed_scale`)."""
    scale = getattr(module, "embed_scale", None)
    return scale if isinstance(scale, (torch.Tensor, float, int)) else None
