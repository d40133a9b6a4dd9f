"""bitsandbytes as a test oracle: imported once, with the reason to skip where it cannot be."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import nn


def import_bitsandbytes(module: str = "bitsandbytes") -> tuple[ModuleType | None, str]:
    """(the module, "") or (None, why it cannot be imported here), for `pytest.mark.skipif`.

    A missing native library raises more than ImportError, so every exception counts.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module), ""
    except Exception as error:
        return None, f"bitsandbytes cannot be imported here ({error!r})"


def load_bnb_llama(folder: Path) -> nn.Module:
    """A saved Llama loaded by transformers with NF4 double-quant `Linear4bit` layers (fp32)."""
    import transformers

    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model: nn.Module = transformers.LlamaForCausalLM.from_pretrained(
            folder, quantization_config=quantization, device_map="cpu"
        )
    return model
