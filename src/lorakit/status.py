"""`get_layer_status` / `get_model_status`: what each adapter layer holds and does, as PEFT reports.

The fields and their meanings are PEFT's (`TunerLayerStatus`, `TunerModelStatus`), so tools
that read peft's status read lorakit's. A model-wide field that differs between layers is
reported as `"irregular"`: the model is then in a state that may not do what was meant.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

import torch
from torch import nn

from .config import PEFT_TYPE
from .errors import AdapterStateError
from .inject import iter_wrappers
from .inject.surgery import Wrapper
from .layers.base import LoraLayer
from .layers.bnb import LoraBnbLinear4bit
from .layers.modules_to_save import ModulesToSaveWrapper
from .layers.packed import LoraPackedLinear
from .layers.trainable_tokens import TrainableTokensWrapper

IRREGULAR: Final = "irregular"
Irregular = Literal["irregular"]
BNB_4BIT_BACKEND = "bnb 4bit"
LORAKIT_4BIT_BACKEND = "lorakit 4bit"
NO_ADAPTER_MODEL = "None"
NOT_TRANSFORMERS = "other"
T = TypeVar("T")


@dataclass
class TunerLayerStatus:
    """One adapter layer.

    Attributes:
        name: Its path, from the `LoraModel` for a `PeftModel` (`model.<path>`), else from
            the model given.
        module_type: PEFT's name of the layer type (`lora.Linear`, `lora.Embedding`,
            `lora.Conv2d`, `ModulesToSaveWrapper`, ...).
        enabled: Whether adapters act (False inside `disable_adapter()` or after
            `disable_adapter_layers()`).
        active_adapters: The active adapters (for a `ModulesToSaveWrapper`, those it holds).
        merged_adapters: Adapters merged into the base weight.
        requires_grad: Per adapter: True, False, or "irregular" when its tensors disagree.
        available_adapters: The adapters the layer holds, sorted.
        devices: Per adapter, the device types of its tensors, sorted.
        quantization_backend: "bnb 4bit" (bitsandbytes), "lorakit 4bit", or None.
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The whole model: the layers' fields combined, plus counts.

    Attributes:
        base_model_type: Class name of the user's model; "other" for a model given directly
            that is not a transformers model.
        adapter_model_type: "LoraModel" for a `PeftModel`, "None" for a model given directly.
        peft_types: Adapter name -> "LORA" (empty for a model given directly).
        trainable_params: Parameters that require grad.
        total_params: All parameters.
        num_adapter_layers: Number of adapter layers (`ModulesToSaveWrapper`s included).
        enabled, active_adapters, quantization_backend: The layers' common value, or
            "irregular".
        merged_adapters: Adapters merged in some layer, sorted; "irregular" if a layer holds
            one of them unmerged.
        requires_grad: Per adapter, the layers' common value, or "irregular".
        available_adapters: Every adapter of any layer, sorted.
        devices: Per adapter, the device types over all layers, sorted.
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer of a `PeftModel` or of a model with injected adapters.

    Args:
        model: A `PeftModel` (names start with `model.`), or a model that
            `inject_adapter_in_model` changed (names are its own paths).

    Returns:
        One `TunerLayerStatus` per LoRA layer and `ModulesToSaveWrapper`, in module order.

    Raises:
        AdapterStateError: The model holds no lorakit adapter layer.
    """
    root = _adapter_root(model)
    statuses = [_layer_status(name, module) for name, module in iter_wrappers(root)]
    if not statuses:
        raise AdapterStateError(
            f"{type(model).__name__} holds no lorakit adapter layer, so it has no status. Fix: "
            "pass a PeftModel (get_peft_model) or a model changed by inject_adapter_in_model."
        )
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of a model's adapters as a whole (see `TunerModelStatus`).

    Raises:
        AdapterStateError: The model holds no lorakit adapter layer.
    """
    from .model import PeftModel  # status is read by model.py's PeftModel methods too

    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_type = type(model.get_base_model()).__name__
        adapter_type = type(model.base_model).__name__
        peft_types = {name: PEFT_TYPE for name in model.peft_config}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        base_type = type(model).__name__ if _is_transformers_model(model) else NOT_TRANSFORMERS
        adapter_type, peft_types = NO_ADAPTER_MODEL, {}
        trainable, total = parameter_counts(model.parameters())
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_common(status.enabled for status in layers),
        active_adapters=_common_list(status.active_adapters for status in layers),
        merged_adapters=_merged_everywhere(layers),
        requires_grad=_combined_requires_grad(layers),
        available_adapters=sorted(
            {name for status in layers for name in status.available_adapters}
        ),
        devices=_combined_devices(layers),
        quantization_backend=_common(status.quantization_backend for status in layers),
    )


def _adapter_root(model: nn.Module) -> nn.Module:
    from .model import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


def _layer_status(name: str, module: Wrapper) -> TunerLayerStatus:
    routing = module.routing
    held = module.adapter_names
    tensors = {adapter_name: list(_adapter_tensors(module, adapter_name)) for adapter_name in held}
    if isinstance(module, TrainableTokensWrapper):  # PEFT lists its inner layer
        name = f"{name}.token_adapter"
        active = [adapter_name for adapter_name in routing.active_adapters if adapter_name in held]
        merged = list(module.token_adapter.merged_adapters)
    elif isinstance(module, LoraLayer):
        active = list(routing.active_adapters)
        merged = list(module.merged_adapters)
    else:  # a head copy acts only for the active adapters that have one; it never merges
        active = [adapter_name for adapter_name in routing.active_adapters if adapter_name in held]
        merged = []
    return TunerLayerStatus(
        name=name,
        module_type=_module_type(module),
        enabled=not routing.is_disabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={
            key: _all_or_irregular(t.requires_grad for t in tensors[key]) for key in held
        },
        available_adapters=sorted(held),
        devices={key: sorted({t.device.type for t in tensors[key]}) for key in held},
        quantization_backend=_quantization_backend(module),
    )


def _adapter_tensors(module: Wrapper, adapter_name: str) -> Iterator[torch.Tensor]:
    if isinstance(module, TrainableTokensWrapper):
        yield module.token_adapter.tables[adapter_name]
    elif isinstance(module, LoraLayer):
        yield from module._adapter_pair(adapter_name)
    else:
        yield from module.modules_to_save[adapter_name].parameters()


def _module_type(module: Wrapper) -> str:
    """PEFT's name for the layer: `lora.<base type>`, with transformers' Conv1D as `Linear`."""
    if isinstance(module, TrainableTokensWrapper):
        return "TrainableTokensLayer"
    if isinstance(module, ModulesToSaveWrapper):
        return type(module).__name__
    base_type = type(module.base_layer).__name__
    return f"lora.{'Linear' if base_type == 'Conv1D' else base_type}"


def _quantization_backend(module: Wrapper) -> str | None:
    if isinstance(module, LoraBnbLinear4bit):
        return BNB_4BIT_BACKEND
    if isinstance(module, LoraPackedLinear):
        return LORAKIT_4BIT_BACKEND
    return None


def _all_or_irregular(values: Iterable[bool]) -> bool | Irregular:
    """True if every value is True (or there are none), False if none is, else "irregular"."""
    flags = list(values)
    if all(flags):
        return True
    return IRREGULAR if any(flags) else False


def _common(values: Iterable[T]) -> T | Irregular:
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else IRREGULAR


def _common_list(values: Iterable[list[str]]) -> list[str] | Irregular:
    distinct = {tuple(value) for value in values}
    if len(distinct) > 1:
        return IRREGULAR
    return list(distinct.pop()) if distinct else []


def _merged_everywhere(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """Adapters merged in some layer; "irregular" if any layer holds one of them unmerged."""
    merged = {name for status in layers for name in status.merged_adapters}
    for status in layers:
        if merged & (set(status.available_adapters) - set(status.merged_adapters)):
            return IRREGULAR
    return sorted(merged)


def _combined_requires_grad(layers: list[TunerLayerStatus]) -> dict[str, bool | Irregular]:
    values: dict[str, list[bool | Irregular]] = defaultdict(list)
    for status in layers:
        for name, value in status.requires_grad.items():
            values[name].append(value)
    combined: dict[str, bool | Irregular] = {}
    for name, per_layer in values.items():
        if all(value is True for value in per_layer):
            combined[name] = True
        elif all(value is False for value in per_layer):
            combined[name] = False
        else:
            combined[name] = IRREGULAR
    return combined


def _combined_devices(layers: list[TunerLayerStatus]) -> dict[str, list[str]]:
    devices: dict[str, set[str]] = defaultdict(set)
    for status in layers:
        for name, types in status.devices.items():
            devices[name].update(types)
    return {name: sorted(types) for name, types in devices.items()}


def parameter_counts(parameters: Iterable[nn.Parameter]) -> tuple[int, int]:
    """(trainable, total) numbers of elements over `parameters`."""
    trainable = total = 0
    for parameter in parameters:
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


def _is_transformers_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (never imports transformers)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )
