"""`PeftModel`'s file methods: save, load and wrap-from-folder in PEFT's layout.

A mixin so `model.py` keeps the adapter lifecycle and this module the file entry points; the
work itself is in `persistence` (what to write and read) and `io` (how).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from .config import LoraConfig
from .constants import DEFAULT_ADAPTER_NAME
from .io import read_adapter_config
from .persistence import config_from_file, load_adapter_into, save_adapters

if TYPE_CHECKING:
    from .model import PeftModel


class AdapterFilesMixin:
    """`save_pretrained`, `load_adapter` and `from_pretrained` of `PeftModel`."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | Literal["auto"] = "auto",
        state_dict: Mapping[str, torch.Tensor] | None = None,
        **_ignored: Any,
    ) -> None:
        """Write adapters in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`);
        "default" at the top of the folder, other adapters in `<folder>/<name>/`. Atomic.

        `state_dict` (PEFT's keyword, passed by `transformers.Trainer` and FSDP training) is
        read instead of the model's own `state_dict()`: full tensors of a sharded model."""
        save_adapters(
            cast("PeftModel", self),
            save_directory,
            selected_adapters,
            save_embedding_layers,
            state_dict,
        )

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        **_ignored: Any,
    ) -> None:
        """Load a saved adapter under `adapter_name` (inactive; frozen unless `is_trainable`).

        Only safetensors files are read unless `allow_pickle`. The file is read onto
        `torch_device` (default CPU), and each tensor then sits beside its layer. A file
        that does not fit the model raises an error naming the first mismatches, and the
        model stays as it was. `autocast_adapter_dtype` and `low_cpu_mem_usage` are
        `add_adapter`'s; with the latter the file's tensors become the adapter's (no copy).
        """
        load_adapter_into(
            cast("PeftModel", self),
            model_id,
            adapter_name,
            is_trainable,
            allow_pickle,
            subfolder,
            torch_device=torch_device,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = DEFAULT_ADAPTER_NAME,
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        torch_device: str | torch.device | None = None,
        **_ignored: Any,
    ) -> PeftModel:
        """Wrap `model` with the adapter saved in `model_id` (a folder) and return it.

        The options are `load_adapter`'s.
        """
        folder = Path(model_id) if subfolder is None else Path(model_id) / subfolder
        if config is None:
            config = config_from_file(read_adapter_config(folder), is_trainable)
        from .task_models import peft_model_class_for  # the task classes subclass PeftModel

        # As in PEFT, the config's task_type picks the class, whichever class this is called on.
        model_class = peft_model_class_for(config, cast("type[PeftModel]", cls))
        peft_model = model_class(
            model,
            config,
            adapter_name,
            init_weights=False,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        try:
            load_adapter_into(
                peft_model,
                folder,
                adapter_name,
                is_trainable,
                allow_pickle,
                config=config,
                inject=False,
                torch_device=torch_device,
            )
        except BaseException:
            peft_model.unload()
            raise
        return peft_model
