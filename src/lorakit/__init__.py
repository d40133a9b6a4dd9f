"""lorakit: LoRA fine-tuning for PyTorch models, with PEFT's API and file format."""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import LoftQConfig, LoraConfig, TaskType
from .constants import BASE_ADAPTER_NAME
from .model import LoraModel, PeftModel, get_peft_model
from .utils import hotswap_adapter

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER_NAME",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "PeftModel",
    "TaskType",
    "get_peft_model",
    "hotswap_adapter",
]
