"""`AutoPeftModelFor...`: load the base named in an adapter's config and the adapter, in one call.

transformers is imported only when one of these is used.
"""

from __future__ import annotations

import os
from typing import Any

from .config import ConfigSource
from .errors import LorakitError, UnsupportedOptionError
from .extras import import_optional
from .hub import resolve_adapter_folder
from .io import read_adapter_config
from .keywords import split_hub_options
from .model import PeftModel
from .task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

# The Hub keywords transformers' `from_pretrained` takes too: they apply to the base as well.
BASE_HUB_KEYWORDS: tuple[str, ...] = ("cache_dir", "force_download", "local_files_only", "token")


class _AutoPeftModel:
    """Base of the task classes; `auto_class_name` names the transformers auto class and
    `peft_model_class` the `PeftModel` class returned when the config names no task_type."""

    auto_class_name = "AutoModel"
    peft_model_class: type[PeftModel] = PeftModel

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: ConfigSource | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        *,
        subfolder: str | None = None,
        **model_kwargs: Any,
    ) -> PeftModel:
        """Build the base from the adapter's `base_model_name_or_path`, then load the adapter.

        As in PEFT, `pretrained_model_name_or_path` (the adapter) is a folder or a Hub repo id,
        and `revision` and `subfolder` pick the adapter in its repo; the base is loaded at the
        revision the adapter's config records (its `revision` field, set by
        `get_peft_model(revision=)`).
        The Hub keywords transformers' `from_pretrained` also takes (`token`, `cache_dir`,
        `force_download`, `local_files_only`) apply to both downloads; the other
        `hf_hub_download` keywords to the adapter's; the rest of `model_kwargs` go to the
        base's `from_pretrained` (e.g. `dtype`). `config` is `PeftModel.from_pretrained`'s.

        Raises:
            LorakitError: The adapter's config names no base model.
            AdapterNotFoundError: The adapter is neither a folder nor found on the Hub.
            UnsupportedOptionError: `import_allowlist` is given (PEFT's guard for bases of
                other libraries, named by a config's `auto_mapping`: lorakit builds
                transformers bases only), or a Hub option with a local folder.
        """
        transformers = import_optional("transformers", "transformers", cls.__name__)

        if import_allowlist is not None:
            raise UnsupportedOptionError(
                f"{cls.__name__}.from_pretrained(import_allowlist={import_allowlist!r}): "
                "lorakit builds the base with transformers' auto classes only, so no other "
                "library is imported. Fix: remove it; for another library's model, build the "
                "base yourself and call PeftModel.from_pretrained(base, folder)."
            )

        hub_options, model_kwargs = split_hub_options({"revision": revision, **model_kwargs})
        base_options = {
            key: value for key, value in hub_options.items() if key in BASE_HUB_KEYWORDS
        }
        method = f"{cls.__name__}.from_pretrained"
        folder = resolve_adapter_folder(
            method,
            pretrained_model_name_or_path,
            subfolder,
            hub_options,
            used_elsewhere=list(base_options),
        )
        adapter_config = read_adapter_config(folder)
        base_path = adapter_config.get("base_model_name_or_path")
        if not base_path:
            raise LorakitError(
                f"{folder / 'adapter_config.json'} names no base_model_name_or_path; "
                "load the base yourself and call PeftModel.from_pretrained(base, folder)."
            )
        auto_class = getattr(transformers, cls.auto_class_name)
        base = auto_class.from_pretrained(
            base_path, revision=adapter_config.get("revision"), **base_options, **model_kwargs
        )
        return cls.peft_model_class.from_pretrained(
            base, folder, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )


class AutoPeftModel(_AutoPeftModel):
    auto_class_name = "AutoModel"


class AutoPeftModelForCausalLM(_AutoPeftModel):
    auto_class_name = "AutoModelForCausalLM"
    peft_model_class = PeftModelForCausalLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForSequenceClassification"
    peft_model_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForTokenClassification"
    peft_model_class = PeftModelForTokenClassification


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    auto_class_name = "AutoModelForSeq2SeqLM"
    peft_model_class = PeftModelForSeq2SeqLM


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    auto_class_name = "AutoModelForQuestionAnswering"
    peft_model_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    auto_class_name = "AutoModel"
    peft_model_class = PeftModelForFeatureExtraction
