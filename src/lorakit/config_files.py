"""`LoraConfig.save_pretrained` / `from_pretrained` / `from_json_file`: a config alone on disk.

A mixin so `config.py` keeps the fields; the file is PEFT's `adapter_config.json`, written
atomically (`lorakit.io.atomic`) and read with `lorakit.io`'s checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from .errors import UnsupportedOptionError
from .hub import resolve_adapter_folder
from .io import CONFIG_NAME, CorruptAdapterFileError, read_adapter_config
from .io.atomic import write_text
from .keywords import REFUSED_HUB_KEYWORDS, check_load_keywords, split_hub_options

ConfigT = TypeVar("ConfigT", bound="ConfigFilesMixin")


class ConfigFilesMixin:
    """File methods of `LoraConfig`, with PEFT's names and meanings."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write `adapter_config.json` (PEFT's JSON, `inference_mode` as set) into the folder.

        Args:
            save_directory: The folder; created if missing.
            kwargs: PEFT passes these to `push_to_hub`; lorakit never uploads, so any is refused.

        Raises:
            UnsupportedOptionError: A keyword was given.
            FileExistsError: `save_directory` is a file.
        """
        for keyword, value in kwargs.items():
            raise UnsupportedOptionError(
                f"LoraConfig.save_pretrained() got {keyword}={value!r}: lorakit writes the "
                "config file only and never uploads. Fix: remove it."
            )
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(
                f"Cannot save the config to {folder}: it is a file, not a folder. Fix: choose "
                "another save directory."
            )
        write_text(folder / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(
        cls: type[ConfigT],
        pretrained_model_name_or_path: str | os.PathLike[str],
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> ConfigT:
        """The config in a folder's `adapter_config.json` (`subfolder` of it if given).

        A Hub repo id is downloaded as `PeftModel.from_pretrained` does, with its Hub keywords
        (`revision`, `token`, `cache_dir`, ...).

        Raises:
            UnsupportedOptionError: Any other keyword was given: config fields cannot be
                overridden here (set them on the returned config).
            AdapterNotFoundError, CorruptAdapterFileError: The file is missing or unreadable.
            ConfigError: The config is invalid or sets a feature lorakit does not implement.
        """
        fields = {item.name for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
        hub_options, other_options = split_hub_options(kwargs)  # `revision` is the Hub's
        for keyword, value in other_options.items():
            if keyword in REFUSED_HUB_KEYWORDS:
                check_load_keywords("LoraConfig.from_pretrained", {keyword: value})
            elif keyword in fields:
                raise UnsupportedOptionError(
                    f"LoraConfig.from_pretrained() got {keyword}={value!r}: config fields are "
                    f"not overridden here. Fix: set config.{keyword} on the returned config."
                )
            else:
                raise UnsupportedOptionError(
                    f"LoraConfig.from_pretrained() got an unknown keyword {keyword}={value!r}. "
                    "Fix: remove it."
                )
        folder = resolve_adapter_folder(
            "LoraConfig.from_pretrained",
            pretrained_model_name_or_path,
            subfolder,
            hub_options,
            with_weights=False,
        )
        return cls.from_dict(read_adapter_config(folder))

    @classmethod
    def from_json_file(
        cls, path_json_file: str | os.PathLike[str], **kwargs: Any
    ) -> dict[str, Any]:
        """The parsed JSON object of a config file, as a dict (PEFT's meaning: not a config).

        Raises:
            UnsupportedOptionError: A keyword was given.
            FileNotFoundError: No such file.
            CorruptAdapterFileError: The file is not a JSON object.
        """
        for keyword, value in kwargs.items():
            raise UnsupportedOptionError(
                f"LoraConfig.from_json_file() got {keyword}={value!r}, which it does not use. "
                "Fix: remove it."
            )
        path = Path(path_json_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptAdapterFileError(
                f"{path} is not valid JSON ({error}). Fix: restore or rewrite the file."
            ) from None
        if not isinstance(data, dict):
            raise CorruptAdapterFileError(
                f"{path} holds a JSON {type(data).__name__}, expected an object of config "
                "fields. Fix: restore or rewrite the file."
            )
        return data
