"""What the data-driven inits read from a batch: the default input functions (PEFT's names and
signatures), batches moved to the model's device, and layer inputs gathered across processes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import LoraConfig
from ..errors import UnsupportedOptionError

# (model, batch) -> anything; runs the model on one batch.
ForwardFunction = Callable[[nn.Module, Any], Any]
# (batch, config) -> what each layer's input function receives as `model_input`.
ModelInputsFunction = Callable[[Any, LoraConfig], Any]
# (layer input, model_input, layer name) -> the rows (n, in) the layer's SVD uses.
LayerInputsFunction = Callable[[Any, Any, str], torch.Tensor]


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """Run `model(**inputs)`: the default for batches that are dicts of model arguments."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(
    model_input: Mapping[str, Any], peft_config: LoraConfig
) -> torch.Tensor:
    """The (batch, position) indices of the tokens EVA uses, (n, 2).

    A token is used where `attention_mask` is 1 (every token without one) and, with
    `eva_config.use_label_mask`, where `labels` (if the batch has them) differ from
    `eva_config.label_mask_value`.

    Raises:
        UnsupportedOptionError: the batch is not a mapping with `input_ids`.
    """
    if not isinstance(model_input, Mapping) or "input_ids" not in model_input:
        raise UnsupportedOptionError(
            "prepare_model_inputs_fn_language_modeling reads batches that are dicts with "
            f"'input_ids'; got a {type(model_input).__name__}. Fix: pass "
            "prepare_model_inputs_fn=None and prepare_layer_inputs_fn=None (every position), "
            "or functions of your own."
        )
    input_ids = model_input["input_ids"]
    mask = model_input.get("attention_mask", torch.ones_like(input_ids)).bool()
    eva_config = peft_config.eva_config
    if eva_config is not None and eva_config.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva_config.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: torch.Tensor, layer_name: str
) -> torch.Tensor:
    """The layer's input rows at the token indices of `prepare_model_inputs_fn_language_modeling`:
    (n, in) from a (batch, length, in) input."""
    x = first_tensor(layer_input, layer_name)
    return x[model_input.T.unbind()]


def prepare_layer_inputs_default(
    layer_input: Any, model_input: Any, layer_name: str
) -> torch.Tensor:
    """Every row of the layer's input: (-1, in)."""
    x = first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    """The layer's input tensor (a forward hook receives the positional arguments)."""
    if isinstance(layer_input, (tuple, list)) and layer_input:
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise UnsupportedOptionError(
            f"The input of {layer_name!r} is a {type(layer_input).__name__}, not a tensor. "
            "Fix: pass a prepare_layer_inputs_fn that returns its (n, in) rows."
        )
    return layer_input


def model_inputs_for_layers(
    batch: Any, function: ModelInputsFunction | None, config: LoraConfig
) -> Any:
    """What each layer's input function gets: `function(batch, config)`, or a copy of the
    batch without one."""
    return function(batch, config) if function is not None else copy.deepcopy(batch)


def model_device(model: nn.Module) -> torch.device | None:
    """The one device of the model's non-meta parameters (None if none or several)."""
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def to_device(batch: Any, device: torch.device | None) -> Any:
    """The batch with its tensors on `device` (dicts, lists and tuples followed)."""
    if device is None:
        return batch
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {key: to_device(value, device) for key, value in batch.items()}
        return type(batch)(moved)  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def gathered_rows(rows: torch.Tensor, gather: bool) -> torch.Tensor:
    """The rows of every process, concatenated in rank order, when `gather` and
    `torch.distributed` is initialised (processes may hold different numbers of rows)."""
    if not (gather and dist.is_available() and dist.is_initialized()):
        return rows
    world_size = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(size.item()) for size in counts]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
