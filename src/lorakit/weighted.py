"""`add_weighted_adapter`: a new adapter made from existing ones, layer by layer.

The math lives in `ops.combine`; this module picks each layer's adapters, computes every new
(A, B) before touching the model (so bad options change nothing), then installs them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import AdapterNameError, ConfigError
from .layers.base import LoraLayer
from .layers.embedding import LoraEmbedding
from .ops.combine import COMBINED_ADAPTER_SCALE, combine_adapters

if TYPE_CHECKING:
    from .model import PeftModel


def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    **options: Any,
) -> None:
    """Create `adapter_name` whose ΔW combines the named adapters (see `ops.combine`)."""
    if adapter_name in model.peft_config:
        raise AdapterNameError(f"Adapter {adapter_name!r} already exists; choose a new name.")
    missing = [name for name in adapters if name not in model.peft_config]
    if missing:
        raise AdapterNameError(
            f"Adapters {missing} do not exist; existing adapters: {list(model.peft_config)}."
        )
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(
            f"add_weighted_adapter got {len(adapters)} adapters and {len(weights)} weights; "
            "give one weight per adapter (at least one)."
        )
    configs = {name: model.peft_config[name] for name in adapters}
    for uses, message in (
        (
            lambda config: bool(config.target_parameters),
            "add_weighted_adapter cannot combine adapters {names}, which adapt parameters "
            "(target_parameters): their A and B hold one block per expert (PEFT refuses them "
            "too). Fix: combine adapters without target_parameters.",
        ),
        (
            lambda config: bool(config.use_dora),
            "add_weighted_adapter cannot combine DoRA adapters {names}: their magnitude "
            "vectors would have to be combined too, which has no defined rule (peft keeps the "
            "new adapter's freshly initialised magnitudes instead). Fix: combine adapters "
            "without use_dora.",
        ),
        (
            lambda config: config.trainable_token_indices is not None,
            "add_weighted_adapter cannot combine adapters {names}, which train token rows "
            "(trainable_token_indices). Fix: combine adapters without them.",
        ),
        (
            lambda config: bool(config.lora_bias),
            "add_weighted_adapter cannot combine adapters {names}, which train a bias on "
            "lora_B (lora_bias=True): the combination is of A and B only, so their biases "
            "would be dropped. Fix: combine adapters without lora_bias.",
        ),
    ):
        names = [name for name, config in configs.items() if uses(config)]
        if names:
            raise ConfigError(message.format(names=names))
    if any(model.peft_config[name].modules_to_save for name in adapters):
        raise ConfigError(
            "add_weighted_adapter cannot combine adapters that train whole modules "
            "(modules_to_save); combine adapters without them."
        )
    combined: dict[str, tuple[LoraLayer, torch.Tensor, torch.Tensor]] = {}
    for key, layer in model._lora_layers():
        present = [(name, w) for name, w in zip(adapters, weights, strict=True) if name in layer.r]
        if not present:
            continue
        pairs = [layer._adapter_pair(name) for name, _ in present]
        A, B = combine_adapters(
            [a.detach() for a, _ in pairs],
            [b.detach() for _, b in pairs],
            [layer.scaling[name] for name, _ in present],
            [w for _, w in present],
            combination_type,  # type: ignore[arg-type]
            is_merged_transposed=isinstance(layer, LoraEmbedding),
            **options,
        )
        combined[key] = (layer, A, B)
    _install(model, adapters[0], adapter_name, combined)


def _install(
    model: PeftModel,
    template_name: str,
    adapter_name: str,
    combined: dict[str, tuple[LoraLayer, torch.Tensor, torch.Tensor]],
) -> None:
    """Add the computed factors as a new adapter and record a config that reproduces it."""
    ranks = {key: int(A.shape[0]) for key, (_, A, _) in combined.items()}
    common_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = dataclasses.replace(
        model.peft_config[template_name],
        r=common_rank,
        lora_alpha=common_rank * COMBINED_ADAPTER_SCALE,
        use_rslora=False,
        target_modules=sorted(combined),
        layers_to_transform=None,
        exclude_modules=None,
        rank_pattern={re.escape(k): r for k, r in ranks.items() if r != common_rank},
        alpha_pattern={
            re.escape(k): r * COMBINED_ADAPTER_SCALE for k, r in ranks.items() if r != common_rank
        },
    )
    for layer, A, B in combined.values():
        rank = int(A.shape[0])
        layer.add_adapter(
            adapter_name,
            r=rank,
            lora_alpha=rank * COMBINED_ADAPTER_SCALE,
            lora_dropout=config.lora_dropout,
            use_rslora=False,
            init_lora_weights=True,
        )
        new_A, new_B = layer._adapter_pair(adapter_name)
        with torch.no_grad():
            new_A.copy_(A.reshape(new_A.shape))
            new_B.copy_(B.reshape(new_B.shape))
    model.peft_config[adapter_name] = config
    model._refresh_trainable()
