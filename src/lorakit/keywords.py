"""PEFT's keyword arguments of `save_pretrained`, `from_pretrained` and `load_adapter` that
lorakit does not implement: each one given a value other than "unused" raises, naming it.

PEFT passes these through `**kwargs`; a keyword that does nothing here must not pass silently,
since the caller asked for something (a Hub revision, a device map, ...) that would not happen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import UnsupportedOptionError

# hf_hub_download's options (and `use_auth_token`): lorakit reads local folders only.
HUB_KEYWORDS: tuple[str, ...] = (
    "cache_dir",
    "dry_run",
    "endpoint",
    "etag_timeout",
    "force_download",
    "headers",
    "library_name",
    "library_version",
    "local_dir",
    "local_files_only",
    "proxies",
    "repo_type",
    "revision",
    "token",
    "tqdm_class",
    "use_auth_token",
    "user_agent",
)
# accelerate's dispatch of a model spread over devices and disk.
DISPATCH_KEYWORDS: tuple[str, ...] = (
    "device_map",
    "max_memory",
    "offload_dir",
    "offload_folder",
    "offload_index",
)
# Keyword -> why it is refused and the fix, for the rest of PEFT's loading keywords.
OTHER_LOAD_KEYWORDS: dict[str, str] = {
    "ignore_mismatched_sizes": (
        "lorakit refuses a file whose shapes do not fit, listing each mismatch. Fix: load the "
        "adapter into the base it was trained on"
    ),
    "use_safetensors": (
        "lorakit reads safetensors only unless allow_pickle=True. Fix: pass allow_pickle=True "
        "to read adapter_model.bin"
    ),
    "adapters": "X-LoRA is not implemented. Fix: use peft for X-LoRA models",
    "ephemeral_gpu_offload": (
        "it only concerns DoRA, which lorakit does not implement. Fix: leave it False"
    ),
}
# What each refused keyword may hold without being refused: its "unused" values.
UNUSED_VALUES: dict[str, tuple[object, ...]] = {
    "force_download": (False,),
    "local_files_only": (False,),
    "dry_run": (False,),
    "ignore_mismatched_sizes": (False,),
    "use_safetensors": (True,),
    "ephemeral_gpu_offload": (False,),
}


def _config_fields() -> set[str]:
    """`LoraConfig`'s fields, which PEFT's loaders take in `**kwargs` and use only where the
    file lacks them (imported here: `config` itself uses this module)."""
    from .config import LoraConfig

    return {item.name for item in dataclasses.fields(LoraConfig)}


def _is_unused(keyword: str, value: object) -> bool:
    return value is None or any(value is unused for unused in UNUSED_VALUES.get(keyword, ()))


def check_load_keywords(method: str, options: Mapping[str, Any]) -> None:
    """Raise for the first of `options` (PEFT's `**kwargs` of loading) that holds a value.

    Args:
        method: The method that received them, for the message (e.g. "load_adapter").
        options: The keyword arguments lorakit's signature did not name.

    Raises:
        UnsupportedOptionError: A keyword lorakit does not implement holds a value, or a
            keyword is unknown; the message names it and the fix.
    """
    for keyword, value in options.items():
        if keyword in HUB_KEYWORDS:
            if not _is_unused(keyword, value):
                raise UnsupportedOptionError(
                    f"{method}({keyword}={value!r}): lorakit reads adapters from local folders "
                    "only and does not download from the Hugging Face Hub. Fix: download the "
                    f"adapter first, e.g. huggingface_hub.snapshot_download(repo_id, "
                    f"{keyword}=...), and pass the folder."
                )
        elif keyword in DISPATCH_KEYWORDS:
            if not _is_unused(keyword, value):
                raise UnsupportedOptionError(
                    f"{method}({keyword}={value!r}): lorakit does not dispatch models over "
                    "devices or disk (accelerate's device_map). Fix: place the base model "
                    "yourself; adapters follow their layers (or pass torch_device)."
                )
        elif keyword in OTHER_LOAD_KEYWORDS:
            if not _is_unused(keyword, value):
                raise UnsupportedOptionError(
                    f"{method}({keyword}={value!r}): {OTHER_LOAD_KEYWORDS[keyword]}."
                )
        elif keyword in _config_fields():
            raise UnsupportedOptionError(
                f"{method}({keyword}={value!r}): the adapter's config fields come from its "
                "adapter_config.json, whose values PEFT would keep over this one. Fix: pass "
                f"config=LoraConfig(...) with {keyword} set, or edit the file."
            )
        else:
            raise UnsupportedOptionError(
                f"{method}() got an unknown keyword {keyword}={value!r}. Fix: remove it; see "
                f"help(PeftModel.{method}) for the keywords lorakit takes."
            )


def check_save_keywords(options: Mapping[str, Any]) -> None:
    """Raise for any keyword of `save_pretrained` lorakit's signature did not name.

    PEFT documents its extra keywords as `push_to_hub`'s and reads none of them but
    `state_dict` (which lorakit names), so each is refused rather than dropped.

    Raises:
        UnsupportedOptionError: Names the keyword and the fix.
    """
    for keyword, value in options.items():
        raise UnsupportedOptionError(
            f"save_pretrained() got {keyword}={value!r}, which lorakit does not implement "
            "(it writes the adapter folder only, and never uploads). Fix: remove it."
        )
