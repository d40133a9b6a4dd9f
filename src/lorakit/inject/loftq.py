"""Surgery for `init_lora_weights="loftq"`: quantize the targets one by one, then add the adapter.

`PeftModel.add_adapter` calls `apply_loftq_injection` instead of `apply_injection` when a new
adapter asks for LoftQ (and its weights are to be initialised). The layer-level conversion and
the user-facing documentation live in `lorakit.quant.loftq`.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from ..config import LoftQConfig, LoraConfig
from ..layers.base import module_weight
from ..layers.linear import LoraLinear
from ..layers.registry import lora_layer_class_for
from ..layers.routing import AdapterRouting
from ..ops.lora import lora_scale
from ..quant.linear import QuantConfig
from ..quant.loftq import check_loftq_module, loftq_quant_linear
from .matching import InjectionPlan, Target
from .surgery import apply_injection, replace_module

logger = logging.getLogger(__name__)


def apply_loftq_injection(
    model: nn.Module,
    plan: InjectionPlan,
    config: LoraConfig,
    adapter_name: str,
    routing: AdapterRouting,
    autocast_adapter_dtype: bool = True,
    quant_config: QuantConfig | None = None,
) -> None:
    """Replace each planned layer by its 4-bit LoftQ form and add the adapter holding A and B.

    Every target is checked before anything changes. Then, one layer at a time, the layer is
    quantized with its rank-r correction and put in place of the full-precision one, whose
    weight is released before the next layer starts; the adapter is added last.

    Args:
        model: the user's model (changed in place).
        plan: the targets from `plan_injection`.
        config: the adapter's config; `init_lora_weights` is "loftq".
        adapter_name: name of the new adapter.
        routing: the model's routing object, shared by every LoRA layer.
        autocast_adapter_dtype: `LoraLayer.add_adapter`'s option.
        quant_config: how to quantize; default NF4, blocks of 64, double quantization,
            computing in each layer's weight dtype.

    Raises:
        TargetModuleError: a target already holds adapters or has no quantizable weight.
        UnsupportedModuleError: a target is not a `torch.nn.Linear` or transformers `Conv1D`.
        Both are raised before the model changes. An error inside the numerical work (such
        as an SVD that does not converge) leaves the layers done so far quantized and
        without the adapter.
    """
    for target in plan.targets:
        check_loftq_module(target.key, model.get_submodule(target.key))
    quant_plan, factors = _quantize_targets(model, plan, config, quant_config)
    apply_injection(
        model,
        quant_plan,
        config,
        adapter_name,
        routing,
        initialise_weights=False,
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    with torch.no_grad():
        for key, (A, B) in factors.items():
            wrapper = model.get_submodule(key)
            assert isinstance(wrapper, LoraLinear)
            module_weight(wrapper.lora_A[adapter_name]).copy_(A)
            module_weight(wrapper.lora_B[adapter_name]).copy_(B)


def _quantize_targets(
    model: nn.Module, plan: InjectionPlan, config: LoraConfig, quant_config: QuantConfig | None
) -> tuple[InjectionPlan, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Put a LoftQ `QuantLinear` in place of each target, one at a time.

    Returns the plan retargeted at the new 4-bit layers, and (A, B) of each target's key.
    """
    loftq = config.loftq_config
    assert isinstance(loftq, LoftQConfig)  # LoraConfig validates this
    targets: list[Target] = []
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    squared_errors = [0.0, 0.0]  # without and with the correction, summed over layers
    for target in plan.targets:
        scale = lora_scale(target.lora_alpha, target.r, config.use_rslora)
        module = model.get_submodule(target.key)
        layer, result = loftq_quant_linear(module, target.r, scale, loftq.loftq_iter, quant_config)
        replace_module(model, target.key, layer)
        del module  # the model no longer holds the full-precision weight: it is freed here
        factors[target.key] = (result.A, result.B)
        squared_errors[0] += result.quantization_error**2
        squared_errors[1] += result.error**2
        logger.debug(
            "LoftQ %s: error %.4g -> %.4g", target.key, result.quantization_error, result.error
        )
        entry = lora_layer_class_for(layer)
        assert entry is not None  # lorakit.quant registers QuantLinear when imported
        targets.append(dataclasses.replace(target, entry=entry))
    logger.info(
        "LoftQ quantized %d layers; Frobenius error over them: %.4g plain, %.4g with the adapter.",
        len(factors),
        math.sqrt(squared_errors[0]),
        math.sqrt(squared_errors[1]),
    )
    return InjectionPlan(tuple(targets), plan.modules_to_save), factors
