"""Deciding which modules an adapter covers: names, regexes, "all-linear", layers, patterns.

Everything here only reads the model, so a bad config fails before anything is changed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from ..config import LoraConfig, TaskType
from ..constants import ALL_LINEAR, DEFAULT_TARGET_MODULES, TASK_HEAD_MODULES
from ..errors import ConfigError, TargetModuleError, UnsupportedModuleError, closest_names
from ..layers.base import LoraLayer
from ..layers.bnb import is_bnb_linear4bit
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.registry import (
    LayerEntry,
    is_transformers_conv1d,
    lora_layer_class_for,
    supported_type_names,
)
from ..layers.trainable_tokens import TrainableTokensWrapper

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One module to adapt, with its resolved rank and alpha."""

    key: str
    entry: LayerEntry | None  # None when the module is already a LoRA layer
    r: int
    lora_alpha: float


@dataclass(frozen=True)
class InjectionPlan:
    targets: tuple[Target, ...]
    modules_to_save: tuple[str, ...]


def iter_base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield (dotted path, module) like `named_modules`, without entering lorakit wrappers."""
    for name, child in model.named_children():
        key = f"{prefix}{name}"
        yield key, child
        if not isinstance(child, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
            yield from iter_base_modules(child, key + ".")


def dotted_suffixes(key: str) -> Iterator[str]:
    """`a.b.c`, `b.c`, `c`: the names a list entry may give for the module at path `key`."""
    parts = key.split(".")
    for start in range(len(parts)):
        yield ".".join(parts[start:])


def name_matcher(names: list[str] | str) -> Callable[[str], bool]:
    """A test of module paths: a regex string must match the whole path; a list entry must
    equal its last dotted parts. Built once per spec, so matching a path costs its depth, not
    the length of the list (an "all-linear" list names every linear layer)."""
    if isinstance(names, str):
        pattern = re.compile(names)
        return lambda key: pattern.fullmatch(key) is not None
    wanted = frozenset(names)
    return lambda key: any(suffix in wanted for suffix in dotted_suffixes(key))


def name_matches(key: str, names: list[str] | str) -> bool:
    """Whether the module at path `key` is named by `names` (see `name_matcher`)."""
    return name_matcher(names)(key)


def layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    """Index of the numbered layer a module sits in (e.g. 3 in `model.layers.3.mlp.up_proj`)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:  # the first numbered part of the path
        found = re.search(r"(?:^|\.)[^.]+\.(\d+)\.", key)
        return int(found.group(1)) if found else None
    for pattern in patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)\.", key)
        if found:
            return int(found.group(1))
    return None


def pattern_value(patterns: Mapping[str, float], key: str, default: float) -> float:
    """First value in `patterns` whose key (a name or regex) matches the end of `key`."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", key):
            return value
    return default


def plan_injection(model: nn.Module, config: LoraConfig) -> InjectionPlan:
    """Resolve `config` against `model` into the exact modules to wrap; raises on bad input."""
    modules = dict(iter_base_modules(model))
    target_spec = resolve_target_modules(model, config, modules)
    _check_every_name_exists(target_spec, modules, config.target_modules is None)
    layers = config.layers_to_transform
    wanted_layers = {layers} if isinstance(layers, int) else set(layers or ())
    modules_to_save = saved_module_keys(modules, config.modules_to_save or [])
    is_target = name_matcher(target_spec)
    excludes = config.exclude_modules
    is_excluded = name_matcher(excludes) if excludes is not None else None
    targets = []
    for key, module in modules.items():
        if not is_target(key) or _is_within(key, modules_to_save):
            continue
        if is_excluded is not None and is_excluded(key):
            continue
        if wanted_layers and layer_index(key, config.layers_pattern) not in wanted_layers:
            continue
        entry = None if isinstance(module, LoraLayer) else lora_layer_class_for(module)
        if entry is None and not isinstance(module, LoraLayer):
            raise UnsupportedModuleError(
                f"Target module {key!r} is a {type(module).__name__}, which LoRA cannot wrap. "
                f"Supported types: {supported_type_names()}. Name its linear/conv/embedding "
                "children in target_modules instead."
            )
        if config.lora_bias and not _takes_lora_bias(module):
            raise ConfigError(
                f"lora_bias=True targets {key!r}, a {type(module).__name__}: PEFT gives lora_B "
                "a bias on linear and conv layers only (not embeddings). Fix: leave it out of "
                "target_modules (exclude_modules), or set lora_bias=False."
            )
        r = int(pattern_value(config.rank_pattern, key, config.r))
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        targets.append(Target(key, entry, r, alpha))
    if not targets and not config.target_parameters:  # parameters may be the only targets
        raise TargetModuleError(
            f"The config matches no module: target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}, layers_to_transform={layers!r}, "
            f"layers_pattern={config.layers_pattern!r}. Loosen them; module paths look like "
            f"{list(modules)[:6]}."
        )
    return InjectionPlan(tuple(targets), modules_to_save)


def _takes_lora_bias(module: nn.Module) -> bool:
    """Whether LoRA on `module` can give lora_B a bias (`lora_bias`): not on embeddings."""
    if isinstance(module, LoraLayer):
        return module.supports_lora_bias
    return not isinstance(module, nn.Embedding)


def saved_module_keys(modules: Iterable[str], names: list[str]) -> tuple[str, ...]:
    """Paths of the modules trained whole and saved with the adapter (`modules_to_save`).

    PEFT's rule: a path that ends with a name, as a plain string, so "classifier" also picks
    DistilBERT's `pre_classifier` (a head the pretrained checkpoint lacks, which must train).
    A module inside one already picked is left to its parent's copy.
    """
    keys: list[str] = []
    for key in modules:
        if any(key.endswith(name) for name in names) and not _is_within(key, tuple(keys)):
            keys.append(key)
    return tuple(keys)


def corrected_fan_in_fan_out(model: nn.Module, plan: InjectionPlan, fan_in_fan_out: bool) -> bool:
    """`fan_in_fan_out` as PEFT leaves it once the planned layers are wrapped.

    The layer type decides the weight layout (Conv1D stores (in, out), nn.Linear (out, in)),
    so the option cannot change the numbers; as PEFT does, a value that contradicts a newly
    wrapped layer is corrected with a warning, and the corrected value is what gets saved.
    """
    value = fan_in_fan_out
    for target in plan.targets:
        if target.entry is None:  # already wrapped: PEFT leaves the option alone
            continue
        module = model.get_submodule(target.key)
        if is_transformers_conv1d(module):
            implied, kind = True, "Conv1D"
        elif isinstance(module, nn.Linear) and not is_bnb_linear4bit(module):
            implied, kind = False, "torch.nn.Linear"
        else:
            continue
        if implied != value:
            logger.warning(
                "fan_in_fan_out is set to %s but the target module %r is `%s`. Setting "
                "fan_in_fan_out to %s.",
                value,
                target.key,
                kind,
                implied,
            )
            value = implied
    return value


def _is_within(key: str, parents: tuple[str, ...]) -> bool:
    return any(key == parent or key.startswith(parent + ".") for parent in parents)


def resolve_target_modules(
    model: nn.Module, config: LoraConfig, modules: Mapping[str, nn.Module]
) -> list[str] | str:
    """Turn `target_modules` (None, "all-linear", a regex or names) into a regex or names."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES and config.target_parameters:
            return []  # as PEFT: the parameters alone, for a model type without defaults
        if model_type not in DEFAULT_TARGET_MODULES:
            raise TargetModuleError(
                f"No default target_modules for model_type={model_type!r}; set target_modules, "
                "e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'."
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    if spec == ALL_LINEAR:
        return _all_linear_keys(model, config, modules)
    return spec


def _all_linear_keys(
    model: nn.Module, config: LoraConfig, modules: Mapping[str, nn.Module]
) -> list[str]:
    """Every linear layer but the output head (and but classification heads that train whole)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output_head = get_output() if callable(get_output) else None
    heads = list(config.modules_to_save or ())
    if config.task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS):
        heads += TASK_HEAD_MODULES[str(TaskType(config.task_type).value)]
    is_head = name_matcher(heads)
    keys = []
    for key, module in modules.items():
        if module is output_head or is_head(key):
            continue
        if isinstance(module, LoraLayer):
            module = module.base_layer
        entry = lora_layer_class_for(module)
        if entry is not None and entry.is_linear:
            keys.append(key)
    return keys


def _all_suffixes(keys: Iterable[str]) -> set[str]:
    return {suffix for key in keys for suffix in dotted_suffixes(key)}


def _check_every_name_exists(
    spec: list[str] | str, modules: Mapping[str, nn.Module], is_default: bool
) -> None:
    if isinstance(spec, str):
        if not any(re.fullmatch(spec, key) for key in modules):
            raise TargetModuleError(
                f"target_modules regex {spec!r} matches no module path (it must match the whole "
                f"path). Paths look like {list(modules)[:6]}."
            )
        return
    if is_default:
        return
    named = _all_suffixes(modules)
    for name in spec:
        if name not in named:
            short_names = {key.rsplit(".", 1)[-1] for key in modules}
            hint = closest_names(name, short_names)
            raise TargetModuleError(
                f"Target module {name!r} is not in the base model. Closest module names: "
                f"{hint}. Fix target_modules (names match the end of a module path)."
            )
