"""`target_parameters`: finding the parameters an adapter adapts, and wrapping them.

A name in `target_parameters` matches a parameter whose path (module path, as in the user's
model, then the parameter's name) equals it or ends with "." + it, as in PEFT. As in PEFT,
the other selectors (`layers_to_transform`, `layers_pattern`, `exclude_modules`) apply to
`target_modules` only, and every adapter of a model that uses `target_parameters` must name
the same ones: which parameter a wrapper adapts is fixed by its place in the nesting, and so
are the state-dict keys.

`plan_parameter_injection` only reads the model (a bad config fails before any change);
`apply_parameter_injection` wraps.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError, TargetModuleError, closest_names
from ..layers.base import LoraLayer
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..layers.parameter import LoraParameter
from ..layers.routing import AdapterRouting
from .legacy_moe import check_no_converted_moe_targets
from .matching import InjectionPlan, pattern_value
from .surgery import replace_module

# The init_lora_weights values that need nothing but A's and B's shapes (PEFT's others read
# a layer's weight matrix or its inputs, which a stack of experts is not).
PARAMETER_INITS: tuple[object, ...] = (True, False, "gaussian")


@dataclass(frozen=True)
class ParameterTarget:
    """One parameter to adapt, with its resolved rank and alpha.

    Attributes:
        module_key: Path of the module holding it, in the user's model (no `base_layer`).
        parameter_name: Its name in that module.
        r: Rank per expert.
        lora_alpha: Numerator of the scale.
    """

    module_key: str
    parameter_name: str
    r: int
    lora_alpha: float

    @property
    def key(self) -> str:
        return f"{self.module_key}.{self.parameter_name}"


def plan_parameter_injection(
    model: nn.Module,
    config: LoraConfig,
    plan: InjectionPlan,
    other_configs: Mapping[str, LoraConfig],
) -> tuple[ParameterTarget, ...]:
    """The parameters `config.target_parameters` names, in wrapping order; reads only.

    Args:
        model: The user's model (possibly holding lorakit wrappers already).
        config: The new adapter's config (with `fan_in_fan_out` already corrected).
        plan: The modules this adapter wraps through `target_modules`.
        other_configs: The model's other adapters' configs.

    Raises:
        ConfigError: An option PEFT refuses with `target_parameters`, another adapter
            names other parameters, or `target_modules` is one PEFT rewrites into
            `target_parameters` for this model (`inject.legacy_moe`).
        TargetModuleError: A name matches no parameter, or a matched parameter's module is
            also a LoRA layer target, the model itself or inside `modules_to_save`.
    """
    check_no_converted_moe_targets(model, config)
    module_target_keys = {target.key for target in plan.targets}
    for key in module_target_keys:
        if isinstance(model.get_submodule(key), LoraParameter):
            raise TargetModuleError(
                f"target_modules matches {key!r}, whose parameters are adapted through "
                "target_parameters. Fix: leave it out of target_modules."
            )
    names = list(config.target_parameters or [])
    if not names:
        return ()
    _check_options(config)
    _check_same_names(names, other_configs)
    saved = tuple(config.modules_to_save or ())
    targets = []
    candidates: list[str] = []
    for module_key, module in _iter_modules(model):
        for parameter_name, parameter in _own_parameters(module):
            key = f"{module_key}.{parameter_name}" if module_key else parameter_name
            candidates.append(key)
            if not any(key == name or key.endswith(f".{name}") for name in names):
                continue
            _check_holder(key, module_key, module, module_target_keys, saved)
            if parameter.dim() not in (2, 3):
                raise TargetModuleError(
                    f"target_parameters matches {key!r} of shape {tuple(parameter.shape)}; "
                    "LoRA adapts 2-D weights and 3-D stacks of experts only. Fix: name only "
                    "those in target_parameters."
                )
            r = int(pattern_value(config.rank_pattern, key, config.r))
            alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
            targets.append(ParameterTarget(module_key, parameter_name, r, alpha))
    matched = {target.key for target in targets}
    for name in names:
        if not any(key == name or key.endswith(f".{name}") for key in matched):
            raise TargetModuleError(
                f"target_parameters entry {name!r} matches no parameter of the model. Closest "
                f"parameter paths: {closest_names(name, candidates)}. Fix target_parameters "
                "(an entry matches the end of a parameter path, e.g. "
                "'mlp.experts.gate_up_proj')."
            )
    return tuple(targets)


def apply_parameter_injection(
    model: nn.Module,
    targets: tuple[ParameterTarget, ...],
    config: LoraConfig,
    adapter_name: str,
    routing: AdapterRouting,
    initialise_weights: bool = True,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> None:
    """Add the adapter to each planned parameter, wrapping (or nesting) where none is yet.

    A parameter already wrapped (for another adapter) gets the adapter in its wrapper; a new
    wrapper goes around whatever sits at the module's path, so the first planned parameter
    of a module ends innermost.
    """
    for target in targets:
        holder = model.get_submodule(target.module_key)
        layer = _wrapper_of(holder, target.parameter_name)
        if layer is None:
            layer = LoraParameter(holder, routing, target.parameter_name)
            replace_module(model, target.module_key, layer)
        layer.add_adapter(
            adapter_name,
            r=target.r,
            lora_alpha=target.lora_alpha,
            lora_dropout=0.0,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            initialise_weights=initialise_weights,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )


def _wrapper_of(module: nn.Module, parameter_name: str) -> LoraParameter | None:
    """The wrapper of `parameter_name` in a chain of nested `LoraParameter`s, if any."""
    while isinstance(module, LoraParameter):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def _iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path in the user's model, module) for the model and every module in it.

    A chain of `LoraParameter`s stands for the module it wraps; other lorakit wrappers are
    yielded themselves and not entered.
    """
    if not prefix:
        yield "", model
    for name, child in model.named_children():
        key = f"{prefix}{name}"
        while isinstance(child, LoraParameter):
            child = child.target_module()
        yield key, child
        if not isinstance(child, (LoraLayer, ModulesToSaveWrapper)):
            yield from _iter_modules(child, key + ".")


def _own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A module's own parameters; for a LoRA layer, those of the layer it wraps."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    elif isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    return list(module.named_parameters(recurse=False))


def _check_holder(
    key: str,
    module_key: str,
    module: nn.Module,
    module_target_keys: Collection[str],
    saved: tuple[str, ...],
) -> None:
    if not module_key:
        raise TargetModuleError(
            f"target_parameters matches {key!r}, a parameter of the model itself: its "
            "wrapper would have to replace the model. Fix: target a parameter of a submodule."
        )
    if module_key in module_target_keys or isinstance(module, LoraLayer):
        raise TargetModuleError(
            f"target_parameters matches {key!r}, but module {module_key!r} is also adapted "
            "as a layer (target_modules, by this or another adapter). Fix: adapt it one way: "
            "remove it from target_modules (target_modules=[] targets no module) or from "
            "target_parameters."
        )
    parts = module_key.split(".")
    paths = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]  # itself and parents
    if isinstance(module, ModulesToSaveWrapper) or any(
        path.endswith(name) for path in paths for name in saved
    ):
        raise TargetModuleError(
            f"target_parameters matches {key!r}, inside a module trained whole "
            "(modules_to_save). Fix: remove it from one of the two."
        )


def _check_options(config: LoraConfig) -> None:
    """Refuse the options PEFT refuses with `target_parameters`, naming them."""
    refused = {
        "lora_dropout": config.lora_dropout != 0,
        "fan_in_fan_out": bool(config.fan_in_fan_out),
        "use_dora": bool(getattr(config, "use_dora", False)),
        "lora_bias": bool(getattr(config, "lora_bias", False)),
    }
    for field_name, is_set in refused.items():
        if is_set:
            raise ConfigError(
                f"{field_name}={getattr(config, field_name)!r} with target_parameters="
                f"{config.target_parameters!r}: an adapter on a bare parameter changes the "
                f"weight itself, which {field_name} cannot apply to (PEFT refuses it too). "
                f"Fix: leave {field_name} at its default for this adapter."
            )
    if config.init_lora_weights not in PARAMETER_INITS:
        raise ConfigError(
            f"init_lora_weights={config.init_lora_weights!r} with target_parameters: only "
            f"{list(PARAMETER_INITS)} initialise an adapter on a bare parameter (the others "
            "read a layer's weight matrix). Fix: use one of them."
        )


def _check_same_names(names: list[str], other_configs: Mapping[str, LoraConfig]) -> None:
    for adapter_name, other in other_configs.items():
        other_names = other.target_parameters
        if other_names and set(other_names) != set(names):
            raise ConfigError(
                f"target_parameters={sorted(names)} differs from adapter {adapter_name!r}'s "
                f"{sorted(other_names)}: every adapter of a model that uses target_parameters "
                "must name the same parameters (as in PEFT; the nesting of wrappers fixes "
                "their keys). Fix: use the same list, or another copy of the base model."
            )
