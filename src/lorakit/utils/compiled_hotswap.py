"""`prepare_model_for_compiled_hotswap`: pad adapters to one rank before `torch.compile`.

Why: a compiled graph is specialised to the shapes of the tensors it reads, so swapping in
an adapter of another rank (`hotswap_adapter`) would compile a new graph. Padded to the
highest rank to come, every adapter has the same shapes: A gets zero rows and B zero
columns, which add nothing to B A, and a file of a lower rank is padded the same way when it
is swapped in. Scales need no preparation in lorakit: a compiled forward reads each layer's
scale as a tensor (see `layers.routing`), and `hotswap_adapter` folds another file's scale
into B.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Literal

from torch import nn

from ..config import LoraConfig
from ..errors import HotswapError
from ..layers.base import LoraLayer
from ..model import PeftModel

logger = logging.getLogger(__name__)

CHECK_COMPILED_CHOICES = ("error", "warn", "ignore")


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | Mapping[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Pad every adapter of `model` to `target_rank` so hotswaps of other ranks reuse one graph.

    Call it after loading the first adapter and before `torch.compile`. The model's outputs
    do not change. Each adapter's config in `model.peft_config` is rewritten to say rank
    `target_rank` with the `lora_alpha` (and `alpha_pattern`) that keep every layer's scale,
    so `save_pretrained` writes a file that loads to the same model. A and B become new
    parameters: build an optimizer after this call.

    Args:
        model: A `PeftModel` (not yet compiled).
        target_rank: The highest rank among the adapters to be swapped in; None pads
            nothing.
        config: As in PEFT, configs of adapters to come (one, or a mapping name -> config)
            whose `r` and `rank_pattern` values are set to `target_rank` in place.
        check_compiled: What to do when `model` is already compiled: "error" (raise),
            "warn" (log a warning and go on) or "ignore".

    Raises:
        TypeError: `model` is not a `PeftModel` (or `torch.compile` of one).
        HotswapError: `check_compiled` is not one of its choices, or is "error" and the
            model is compiled; the model has no LoRA layers; `target_rank` is not a
            positive integer or is lower than an adapter's rank. Nothing is changed.
    """
    peft_model = _checked_model(model, check_compiled)
    layers = [(key, layer) for key, layer in peft_model._lora_layers()]
    if not layers:
        raise HotswapError(
            "prepare_model_for_compiled_hotswap found no LoRA layers in the model. Fix: call "
            "it after loading the first adapter and before compiling."
        )
    if target_rank is None:
        return
    _check_target_rank(target_rank, layers)
    configs = {
        name: _padded_config(adapter_config, name, target_rank, layers)
        for name, adapter_config in peft_model.peft_config.items()
    }
    for _, layer in layers:
        for adapter_name in layer.adapter_names:
            if layer.r[adapter_name] < target_rank:
                layer.pad_adapter_rank(adapter_name, target_rank)
    peft_model.peft_config.update(configs)
    others = {"config": config} if isinstance(config, LoraConfig) else dict(config or {})
    for other in others.values():
        other.r = target_rank
        other.rank_pattern = {key: target_rank for key in other.rank_pattern}


def _checked_model(model: nn.Module, check_compiled: str) -> PeftModel:
    if check_compiled not in CHECK_COMPILED_CHOICES:
        raise HotswapError(
            f"check_compiled={check_compiled!r} is not one of {list(CHECK_COMPILED_CHOICES)}."
        )
    original = getattr(model, "_orig_mod", model)
    if not isinstance(original, PeftModel):
        raise TypeError(
            "prepare_model_for_compiled_hotswap needs a lorakit PeftModel, got "
            f"{type(original).__name__}. Fix: wrap the model with lorakit.get_peft_model or "
            "PeftModel.from_pretrained first."
        )
    if original is not model and check_compiled == "error":
        raise HotswapError(
            "prepare_model_for_compiled_hotswap got a compiled model; padding now would "
            "compile new graphs. Fix: call it before torch.compile (or pass "
            "check_compiled='warn' or 'ignore')."
        )
    if original is not model and check_compiled == "warn":
        logger.warning(
            "prepare_model_for_compiled_hotswap got a compiled model: the next call compiles "
            "new graphs. Call it before torch.compile."
        )
    return original


def _check_target_rank(target_rank: int, layers: list[tuple[str, LoraLayer]]) -> None:
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise HotswapError(f"target_rank must be a positive integer, got {target_rank!r}.")
    higher = [
        f"{key} ({adapter_name!r}: {rank})"
        for key, layer in layers
        for adapter_name, rank in layer.r.items()
        if rank > target_rank
    ]
    if higher:
        raise HotswapError(
            f"target_rank={target_rank} is lower than the rank of {len(higher)} adapter "
            f"layers: {'; '.join(higher[:5])}. Nothing was changed. Fix: pass the highest "
            "rank of all adapters, those loaded and those to be swapped in."
        )


def _padded_config(
    config: LoraConfig, adapter_name: str, target_rank: int, layers: list[tuple[str, LoraLayer]]
) -> LoraConfig:
    """`config` at rank `target_rank`, with the alphas that keep each layer's scale.

    s = alpha / r (or alpha / √r with rsLoRA), so alpha' = s · r' for the new rank r'. The
    most common scale gives `lora_alpha`; layers with another scale get an exact
    `alpha_pattern` entry (their escaped path).
    """
    scales = {key: layer.scaling[adapter_name] for key, layer in layers if adapter_name in layer.r}
    if not scales:
        return config
    size = math.sqrt(target_rank) if config.use_rslora else target_rank
    common = Counter(scales.values()).most_common(1)[0][0]
    alpha_pattern = {
        re.escape(key): scale * size for key, scale in scales.items() if scale != common
    }
    return dataclasses.replace(
        config,
        r=target_rank,
        rank_pattern={},
        lora_alpha=common * size,
        alpha_pattern=alpha_pattern,
    )
