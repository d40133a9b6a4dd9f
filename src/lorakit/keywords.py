"""PEFT's keyword arguments of `save_pretrained`, `from_pretrained` and `load_adapter`: which
lorakit passes to the Hugging Face Hub, and which it refuses (each one given a value other than
"unused" raises, naming it).

PEFT passes these through `**kwargs`; a keyword that does nothing here must not pass silently,
since the caller asked for something (a device map, a pickle file, ...) that would not happen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import UnsupportedOptionError

# hf_hub_download's options that lorakit passes to it when `model_id` is a Hub repo id
# (`lorakit.hub`); `subfolder` is a named keyword of the loaders.
HUB_DOWNLOAD_KEYWORDS: tuple[str, ...] = (
    "cache_dir",
    "endpoint",
    "etag_timeout",
    "force_download",
    "headers",
    "library_name",
    "library_version",
    "local_dir",
    "local_files_only",
    "repo_type",
    "revision",
    "token",
    "tqdm_class",
    "user_agent",
)
# Hub keywords PEFT takes that lorakit refuses: keyword -> why, and the fix.
REFUSED_HUB_KEYWORDS: dict[str, str] = {
    "dry_run": (
        "a dry run downloads nothing, so there would be no adapter to load. Fix: remove it; "
        "huggingface_hub.hf_hub_download(repo_id, filename, dry_run=True) reports what would "
        "be downloaded"
    ),
    "proxies": (
        "huggingface_hub 1.0 and later take no proxies argument. Fix: set the HTTPS_PROXY "
        "environment variable instead"
    ),
    "use_auth_token": "it is the old name of token. Fix: pass token=... instead",
}
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
        "lorakit does not implement ephemeral GPU offload (peft's way of computing DoRA's "
        "initial magnitudes on a GPU for adapters kept on the CPU); lorakit computes them "
        "where the layer is. Fix: leave it False"
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


def is_unused(keyword: str, value: object) -> bool:
    """Whether `value` asks for nothing: None, or one of the keyword's `UNUSED_VALUES`."""
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
        if keyword in HUB_DOWNLOAD_KEYWORDS:
            if not is_unused(keyword, value):
                raise UnsupportedOptionError(
                    f"{method}({keyword}={value!r}): {method} does not download from the "
                    "Hugging Face Hub. Fix: remove it; PeftModel.from_pretrained and "
                    "load_adapter take a Hub repo id with this keyword."
                )
        elif keyword in REFUSED_HUB_KEYWORDS:
            if not is_unused(keyword, value):
                raise UnsupportedOptionError(
                    f"{method}({keyword}={value!r}): {REFUSED_HUB_KEYWORDS[keyword]}."
                )
        elif keyword in DISPATCH_KEYWORDS:
            if not is_unused(keyword, value):
                raise UnsupportedOptionError(
                    f"{method}({keyword}={value!r}): lorakit does not dispatch models over "
                    "devices or disk (accelerate's device_map). Fix: place the base model "
                    "yourself; adapters follow their layers (or pass torch_device)."
                )
        elif keyword in OTHER_LOAD_KEYWORDS:
            if not is_unused(keyword, value):
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


def split_hub_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`hf_hub_download` options lorakit passes on, the other keywords), from `options`."""
    hub = {key: value for key, value in options.items() if key in HUB_DOWNLOAD_KEYWORDS}
    rest = {key: value for key, value in options.items() if key not in HUB_DOWNLOAD_KEYWORDS}
    return hub, rest


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
            "(it writes the adapter folder only; PeftModel.push_to_hub(repo_id) uploads it). "
            "Fix: remove it."
        )
