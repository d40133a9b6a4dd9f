"""Names and tables shared across lorakit (PEFT's spellings)."""

from __future__ import annotations

from typing import Final

BASE_ADAPTER_NAME: Final = "__base__"
"""Row name in `adapter_names` meaning "no adapter for this row"."""

DEFAULT_ADAPTER_NAME: Final = "default"

ALL_LINEAR: Final = "all-linear"

# Default LoRA targets by `model.config.model_type`, used when `target_modules` is not given.
DEFAULT_TARGET_MODULES: Final[dict[str, tuple[str, ...]]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "gptj": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "bloom": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "distilbert": ("q_lin", "v_lin"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "vit": ("query", "value", "q_proj", "v_proj"),  # transformers 4 and 5 names
    "whisper": ("q_proj", "v_proj"),
}

# Heads that sequence/token classification and QA models train beside the adapters.
TASK_HEAD_MODULES: Final[dict[str, tuple[str, ...]]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
