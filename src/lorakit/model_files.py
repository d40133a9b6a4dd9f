"""`PeftModel`'s file methods: save, load and wrap-from-folder in PEFT's layout.

A mixin so `model.py` keeps the adapter lifecycle and this module the file entry points; the
work itself is in `persistence` (what to write and read) and `io` (how).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from .config import ConfigSource, LoraConfig
from .constants import DEFAULT_ADAPTER_NAME
from .errors import UnsupportedOptionError
from .hub import DEFAULT_MAX_SHARD_SIZE, push_adapters, resolve_adapter_folder
from .io import read_adapter_config, save_adapters_together
from .keywords import check_load_keywords, check_save_keywords, split_hub_options
from .mutated_init import converted_contents
from .persistence import config_from_file, load_adapter_into, save_adapters

if TYPE_CHECKING:
    from .model import PeftModel


class AdapterFilesMixin:
    """`save_pretrained`, `load_adapter` and `from_pretrained` of `PeftModel`.

    The signatures are PEFT's; each keyword is implemented or, given a value, raises
    `UnsupportedOptionError` naming it (`lorakit.keywords`).
    """

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | Literal["auto"] = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        *,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write adapters in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`);
        "default" at the top of the folder, other adapters in `<folder>/<name>/`. Atomic.

        `safe_serialization=False` writes `adapter_model.bin` (`torch.save`) instead, as PEFT
        does. On a process that is not the main one (`is_main_process=False`, as
        `transformers.Trainer` passes on ranks > 0) nothing is written. `state_dict` (PEFT's
        keyword, passed by `transformers.Trainer` and FSDP training) is read instead of the
        model's own `state_dict()`: full tensors of a sharded model.

        `path_initial_model_for_weight_conversion` (PEFT's) names the folder where the
        adapter was saved right after `get_peft_model`, before training, for a "pissa",
        "pissa_niter_N" or "olora" adapter: the adapter is then written as a plain rank-2r
        LoRA for the ORIGINAL base (A' = [A ; A0], B' = [B | -B0], r and lora_alpha doubled,
        `init_lora_weights=True`), and that folder's config gets `init_lora_weights=True`, as
        PEFT does (`lorakit.mutated_init`).

        Raises:
            UnsupportedOptionError: a keyword lorakit does not implement; with
                `path_initial_model_for_weight_conversion`, more than one adapter selected or
                an adapter whose init did not change the base.
            ConfigError: that conversion asked of an rsLoRA adapter with rank/alpha patterns.
            AdapterMismatchError: the initial folder does not hold this adapter's A and B.
        """
        check_save_keywords(kwargs)
        model = cast("PeftModel", self)
        model._check_exist(
            list(model.peft_config if selected_adapters is None else selected_adapters)
        )
        if not is_main_process:
            return
        if path_initial_model_for_weight_conversion is not None:
            contents = converted_contents(
                model,
                path_initial_model_for_weight_conversion,
                selected_adapters,
                save_embedding_layers,
                state_dict,
            )
            save_adapters_together(save_directory, contents, safe_serialization=safe_serialization)
            return
        save_adapters(
            model,
            save_directory,
            selected_adapters,
            save_embedding_layers,
            state_dict,
            safe_serialization=safe_serialization,
        )

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: Mapping[str, str] | None = None,
        *,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter under `adapter_name` (inactive; frozen unless `is_trainable`).

        `model_id` is a folder or a Hub repo id ("org/name"), downloaded with
        `huggingface_hub` into its cache (read from it when offline), with `subfolder` and
        `hf_hub_download`'s keywords (`revision`, `token`, `cache_dir`, `force_download`, ...).
        Only safetensors files are read unless `allow_pickle`. The file is read onto
        `torch_device` (default CPU), and each tensor then sits beside its layer. A file
        that does not fit the model, or whose config uses a feature lorakit does not
        implement, raises an error naming it, and the model stays as it was.
        `autocast_adapter_dtype` and `low_cpu_mem_usage` are `add_adapter`'s; with the latter
        the file's tensors become the adapter's (no copy). `key_mapping` is PEFT's: regex ->
        replacement applied to the file's keys (without their `base_model.model.` prefix)
        before they are matched, the first pattern that matches a key wins; by default the
        base's `_checkpoint_conversion_mapping`, as in PEFT.

        Raises:
            UnsupportedOptionError: `ephemeral_gpu_offload=True` or another PEFT keyword
                lorakit does not implement (device maps, ...), named; or a Hub keyword
                given with a local folder.
            AdapterNotFoundError: `model_id` is neither a folder nor found on the Hub (or in
                the cache, offline).
        """
        hub_options, other_options = split_hub_options(kwargs)
        check_load_keywords("load_adapter", {"ephemeral_gpu_offload": ephemeral_gpu_offload})
        check_load_keywords("load_adapter", other_options)
        folder = resolve_adapter_folder("load_adapter", model_id, subfolder, hub_options)
        load_adapter_into(
            cast("PeftModel", self),
            folder,
            adapter_name,
            is_trainable,
            allow_pickle,
            torch_device=torch_device,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            key_mapping=key_mapping,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = DEFAULT_ADAPTER_NAME,
        is_trainable: bool = False,
        config: ConfigSource | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: Mapping[str, str] | None = None,
        *,
        allow_pickle: bool = False,
        subfolder: str | None = None,
        torch_device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap `model` with the adapter saved in `model_id` and return it.

        `model_id` is a folder or a Hub repo id, as in `load_adapter`. `config` (a lorakit or
        peft `LoraConfig`, or a dict) replaces the saved config; as in PEFT its
        `inference_mode` follows `is_trainable` (the caller's object is not changed). The
        other options are `load_adapter`'s. If anything fails, `model` is left as it was.
        """
        hub_options, other_options = split_hub_options(kwargs)
        check_load_keywords("from_pretrained", {"ephemeral_gpu_offload": ephemeral_gpu_offload})
        check_load_keywords("from_pretrained", other_options)
        folder = resolve_adapter_folder("from_pretrained", model_id, subfolder, hub_options)
        if config is None:
            lora_config = config_from_file(read_adapter_config(folder), is_trainable, folder)
        else:
            lora_config = LoraConfig.from_config(config)
            lora_config.inference_mode = not is_trainable
        from .task_models import peft_model_class_for  # the task classes subclass PeftModel

        # As in PEFT, the config's task_type picks the class, whichever class this is called on.
        model_class = peft_model_class_for(lora_config, cast("type[PeftModel]", cls))
        peft_model = model_class(
            model,
            lora_config,
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
                config=lora_config,
                inject=False,
                torch_device=torch_device,
                key_mapping=key_mapping,
            )
        except BaseException:
            peft_model.unload()
            raise
        return peft_model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
        tags: list[str] | None = None,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
    ) -> Any:
        """Upload the adapters to the Hugging Face Hub repo `repo_id`, never the base model.

        The keywords are transformers' `push_to_hub`'s (which PEFT's is), plus
        `save_pretrained`'s `safe_serialization` and `selected_adapters`. The repo gets
        exactly what `save_pretrained` writes for the selected adapters, and a `README.md`
        model card: the repo's own card if it has one (its text kept), else a new one, with
        `tags` and the base model's Hub id added. The repo (`private` applies if it is
        created) and the branch `revision` are created if missing; `create_pr` opens a pull
        request instead of committing to the branch. `huggingface_hub` does the upload.

        Returns:
            The commit (`huggingface_hub.CommitInfo`; its `str` is the commit's URL).

        Raises:
            UnsupportedOptionError: `max_shard_size` other than the default or None (adapter
                weights are one file, never sharded).
            AdapterNameError: A selected adapter does not exist.
        """
        if max_shard_size is not None and max_shard_size != DEFAULT_MAX_SHARD_SIZE:
            raise UnsupportedOptionError(
                f"push_to_hub(max_shard_size={max_shard_size!r}): lorakit writes each adapter's "
                "weights as one file, never sharded. Fix: remove it."
            )
        return push_adapters(
            cast("PeftModel", self),
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            tags=tags,
            selected_adapters=selected_adapters,
            safe_serialization=safe_serialization,
        )
