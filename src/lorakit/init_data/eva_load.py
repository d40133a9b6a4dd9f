"""`initialize_lora_eva_weights`: set an EVA adapter from its components (PEFT's signature).

Each LoRA linear layer of the adapter gets A = its components (B stays zero, so the model
still starts as the base) at the rank EVA gave it: a new rank re-creates the adapter there
(lora_alpha scaled by new / old rank with `adjust_scaling_factors`), rank 0 removes it from
the layer. Layers EVA does not decompose (embeddings, convolutions) are re-initialised as
`init_lora_weights=True`. The adapter's config then records the result as a plain LoRA
would: `target_modules` lists the adapted modules, `rank_pattern` / `alpha_pattern` their
ranks and alphas where they differ from `r` / `lora_alpha`, so a saved file loads as the
plain LoRA it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import AdapterStateError, ConfigError, UnsupportedOptionError
from ..inject.surgery import replace_module, wrapped_module
from ..layers.base import LoraLayer
from ..layers.linear import LoraLinear
from .eva import get_eva_state_dict
from .inputs import (
    ForwardFunction,
    LayerInputsFunction,
    ModelInputsFunction,
    forward_fn_dict,
    prepare_layer_inputs_fn_language_modeling,
    prepare_model_inputs_fn_language_modeling,
)

if TYPE_CHECKING:
    from ..model import PeftModel

logger = logging.getLogger(__name__)

# The prefix of a PeftModel's module names before the base model's own paths.
PEFT_MODEL_PREFIX = "base_model.model."


@dataclass
class _LayerPlan:
    key: str  # path in the base model
    layer: LoraLayer
    components: torch.Tensor | None  # None: re-initialise as init_lora_weights=True
    rank: int
    lora_alpha: float


def _check_model(model: Any, adapter_name: str) -> PeftModel:
    from ..model import PeftModel

    if not isinstance(model, PeftModel):
        raise UnsupportedOptionError(
            f"initialize_lora_eva_weights takes a lorakit PeftModel; got a "
            f"{type(model).__name__}. Fix: model = get_peft_model(base, "
            "LoraConfig(init_lora_weights='eva', ...)) first."
        )
    if len(model.active_adapters) > 1:
        raise AdapterStateError(
            f"initialize_lora_eva_weights works with one active adapter; "
            f"{model.active_adapters} are active. Fix: model.set_adapter({adapter_name!r})."
        )
    if adapter_name not in model.peft_config:
        raise AdapterStateError(
            f"No adapter {adapter_name!r}; adapters: {list(model.peft_config)}."
        )
    option = model.peft_config[adapter_name].init_lora_weights
    if option != "eva":
        raise ConfigError(
            f"initialize_lora_eva_weights sets adapters made with init_lora_weights='eva'; "
            f"{adapter_name!r} has init_lora_weights={option!r}. Fix: create it with "
            "LoraConfig(init_lora_weights='eva', eva_config=EvaConfig(...))."
        )
    return model


def _base_key(name: str) -> str:
    return name[len(PEFT_MODEL_PREFIX) :] if name.startswith(PEFT_MODEL_PREFIX) else name


def _plan(
    model: PeftModel, eva_state_dict: Mapping[str, torch.Tensor], adapter_name: str
) -> list[_LayerPlan]:
    """Each layer of the adapter with its new A (or None) and rank; raises on a mismatch."""
    config = model.peft_config[adapter_name]
    eva_config = config.eva_config
    assert eva_config is not None, "LoraConfig fills eva_config for init_lora_weights='eva'"
    components = {_base_key(name): value for name, value in eva_state_dict.items()}
    plans = []
    for key, layer in model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        if adapter_name in layer.merged_adapters:
            raise AdapterStateError(
                f"{key!r} has adapter {adapter_name!r} merged. Fix: unmerge_adapter() first."
            )
        r, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        value = components.pop(key, None)
        if value is None:
            plans.append(_LayerPlan(key, layer, None, r, alpha))
            continue
        in_features = layer._adapter_pair(adapter_name)[0].shape[1]
        if not isinstance(layer, LoraLinear) or value.ndim != 2 or value.shape[1] != in_features:
            raise UnsupportedOptionError(
                f"eva_state_dict[{key!r}] has shape {tuple(value.shape)}; {key!r} is a "
                f"{type(layer).__name__} whose A has {in_features} columns (EVA sets linear "
                "layers only). Fix: pass the dict get_eva_state_dict returns for this model."
            )
        rank = value.shape[0]
        if rank not in (0, r) and eva_config.adjust_scaling_factors:
            alpha = alpha * rank / r
        plans.append(_LayerPlan(key, layer, value, rank, alpha))
    if components:
        raise UnsupportedOptionError(
            f"eva_state_dict holds {sorted(components)[:4]}, which are not LoRA layers of "
            f"adapter {adapter_name!r}. Fix: pass the dict get_eva_state_dict returns for "
            "this model (or leave those layers out of it)."
        )
    return plans


def _recreate(layer: LoraLayer, adapter_name: str, plan: _LayerPlan, config: Any) -> None:
    """The adapter again at the plan's rank and alpha, in its old dtype, B zero."""
    A = layer._adapter_pair(adapter_name)[0]
    keeps_fp32 = A.dtype == layer.adapter_dtype_and_device(True)[0]
    dropout = layer.lora_dropout_p[adapter_name]
    layer.delete_adapter(adapter_name)
    layer.add_adapter(
        adapter_name,
        r=plan.rank,
        lora_alpha=plan.lora_alpha,
        lora_dropout=dropout,
        use_rslora=config.use_rslora,
        init_lora_weights=True,
        autocast_adapter_dtype=keeps_fp32,
    )


@torch.no_grad()
def _load(model: PeftModel, plans: list[_LayerPlan], adapter_name: str) -> None:
    config = model.peft_config[adapter_name]
    base_model = model.get_base_model()
    targets, missing = [], []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for plan in plans:
        layer = plan.layer
        if plan.components is not None and plan.rank == 0:
            if len(layer.adapter_names) > 1:
                layer.delete_adapter(adapter_name)
            else:
                replace_module(base_model, plan.key, wrapped_module(layer))
            continue
        A = layer._adapter_pair(adapter_name)[0]
        if plan.components is None or plan.rank != layer.r[adapter_name] or A.is_meta:
            _recreate(layer, adapter_name, plan, config)
        if plan.components is not None:
            A = layer._adapter_pair(adapter_name)[0]
            A.copy_(plan.components.to(A.dtype))
            layer._adapter_pair(adapter_name)[1].zero_()
            targets.append(plan.key)
        else:
            missing.append(plan.key)
        if plan.rank != config.r:
            rank_pattern[plan.key] = plan.rank
        if plan.lora_alpha != config.lora_alpha:
            alpha_pattern[plan.key] = plan.lora_alpha
    config.target_modules = targets + missing
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    model._wrappers_changed()
    model._refresh_trainable()
    if missing:
        logger.warning(
            "EVA: %s keep init_lora_weights=True (EVA decomposes linear layers only)", missing
        )


def _check_unused_pass_options(**is_set: bool) -> None:
    """With `eva_state_dict` no data pass runs: its options would be ignored."""
    names = [name for name, value in is_set.items() if value]
    if names:
        raise UnsupportedOptionError(
            f"initialize_lora_eva_weights got eva_state_dict and {names}, which only the data "
            "pass reads. Fix: pass either eva_state_dict or the data pass's options."
        )


@torch.no_grad()
def initialize_lora_eva_weights(
    model: PeftModel,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: Mapping[str, torch.Tensor] | None = None,
    forward_fn: ForwardFunction | None = forward_fn_dict,
    prepare_model_inputs_fn: ModelInputsFunction | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: LayerInputsFunction
    | Mapping[str, LayerInputsFunction]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> PeftModel:
    """Set an `init_lora_weights="eva"` adapter from data (or from `eva_state_dict`).

    Args:
        model: The `PeftModel` (changed in place), with one active adapter.
        dataloader: Batches for `get_eva_state_dict`; not needed with `eva_state_dict`.
        eva_state_dict: Components from `get_eva_state_dict` (names with or without the
            PeftModel's `base_model.model.` prefix).
        forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn,
            gather_distributed_inputs, show_progress_bar: as in `get_eva_state_dict`.
        adapter_name: The adapter to set.

    Returns:
        `model`, its adapter set and its config updated (`target_modules`, `rank_pattern`,
        `alpha_pattern`); A and B are new parameters where the rank changed (build the
        optimizer after this call).

    Raises:
        UnsupportedOptionError: not a lorakit PeftModel, no data, data-pass options beside
            `eva_state_dict`, or a state dict that does not fit; nothing is changed then.
        AdapterStateError: several active adapters, or the adapter is merged.
        ConfigError: the adapter was not made with init_lora_weights='eva'.
    """
    model = _check_model(model, adapter_name)
    if eva_state_dict is not None:
        _check_unused_pass_options(
            dataloader=dataloader is not None,
            forward_fn=forward_fn is not forward_fn_dict,
            prepare_model_inputs_fn=prepare_model_inputs_fn
            is not prepare_model_inputs_fn_language_modeling,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn
            is not prepare_layer_inputs_fn_language_modeling,
            gather_distributed_inputs=gather_distributed_inputs is not True,
            show_progress_bar=show_progress_bar is not True,
        )
    else:
        if dataloader is None:
            raise UnsupportedOptionError(
                "initialize_lora_eva_weights needs a dataloader, or an eva_state_dict from "
                "get_eva_state_dict. Fix: pass one of them."
            )
        eva_state_dict = get_eva_state_dict(
            model,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    plans = _plan(model, eva_state_dict, adapter_name)
    _load(model, plans, adapter_name)
    return model
