"""PEFT's task classes: `PeftModelForCausalLM`, `...ForSequenceClassification`, ...

`get_peft_model` and `PeftModel.from_pretrained` pick the class from the config's `task_type`
(plain `PeftModel` without one), so `isinstance` checks written for peft's classes work. The
task's heads are chosen by `task_type` itself (see `constants.TASK_HEAD_MODULES`); the classes
add no behaviour of their own.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import TaskType
from .model import PeftModel


class PeftModelForCausalLM(PeftModel):
    """A `PeftModel` over a causal language model (`task_type="CAUSAL_LM"`)."""


class PeftModelForSequenceClassification(PeftModel):
    """A `PeftModel` over a sequence classifier (`task_type="SEQ_CLS"`); its head trains."""


class PeftModelForTokenClassification(PeftModel):
    """A `PeftModel` over a token classifier (`task_type="TOKEN_CLS"`); its head trains."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A `PeftModel` over an encoder-decoder language model (`task_type="SEQ_2_SEQ_LM"`)."""


class PeftModelForQuestionAnswering(PeftModel):
    """A `PeftModel` over an extractive QA model (`task_type="QUESTION_ANS"`); its head trains."""


class PeftModelForFeatureExtraction(PeftModel):
    """A `PeftModel` over an encoder giving features (`task_type="FEATURE_EXTRACTION"`)."""


TASK_MODEL_CLASSES: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
TASK_TYPE_VALUES = frozenset(task.value for task in TaskType)


def peft_model_class_for(config: object, default: type[PeftModel]) -> type[PeftModel]:
    """The class for a config's `task_type` (as PEFT picks it); `default` when it has none.

    `config` is anything `get_peft_model` takes (a lorakit or peft `LoraConfig`, or a dict);
    a `task_type` that is not a `TaskType` is left to the config's own validation.
    """
    task_type = config.get("task_type") if isinstance(config, Mapping) else None
    if not isinstance(config, Mapping):
        task_type = getattr(config, "task_type", None)
    if task_type is None or task_type not in TASK_TYPE_VALUES:
        return default
    return TASK_MODEL_CLASSES[TaskType(task_type)]
