"""Replacing an adapter's weights in place with those of another file of the same shapes.

Why: a compiled model guards on which adapter is active and on every Python number the LoRA
path reads, such as a layer's scale. Loading a second adapter and switching to it compiles a
new graph; hotswapping does not. The file's tensors are copied into the adapter's existing
parameters (same objects, shapes, dtypes and devices), and each layer's scale s_old stays as
it is: where the file's config gives another scale s_new (another `lora_alpha`, rsLoRA or an
`alpha_pattern`), B is stored as B · s_new / s_old, rounded once from float64, so the layer
computes s_old · B' A = s_new · B A as a fresh load would, to one rounding of B.

A file of a lower rank than the adapter's is padded with zeros (rows of A, columns of B),
which adds nothing to B A: so after `prepare_model_for_compiled_hotswap(model,
target_rank=...)` has padded the loaded adapter to the highest rank to come, adapters of any
rank up to it swap in without recompiling.

The adapter keeps its config (`peft_config[adapter_name]`, dropout, trainability); its
weights and config together describe the new adapter, so `save_pretrained` writes an
equivalent file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import HotswapError
from ..inject import iter_wrappers
from ..inject.matching import pattern_value
from ..io import find_mismatches, load_adapter_files
from ..io.keys import ADAPTER_CONTAINERS, display_name
from ..layers.base import LoraLayer
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..model import PeftModel
from ..ops.lora import lora_scale

PathLike = str | os.PathLike[str]
MAX_LISTED = 5


@dataclass
class _Problems:
    """Everything that keeps a file from replacing an adapter in place, found before writing."""

    ranks: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    file_only: list[str] = field(default_factory=list)
    model_only: list[str] = field(default_factory=list)
    base_tensors: list[str] = field(default_factory=list)
    scales: list[str] = field(default_factory=list)

    def lines(self, adapter_name: str) -> list[str]:
        sections = (
            (self.ranks, "ranks differ (here vs in the file)"),
            (self.shapes, "tensor shapes differ"),
            (self.file_only, "modules adapted in the file but not by this adapter"),
            (self.model_only, f"modules adapted by {adapter_name!r} with no weights in the file"),
            (self.base_tensors, "base-model tensors in the file (hotswap replaces adapters only)"),
            (self.scales, "scales that cannot be folded into lora_B"),
        )
        return [f"- {len(items)} {title}: {_listing(items)}" for items, title in sections if items]


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: PathLike,
    adapter_name: str,
    *,
    torch_device: str | torch.device | None = None,
) -> None:
    """Replace the weights of an existing adapter with a saved adapter's, in place.

    The file must adapt the same modules with ranks no higher than the adapter's (lower
    ranks are padded with zeros). Everything is checked before
    any tensor is written, so on an error the model is unchanged. Under `torch.compile` the
    compiled graphs stay valid: no recompilation follows (see the module docstring for how a
    different `lora_alpha` is handled).

    Args:
        model: A `PeftModel`, or `torch.compile` of one.
        model_name_or_path: The adapter folder (`adapter_config.json` and weights).
        adapter_name: The existing adapter to overwrite; it may be active or not.
        torch_device: Where the file is read (default CPU); each tensor then goes to the
            device of the parameter it replaces.

    Raises:
        TypeError: `model` is not a `PeftModel`.
        AdapterNameError: `adapter_name` does not exist.
        HotswapError: The file adapts other modules, with higher ranks, holds base-model
            tensors, or the adapter is merged or not yet loaded; use `load_adapter` instead
            (or `prepare_model_for_compiled_hotswap` for higher ranks).
        AdapterFileError: The folder or its files are missing or unreadable.
    """
    peft_model = _unwrap_compiled(model)
    peft_model._check_exist([adapter_name])
    _check_state(peft_model, adapter_name)
    device = "cpu" if torch_device is None else torch_device
    tensors, config_dict = load_adapter_files(model_name_or_path, device=device)
    config = LoraConfig.from_dict(config_dict)
    state = peft_model.state_dict(keep_vars=True)
    problems = _Problems()
    ratios, file_ranks = _scale_ratios(peft_model, adapter_name, config, problems)
    tensors = _padded(tensors, file_ranks)
    mapped = _plan(peft_model, adapter_name, tensors, state, problems)
    if problems.lines(adapter_name):
        raise HotswapError(_message(problems, adapter_name, model_name_or_path))
    values = _prepared_values(mapped, state, ratios)
    with torch.no_grad():
        for key, value in values.items():
            state[key].copy_(value)


def _unwrap_compiled(model: nn.Module) -> PeftModel:
    """The `PeftModel` itself, also when given the module `torch.compile` returned."""
    original = getattr(model, "_orig_mod", model)
    if not isinstance(original, PeftModel):
        raise TypeError(
            f"hotswap_adapter needs a lorakit PeftModel (or torch.compile of one), got "
            f"{type(model).__name__}. Fix: wrap the model with lorakit.get_peft_model or "
            "PeftModel.from_pretrained first."
        )
    return original


def _check_state(model: PeftModel, adapter_name: str) -> None:
    """Refuse a merged adapter (its delta sits in the base) or one still on the meta device."""
    for key, layer in model._lora_layers():
        if adapter_name in layer.merged_adapters:
            raise HotswapError(
                f"Adapter {adapter_name!r} is merged into {key!r}; replacing its weights "
                "would leave the old delta in the base weights. Fix: call "
                "model.unmerge_adapter() before hotswap_adapter."
            )
        if adapter_name in layer.r and any(t.is_meta for t in layer._adapter_pair(adapter_name)):
            raise HotswapError(
                f"Adapter {adapter_name!r} in {key!r} has no weights yet (meta tensors from "
                "low_cpu_mem_usage=True). Fix: load it with model.load_adapter instead."
            )


def _plan(
    model: PeftModel,
    adapter_name: str,
    tensors: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    problems: _Problems,
) -> dict[str, torch.Tensor]:
    """model key -> file tensor (ranks already padded); fills `problems`, writes nothing."""
    mapped, mismatch = find_mismatches(tensors, adapter_name, state)
    problems.file_only += _modules(mismatch.unexpected)
    problems.model_only += _modules(mismatch.missing)
    ranked = {line.partition(":")[0] for line in problems.ranks}
    problems.shapes += [s.describe() for s in mismatch.shapes if _module(s.name) not in ranked]
    # Layers the file does not adapt are reported as such, not by the config's rank or scale.
    unadapted = set(problems.model_only)
    problems.ranks = [line for line in problems.ranks if _head(line) not in unadapted]
    problems.scales = [line for line in problems.scales if _head(line) not in unadapted]
    own = _adapter_tensor_ids(model, adapter_name)
    problems.base_tensors += [key for key in mapped if id(state[key]) not in own]
    return mapped


def _scale_ratios(
    model: PeftModel, adapter_name: str, config: LoraConfig, problems: _Problems
) -> tuple[dict[int, float], dict[str, tuple[int, int]]]:
    """(s_new / s_old per layer keyed by id of the layer's B, module -> (file rank, rank
    here) where the file's is lower); records rank and scale problems."""
    ratios: dict[int, float] = {}
    lower_ranks: dict[str, tuple[int, int]] = {}
    for key, layer in iter_wrappers(model.get_base_model()):
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        r = int(pattern_value(config.rank_pattern, key, config.r))
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        if r > layer.r[adapter_name]:
            problems.ranks.append(f"{key}: {layer.r[adapter_name]} vs {r}")
            continue
        if r < layer.r[adapter_name]:
            lower_ranks[key] = (r, layer.r[adapter_name])
        old, new = layer.scaling[adapter_name], lora_scale(alpha, r, config.use_rslora)
        if old == 0 and new != 0:
            problems.scales.append(f"{key}: scale 0 here (lora_alpha=0), {new:g} in the file")
            continue
        ratios[id(layer._adapter_pair(adapter_name)[1])] = 1.0 if old == new else new / old
    return ratios, lower_ranks


def _padded(
    tensors: Mapping[str, torch.Tensor], lower_ranks: Mapping[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """The file's tensors, those of a lower rank padded with zeros to the rank here.

    A (r, ...) gets zero rows and B (out, r, ...) zero columns; a tensor whose rank axis is
    not the file's rank is left for the shape check to report.
    """
    padded = dict(tensors)
    for file_key, tensor in tensors.items():
        name = display_name(file_key)
        module, _, container = name.rpartition(".")
        if module not in lower_ranks or container not in ADAPTER_CONTAINERS:
            continue
        file_rank, rank = lower_ranks[module]
        dim = 0 if container.endswith("A") else 1
        if tensor.dim() < 2 or tensor.shape[dim] != file_rank:
            continue
        shape = list(tensor.shape)
        shape[dim] = rank
        value = tensor.new_zeros(shape)
        value.narrow(dim, 0, file_rank).copy_(tensor)
        padded[file_key] = value
    return padded


def _adapter_tensor_ids(model: PeftModel, adapter_name: str) -> set[int]:
    """ids of the adapter's own tensors: LoRA A/B and its copies of `modules_to_save`."""
    ids: set[int] = set()
    for _, wrapper in model._wrappers():
        if adapter_name not in wrapper.adapter_names:
            continue
        if isinstance(wrapper, LoraLayer):
            ids.update(id(tensor) for tensor in wrapper._adapter_pair(adapter_name))
        elif isinstance(wrapper, ModulesToSaveWrapper):
            replica = wrapper.modules_to_save[adapter_name]
            ids.update(id(tensor) for tensor in replica.state_dict(keep_vars=True).values())
    return ids


def _prepared_values(
    mapped: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    ratios: Mapping[int, float],
) -> dict[str, torch.Tensor]:
    """Each file tensor in its target's dtype and device, B rescaled: copying cannot fail."""
    values = {}
    for key, tensor in mapped.items():
        target = state[key]
        ratio = ratios.get(id(target), 1.0)
        value = tensor if ratio == 1.0 else tensor.to(torch.float64) * ratio
        values[key] = value.to(device=target.device, dtype=target.dtype)
    return values


def _head(line: str) -> str:
    """The module path a problem line starts with (`path: details`)."""
    return line.partition(":")[0]


def _module(name: str) -> str:
    """`a.b.q_proj` for `a.b.q_proj.lora_A` (a display name of an adapter tensor)."""
    head, _, last = name.rpartition(".")
    return head if last in ADAPTER_CONTAINERS else name


def _modules(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(_module(name) for name in names))


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED])
    rest = len(items) - MAX_LISTED
    return f"{shown}; and {rest} more" if rest > 0 else shown


def _message(problems: _Problems, adapter_name: str, source: PathLike) -> str:
    lines = [
        f"Cannot hotswap {source} into adapter {adapter_name!r}: hotswapping overwrites the "
        "adapter's tensors in place, so the file must adapt the same modules with the same "
        "ranks or lower. Nothing was changed. Found:",
        *problems.lines(adapter_name),
        f"Fix: load it as a new adapter with model.load_adapter({str(source)!r}, "
        "adapter_name='<new name>') and model.set_adapter('<new name>') (under torch.compile "
        "this compiles one more graph); for higher ranks, call "
        "lorakit.prepare_model_for_compiled_hotswap(model, target_rank=<highest rank>) "
        "before compiling.",
    ]
    return "\n".join(lines)
