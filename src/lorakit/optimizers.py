"""LoRA+ (Hayou et al., 2024): the B factors learn ``loraplus_lr_ratio`` times faster than A.

With B initialised to zero and A random, one learning rate for both is inefficient for wide
layers; LoRA+ trains B at ``lr · ratio`` and A at ``lr``. ``create_loraplus_optimizer`` takes
peft's arguments and builds peft's four parameter groups, in peft's order:

1. A: the other trainable tensors (``lora_A``, a trained head's weight, ...), at ``lr`` with
   ``loraplus_weight_decay``;
2. embedding: the tensors held by a LoRA embedding layer, at ``loraplus_lr_embedding``;
3. B: ``lora_B`` factors and 1-D tensors, at ``lr · loraplus_lr_ratio``, decayed when
   ``"bias"`` is not in the name and no ``nn.LayerNorm`` holds them;
4. the other B tensors, at ``lr · loraplus_lr_ratio`` without weight decay.

`lorakit.train`'s trainer uses the same roles (``loraplus_roles``) with its own decay rule.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from .errors import ConfigError
from .layers.embedding import LoraEmbedding

LoraPlusRole = Literal["A", "embedding", "B"]
# peft's default learning rate of the LoRA factors of embedding layers.
DEFAULT_LR_EMBEDDING = 1e-6
# bitsandbytes' 8-bit optimizers; with them the embeddings' weights keep 32-bit states, as peft.
EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def loraplus_roles(model: nn.Module) -> list[tuple[str, nn.Parameter, LoraPlusRole]]:
    """Each trainable parameter's name, the parameter and its LoRA+ role, in model order.

    A parameter sits in a ``ParameterDict``/``ModuleDict`` entry below its LoRA layer (e.g.
    ``embed.lora_embedding_A.default``), so the layer is its name without the last two parts.
    """
    roles: list[tuple[str, nn.Parameter, LoraPlusRole]] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer_name = ".".join(name.split(".")[:-2])
        layer = model.get_submodule(layer_name) if layer_name else None
        role: LoraPlusRole
        if isinstance(layer, LoraEmbedding):
            role = "embedding"
        elif "lora_B" in name or parameter.ndim == 1:
            role = "B"
        else:
            role = "A"
        roles.append((name, parameter, role))
    return roles


def check_lr_ratio(loraplus_lr_ratio: float) -> None:
    """Raise ``ConfigError`` unless the ratio is a finite number above 0."""
    is_number = isinstance(loraplus_lr_ratio, int | float) and not isinstance(
        loraplus_lr_ratio, bool
    )
    if not is_number or not 0 < loraplus_lr_ratio < float("inf"):
        raise ConfigError(
            f"loraplus_lr_ratio={loraplus_lr_ratio!r} is not allowed; use a number > 0 (the "
            "LoRA+ paper uses 2 to 16 times the learning rate of A for B)."
        )


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = DEFAULT_LR_EMBEDDING,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters in LoRA+'s four groups (see the module).

    Same call and groups as ``peft.optimizers.create_loraplus_optimizer``: a run written for
    peft gets the same optimizer. Empty groups are kept, so group ``i`` is always the same one.

    Args:
        model: The model to train (a lorakit ``PeftModel`` or any module holding lorakit layers).
        optimizer_cls: The optimizer class, e.g. ``torch.optim.AdamW``.
        lr: The learning rate of A (and of the other non-B tensors).
        loraplus_lr_ratio: B's learning rate over A's (> 0; LoRA+ uses values above 1).
        loraplus_lr_embedding: The learning rate of the LoRA factors of embedding layers.
        loraplus_weight_decay: The weight decay of the A, embedding and decayed B groups.
        **kwargs: Passed to ``optimizer_cls`` (``betas``, ``eps``, ``fused``, ...).

    Returns:
        ``optimizer_cls`` over the four groups.

    Raises:
        ConfigError: ``loraplus_lr_ratio`` is not a number > 0.
    """
    check_lr_ratio(loraplus_lr_ratio)
    in_layer_norm = _layer_norm_parameter_names(model)

    def is_decayed(name: str, parameter: nn.Parameter, role: LoraPlusRole) -> bool:
        return role != "B" or ("bias" not in name and name not in in_layer_norm)

    groups = parameter_groups(
        model,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_lr_embedding=loraplus_lr_embedding,
        weight_decay=loraplus_weight_decay,
        is_decayed=is_decayed,
    )
    # A and embedding are always decayed here: their not-decayed groups are empty.
    peft_order: list[tuple[LoraPlusRole, bool]] = [
        ("A", True),
        ("embedding", True),
        ("B", True),
        ("B", False),
    ]
    build: Callable[..., torch.optim.Optimizer] = optimizer_cls  # its subclasses take lr
    optimizer = build([groups[key] for key in peft_order], lr=lr, **kwargs)
    if optimizer_cls.__name__ in EIGHT_BIT_OPTIMIZERS:
        _keep_embeddings_in_32_bits(model)
    return optimizer


def parameter_groups(
    model: nn.Module,
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float,
    weight_decay: float,
    is_decayed: Callable[[str, nn.Parameter, LoraPlusRole], bool],
) -> dict[tuple[LoraPlusRole, bool], dict[str, Any]]:
    """The LoRA+ groups by (role, decayed), in the order A, embedding, B, decayed first.

    Each group holds ``params`` (possibly empty), ``lr`` (``lr``, ``loraplus_lr_embedding`` or
    ``lr · loraplus_lr_ratio``) and ``weight_decay`` (``weight_decay`` or 0).
    """
    learning_rates: dict[LoraPlusRole, float] = {
        "A": lr,
        "embedding": loraplus_lr_embedding,
        "B": lr * loraplus_lr_ratio,
    }
    groups: dict[tuple[LoraPlusRole, bool], dict[str, Any]] = {}
    for role, rate in learning_rates.items():
        for decayed in (True, False):
            decay = weight_decay if decayed else 0.0
            groups[(role, decayed)] = {"params": [], "lr": rate, "weight_decay": decay}
    for name, parameter, role in loraplus_roles(model):
        groups[(role, is_decayed(name, parameter, role))]["params"].append(parameter)
    return groups


def _layer_norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters held (at any depth) by an ``nn.LayerNorm``: never decayed."""
    names: set[str] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.LayerNorm) and module_name:
            names.update(
                f"{module_name}.{name}"
                for name, _ in module.named_parameters(remove_duplicate=False)
            )
    return names


def _keep_embeddings_in_32_bits(model: nn.Module) -> None:
    """Tell bitsandbytes to keep 32-bit optimizer states for every embedding weight."""
    bitsandbytes = importlib.import_module("bitsandbytes")  # the optimizer class is its own
    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
