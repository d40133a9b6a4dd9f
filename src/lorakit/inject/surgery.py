"""Replacing modules with LoRA wrappers and putting the originals back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import LoraConfig
from ..layers.base import LoraLayer
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.routing import AdapterRouting
from ..layers.trainable_tokens import TrainableTokensWrapper
from .matching import InjectionPlan

Wrapper = LoraLayer | ModulesToSaveWrapper | TrainableTokensWrapper


def _parent_and_name(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_key, _, name = key.rpartition(".")
    return (model.get_submodule(parent_key) if parent_key else model), name


def replace_module(model: nn.Module, key: str, new_module: nn.Module) -> None:
    parent, name = _parent_and_name(model, key)
    setattr(parent, name, new_module)


def apply_injection(
    model: nn.Module,
    plan: InjectionPlan,
    config: LoraConfig,
    adapter_name: str,
    routing: AdapterRouting,
    initialise_weights: bool = True,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> None:
    """Wrap (or extend) every planned module with the adapter `adapter_name`.

    The last two options are `LoraLayer.add_adapter`'s (adapter dtype, meta tensors).
    """
    with _single_threaded():
        _add_to_targets(
            model,
            plan,
            config,
            adapter_name,
            routing,
            initialise_weights,
            autocast_adapter_dtype,
            low_cpu_mem_usage,
        )
    for key in plan.modules_to_save:
        module = model.get_submodule(key)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module, routing)
            replace_module(model, key, module)
        module.add_adapter(adapter_name)


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run the creation and init of adapter tensors on one thread.

    Each adapter tensor is small (r × features), yet above 32k elements torch splits a fill
    across its thread pool, and waking the pool once per tensor costs far more than the
    work: on a busy 2-core machine, ~15 ms per lora_B against ~5 µs on one thread. An init
    that does heavy work on the base weight (an SVD, say) belongs outside this block.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _add_to_targets(
    model: nn.Module,
    plan: InjectionPlan,
    config: LoraConfig,
    adapter_name: str,
    routing: AdapterRouting,
    initialise_weights: bool,
    autocast_adapter_dtype: bool,
    low_cpu_mem_usage: bool,
) -> None:
    for target in plan.targets:
        module = model.get_submodule(target.key)
        if isinstance(module, LoraLayer):
            layer = module
        else:
            assert target.entry is not None
            layer = target.entry.wrap(module, routing)
            replace_module(model, target.key, layer)
        layer.add_adapter(
            adapter_name,
            r=target.r,
            lora_alpha=target.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            lora_bias=config.lora_bias,
            initialise_weights=initialise_weights,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            use_dora=config.use_dora,
        )


def iter_wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """Yield every lorakit wrapper in the model with its path."""
    for key, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
            yield key, module


def unwrap_model(model: nn.Module, keep_trained_heads: bool) -> nn.Module:
    """Put each wrapped module back in place of its wrapper.

    Args:
        model: The model holding wrappers (changed in place).
        keep_trained_heads: Put the active adapter's copy of each `modules_to_save` module in
            place (merge_and_unload) instead of the original module (unload).
    """
    for key, wrapper in reversed(list(iter_wrappers(model))):  # nested: innermost first
        if keep_trained_heads and isinstance(wrapper, ModulesToSaveWrapper):
            replace_module(model, key, wrapper.active_module())
        else:
            replace_module(model, key, wrapped_module(wrapper))
    return model


def wrapped_module(wrapper: Wrapper) -> nn.Module:
    """The base model's own module inside a wrapper."""
    if isinstance(wrapper, LoraLayer):
        return wrapper.base_layer
    return wrapper.original_module
