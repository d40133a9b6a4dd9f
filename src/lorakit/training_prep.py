"""PEFT's two training preparations: `prepare_model_for_kbit_training` and
`cast_mixed_precision_params`.

Both change parameter dtypes through `parameter.data`, so the `Parameter` objects (and any
optimizer or hook holding them) stay the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedOptionError

HALF_DTYPES = (torch.float16, torch.bfloat16)
# bitsandbytes' packed 4-bit weight: a uint8 Parameter that a cast would destroy.
PACKED_PARAMETER_TYPES = ("Params4bit",)
# transformers' quantization methods whose weights stay in their own dtypes (PEFT's list).
KEEP_DTYPE_METHODS = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a (quantized) transformers model ready for LoRA training, as PEFT does.

    Every parameter is frozen; fp16/bf16 parameters are cast to fp32 (not packed 4-bit ones,
    and none for the GPTQ/AQLM/EETQ/HQQ/torchao methods, whose kernels need their dtypes).
    On a k-bit model (bitsandbytes' `is_loaded_in_4bit/8bit`, those methods, or lorakit's
    own `QuantLinear` layers) gradient checkpointing is turned on, with inputs requiring
    grad so the adapters inside checkpointed blocks get gradients (not needed, and not done,
    with `use_reentrant=False`). A model that is not quantized keeps its checkpointing setting,
    as in PEFT.

    Args:
        model: The model, changed in place.
        use_gradient_checkpointing: Turn checkpointing on for a k-bit model.
        gradient_checkpointing_kwargs: Passed to `model.gradient_checkpointing_enable`
            (e.g. `{"use_reentrant": False}`).
        auto_clear_cache: After the casts, release the accelerator's cached blocks.

    Returns:
        `model`.

    Raises:
        UnsupportedOptionError: `gradient_checkpointing_kwargs` given while checkpointing is
            not turned on (not a k-bit model, or `use_gradient_checkpointing=False`), or
            checkpointing is asked of a model without `gradient_checkpointing_enable`.
    """
    checkpoint_options = dict(gradient_checkpointing_kwargs or {})
    method = getattr(model, "quantization_method", None)
    keeps_dtypes = method in KEEP_DTYPE_METHODS or bool(getattr(model, "hqq_quantized", False))
    use_checkpointing = use_gradient_checkpointing and (keeps_dtypes or _is_kbit(model))
    if checkpoint_options and not use_checkpointing:
        raise UnsupportedOptionError(
            f"gradient_checkpointing_kwargs={checkpoint_options!r} has no effect: checkpointing "
            "is turned on only for a k-bit model with use_gradient_checkpointing=True. Fix: "
            "remove it, or call model.gradient_checkpointing_enable(...) yourself."
        )
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if use_checkpointing and not callable(enable):
        raise UnsupportedOptionError(
            f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers "
            "model). Fix: pass use_gradient_checkpointing=False."
        )
    model.requires_grad_(False)
    if not keeps_dtypes:
        _upcast_half_parameters(model)
        if auto_clear_cache and torch.accelerator.is_available():
            torch.accelerator.empty_cache()
    if use_checkpointing:
        if checkpoint_options.get("use_reentrant", True):
            _make_inputs_require_grad(model)
        enable(gradient_checkpointing_kwargs=checkpoint_options)  # type: ignore[misc]
    return model


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to `dtype`, trainable ones to fp32 (for autocast mixed precision).

    Non-floating parameters (packed quantized weights) and buffers are left alone.

    Args:
        model: The model, changed in place.
        dtype: A floating dtype, usually `torch.float16` or `torch.bfloat16`.

    Raises:
        UnsupportedOptionError: `dtype` is not a floating-point dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UnsupportedOptionError(
            f"cast_mixed_precision_params(dtype={dtype!r}): allowed are floating dtypes, "
            "e.g. torch.bfloat16 or torch.float16."
        )
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dtype.is_floating_point:
                parameter.data = parameter.data.to(
                    torch.float32 if parameter.requires_grad else dtype
                )


def _is_kbit(model: nn.Module) -> bool:
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    from .quant.linear import QuantLinear  # lorakit's own 4-bit base layer

    return any(isinstance(module, QuantLinear) for module in model.modules())


def _upcast_half_parameters(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            is_packed = type(parameter).__name__ in PACKED_PARAMETER_TYPES
            if parameter.dtype in HALF_DTYPES and not is_packed:
                parameter.data = parameter.data.to(torch.float32)


def _make_inputs_require_grad(model: nn.Module) -> None:
    """transformers' `enable_input_require_grads`: embedding outputs require grad."""
    enable_inputs = getattr(model, "enable_input_require_grads", None)
    if callable(enable_inputs):
        enable_inputs()
        return
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(embeddings, nn.Module):
        raise UnsupportedOptionError(
            f"{type(model).__name__} exposes no input embeddings to make its checkpointed "
            "inputs require grad. Fix: pass gradient_checkpointing_kwargs="
            "{'use_reentrant': False}."
        )
    embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
