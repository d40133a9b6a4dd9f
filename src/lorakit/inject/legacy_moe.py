"""Refusing the `target_modules` that PEFT rewrites into `target_parameters` on MoE models.

transformers 5 fuses the experts of some mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE,
DeepSeek-V2/V3, ...) into 3-D parameters; checkpoints keep the old per-expert layers
(`experts.0.gate_proj`, `w1`, ...) and are converted at load by the table transformers keeps
per model type (`transformers.conversion_mapping`). PEFT 0.21 converts adapter configs for
those models the same way: a `target_modules` entry naming an old expert layer (`down_proj`,
`w2`, ...), and `"all-linear"` or a regex, which it resolves against the old names, become
`target_parameters` on the fused stacks (with doubled rank and alpha where two layers were
fused, and the router's weight for `gate`), and the entry no longer adapts the layers of that
name that still exist (a shared expert's `down_proj`, say). A regex becomes the list of the
last names of the paths it matches, so it then adapts every layer of those names.

lorakit does not convert. On those models such a config would adapt other weights than PEFT's,
so it raises, naming `target_modules` and the explicit lists that mean what the user wants.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Iterator

from torch import nn

from ..config import LoraConfig
from ..constants import ALL_LINEAR
from ..errors import ConfigError
from ..layers.registry import lora_layer_class_for
from .matching import iter_base_modules

# Substring of the converted names that marks a fused stack of experts.
EXPERTS = "experts"


def check_no_converted_moe_targets(model: nn.Module, config: LoraConfig) -> None:
    """Raise if PEFT would rewrite `config.target_modules` for this model (module docstring).

    Raises:
        ConfigError: `target_modules` is "all-linear", or a regex or name that PEFT maps onto
            a fused expert stack of a model type transformers converts.
    """
    spec = config.target_modules
    if spec is None:
        return
    old_names = _fused_expert_layer_names(model)
    if not old_names:
        return
    stacks = sorted(_expert_containers(model))
    if not stacks:
        return
    if spec == ALL_LINEAR:
        named = "'all-linear'"
    elif isinstance(spec, str):
        probes = [f"{stack}.{old}" for stack in stacks for old in old_names]
        if any(re.fullmatch(spec, probe) for probe in probes):
            named = f"{spec!r}, which matches {sorted(old_names)} under the experts,"
        elif _regex_is_broadened(model, spec):
            named = (
                f"{spec!r} (a regex, which peft turns into the last names of the paths it "
                "matches, so it adapts every layer of those names),"
            )
        else:
            return
    else:
        hits = [entry for entry in spec if entry.rsplit(".", 1)[-1] in old_names]
        if not hits:
            return
        named = f"{spec!r}, whose {hits} name experts' layers of transformers 4,"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ConfigError(
        f"target_modules={named} on a {model_type} model, whose experts transformers 5 fuses "
        f"into 3-D parameters ({stacks[0]}.*): peft rewrites such targets into "
        "target_parameters on the fused stacks (and drops the layers of that name), which "
        "lorakit does not, so the adapter would differ from peft's. Fix: list the layers to "
        "adapt in target_modules (e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']) and the "
        "expert stacks in target_parameters (e.g. ['mlp.experts.gate_up_proj', "
        "'mlp.experts.down_proj'])."
    )


def _regex_is_broadened(model: nn.Module, spec: str) -> bool:
    """Whether the layers named like those `spec` matches are more than those it matches."""
    paths = [key for key, module in iter_base_modules(model) if lora_layer_class_for(module)]
    matched = {key for key in paths if re.fullmatch(spec, key)}
    names = {key.rsplit(".", 1)[-1] for key in matched}
    return any(key.rsplit(".", 1)[-1] in names and key not in matched for key in paths)


def _fused_expert_layer_names(model: nn.Module) -> set[str]:
    """The transformers-4 layer names transformers fuses into this model's expert stacks
    (e.g. {"gate_proj", "up_proj", "down_proj"}), from its checkpoint conversion table; the
    router `gate` too, which PEFT maps to its weight. Empty for other models."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or "transformers" not in sys.modules:  # not a transformers model
        return set()
    if importlib.util.find_spec("transformers.conversion_mapping") is None:  # transformers 4
        return set()
    conversion = importlib.import_module("transformers.conversion_mapping")
    patterns = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {})
    source_type = patterns.get(model_type, "mixtral" if model_type == "mixtral" else None)
    if source_type is None:
        return set()
    names = set()
    for converter in conversion.get_checkpoint_conversion_mapping(source_type) or ():
        targets = getattr(converter, "target_patterns", None) or []
        if not any(EXPERTS in target for target in targets):
            continue
        for source in getattr(converter, "source_patterns", None) or []:
            names.add(source.removesuffix(".weight").rsplit(".", 1)[-1])
    return names | {"gate"} if names else set()


def _expert_containers(model: nn.Module) -> Iterator[str]:
    """Paths of the modules named like an experts block that hold 3-D parameters."""
    for key, module in model.named_modules():
        if key.rsplit(".", 1)[-1] != EXPERTS:
            continue
        if any(p.dim() == 3 for p in module.parameters()):
            yield key
