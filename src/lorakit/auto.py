"""`AutoPeftModelFor...`: load the base named in an adapter's config and the adapter, in one call.

transformers is imported only when one of these is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import LorakitError
from .io import read_adapter_config
from .model import PeftModel
from .task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)


class _AutoPeftModel:
    """Base of the task classes; `auto_class_name` names the transformers auto class and
    `peft_model_class` the `PeftModel` class returned when the config names no task_type."""

    auto_class_name = "AutoModel"
    peft_model_class: type[PeftModel] = PeftModel

    @classmethod
    def from_pretrained(
        cls,
        adapter_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        **model_kwargs: Any,
    ) -> PeftModel:
        """Build the base from the adapter's `base_model_name_or_path`, then load the adapter."""
        import transformers

        config = read_adapter_config(adapter_path)
        base_path = config.get("base_model_name_or_path")
        if not base_path:
            raise LorakitError(
                f"{Path(adapter_path) / 'adapter_config.json'} names no base_model_name_or_path; "
                "load the base yourself and call PeftModel.from_pretrained(base, adapter_path)."
            )
        auto_class = getattr(transformers, cls.auto_class_name)
        base = auto_class.from_pretrained(base_path, **model_kwargs)
        return cls.peft_model_class.from_pretrained(
            base, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable
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
