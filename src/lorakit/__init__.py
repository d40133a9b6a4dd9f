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
from .functional import (
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from .init_configs import CordaConfig, EvaConfig
from .init_data.corda import preprocess_corda
from .init_data.eva import get_eva_state_dict
from .init_data.eva_load import initialize_lora_eva_weights
from .model import LoraModel, PeftModel, get_peft_model
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .task_models import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .training_prep import cast_mixed_precision_params, prepare_model_for_kbit_training
from .utils import (
    hotswap_adapter,
    prepare_model_for_compiled_hotswap,
    replace_lora_weights_loftq,
)

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
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "cast_mixed_precision_params",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "preprocess_corda",
    "replace_lora_weights_loftq",
    "set_peft_model_state_dict",
]
