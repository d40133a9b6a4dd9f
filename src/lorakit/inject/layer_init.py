"""Surgery for the inits that read each layer: "pissa", "pissa_niter_N", "olora", "orthogonal",
"corda".

`PeftModel.add_adapter` calls `apply_layer_init_injection` instead of `apply_injection` when a
new adapter asks for one of them (and its weights are to be initialised). Every target is
checked before the model changes; then the adapter is added uninitialised and each layer is
set by `layers.init.initialise_from_layer` (PiSSA, OLoRA and CorDA also replace the base
weight by its residual, so the model's output is unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError, UnsupportedModuleError
from ..layers.base import LoraLayer
from ..layers.init import (
    BASE_CHANGING_INITS,
    CORDA_EIGENS_ATTRIBUTE,
    initialise_from_layer,
    layer_init_name,
)
from ..layers.linear import LoraLinear
from ..layers.routing import AdapterRouting
from .matching import InjectionPlan
from .surgery import apply_injection

DENSE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


def _is_linear_base(module: nn.Module) -> bool:
    """`torch.nn.Linear` (not a quantized subclass) or transformers' `Conv1D`."""
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def check_layer_init_targets(model: nn.Module, plan: InjectionPlan, config: LoraConfig) -> None:
    """Raise before any change if a target cannot take `config.init_lora_weights`.

    Raises:
        UnsupportedModuleError: a target is not a `torch.nn.Linear` or transformers
            `Conv1D` (PEFT implements these inits for linear layers only), or, for PiSSA and
            OLoRA, its weight is not a dense floating tensor (a 4-bit base).
        ConfigError: a target's rank is odd with "orthogonal", or, with "corda", its base
            holds no triplets of that rank from `preprocess_corda`.
    """
    option = config.init_lora_weights
    name = layer_init_name(option)
    assert name is not None, "callers pass a layer init"
    for target in plan.targets:
        module = model.get_submodule(target.key)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not _is_linear_base(base):
            raise UnsupportedModuleError(
                f"init_lora_weights={option!r} applies to torch.nn.Linear and transformers "
                f"Conv1D layers; {target.key!r} is a {type(base).__name__}. Fix: leave it out "
                "of target_modules, or use init_lora_weights=True for this adapter."
            )
        weight = base.weight
        if name in BASE_CHANGING_INITS and (
            not isinstance(weight, torch.Tensor) or weight.dtype not in DENSE_DTYPES
        ):
            dtype = getattr(weight, "dtype", None)
            raise UnsupportedModuleError(
                f"init_lora_weights={option!r} rewrites the base weight of {target.key!r}, "
                f"which is {dtype} here; lorakit does this on float16/bfloat16/float32/float64 "
                "weights only. Fix: initialise on the full-precision model, then quantize."
            )
        if name == "orthogonal" and target.r % 2:
            raise ConfigError(
                f"init_lora_weights='orthogonal' needs an even rank; {target.key!r} gets "
                f"r={target.r}. Fix: use an even r (and even rank_pattern values)."
            )
        if name == "corda":
            _check_corda_eigens(base, target.key, target.r)


def _check_corda_eigens(base: nn.Module, key: str, r: int) -> None:
    """The triplets `preprocess_corda` left on `base` fit its (out, in) weight and rank r."""
    eigens = getattr(base, CORDA_EIGENS_ATTRIBUTE, None)
    fix = (
        "Fix: run lorakit.preprocess_corda(model, config, run_model) with this config on "
        "this model right before get_peft_model."
    )
    if eigens is None:
        raise ConfigError(f"init_lora_weights='corda': {key!r} has no CorDA triplets. {fix}")
    weight = base.weight
    assert isinstance(weight, torch.Tensor), "a linear base (checked above)"
    shape = tuple(weight.shape)
    out_features, in_features = shape[::-1] if _is_conv1d(base) else shape
    expected = {"S_WC": (r,), "U_WC": (out_features, r), "V_WC": (in_features, r)}
    for field, shape in expected.items():
        tensor = getattr(eigens, field, None)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            found = None if tensor is None else tuple(getattr(tensor, "shape", ()))
            raise ConfigError(
                f"init_lora_weights='corda': {key!r} has {field} of shape {found}, expected "
                f"{shape} for r={r} (another rank or model, or a stale cache_file?). {fix}"
            )
        if not torch.isfinite(tensor).all():
            raise ConfigError(
                f"init_lora_weights='corda': {key!r} has non-finite values in {field}. {fix}"
            )


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def apply_layer_init_injection(
    model: nn.Module,
    plan: InjectionPlan,
    config: LoraConfig,
    adapter_name: str,
    routing: AdapterRouting,
    autocast_adapter_dtype: bool = True,
) -> None:
    """Check every target, add the adapter, then set it from each layer.

    Args:
        model: the user's model (changed in place).
        plan: the targets from `plan_injection`.
        config: the adapter's config; `init_lora_weights` is a `LAYER_INITS` option.
        adapter_name: name of the new adapter.
        routing: the model's routing object, shared by every LoRA layer.
        autocast_adapter_dtype: `LoraLayer.add_adapter`'s option.

    Raises:
        UnsupportedModuleError, ConfigError: from `check_layer_init_targets`, before the
            model changes.
    """
    check_layer_init_targets(model, plan, config)
    apply_injection(
        model,
        plan,
        config,
        adapter_name,
        routing,
        initialise_weights=False,
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    option = config.init_lora_weights
    assert isinstance(option, str)
    for target in plan.targets:
        layer = model.get_submodule(target.key)
        assert isinstance(layer, LoraLinear)
        initialise_from_layer(layer, adapter_name, option)
