"""Whole modules trained beside the adapters (e.g. a new classification head), one copy each."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .routing import AdapterRouting


class ModulesToSaveWrapper(nn.Module):
    """Keeps the base's module as `original_module` and a trainable copy per adapter.

    The copy of the first active adapter that has one runs; otherwise the original does.
    """

    def __init__(self, module_to_save: nn.Module, routing: AdapterRouting) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.routing = routing

    def add_adapter(self, adapter_name: str) -> None:
        # The copy must read the model's one routing object, not a copy of it.
        replica = copy.deepcopy(self.original_module, memo={id(self.routing): self.routing})
        replica.requires_grad_(True)
        self.modules_to_save[adapter_name] = replica

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]

    def set_adapter_trainable(self, adapter_name: str, is_trainable: bool) -> None:
        self.modules_to_save[adapter_name].requires_grad_(is_trainable)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def active_module(self) -> nn.Module:
        routing = self.routing
        if not routing.is_disabled:
            for adapter_name in routing.active_adapters:
                if adapter_name in self.modules_to_save:
                    return self.modules_to_save[adapter_name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        groups = self.routing.row_groups
        if groups is None or self.routing.is_disabled:
            return self.active_module()(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        for group in groups:
            if group.adapter_name in self.modules_to_save:
                module = self.modules_to_save[group.adapter_name]
                rows = group.rows
                result = result.index_copy(0, rows, module(x[rows], *args, **kwargs))
        return result
