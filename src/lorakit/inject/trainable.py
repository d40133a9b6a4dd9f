"""Which adapter tensors and biases train: one rule for `PeftModel` and injected models."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from torch import nn

from ..config import LoraConfig
from .surgery import Wrapper


def refresh_trainable(
    model: nn.Module,
    wrappers: Iterable[tuple[str, Wrapper]],
    configs: Mapping[str, LoraConfig],
    active_adapters: Collection[str],
    adapter_names: Collection[str] | None = None,
) -> None:
    """Active, non-inference adapters train; their configs' `bias` decides which biases train.

    Args:
        model: The user's model holding the wrappers (its biases are searched).
        wrappers: Its lorakit wrappers, with their paths.
        configs: Adapter name -> config.
        active_adapters: The adapters that act.
        adapter_names: Update only these adapters' tensors (a switch touches only the
            adapters it activates or deactivates); None updates all.
    """
    for _, wrapper in wrappers:
        for name in wrapper.adapter_names:
            if adapter_names is not None and name not in adapter_names:
                continue
            config = configs.get(name)
            is_trainable = (
                name in active_adapters and config is not None and not config.inference_mode
            )
            wrapper.set_adapter_trainable(name, is_trainable)
    for name in active_adapters:
        config = configs[name]
        if config.inference_mode or config.bias == "none":
            continue
        for key, parameter in model.named_parameters():
            is_bias = key == "bias" or key.endswith(".bias")  # PEFT's rule: not `*_bias`
            if not is_bias or ".original_module." in f".{key}":
                continue
            if config.bias == "all" or ".base_layer." in f".{key}":
                parameter.requires_grad_(True)
