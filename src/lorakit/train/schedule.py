"""AdamW over the trainable parameters (LoRA+ groups too) and the learning-rate schedules.

Every schedule warms up linearly from 0 to the peak over ``warmup`` steps, then stays constant,
decays linearly to 0, or follows half a cosine to 0 at ``total_steps``. The multiplier for the
step about to run is ``lr_multiplier(step)``, with ``step`` counting optimizer steps done.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..optimizers import DEFAULT_LR_EMBEDDING, loraplus_roles, parameter_groups
from .config import SchedulerName, TrainConfig
from .train_errors import TrainConfigError


def lr_multiplier(step: int, name: SchedulerName, warmup: int, total_steps: int) -> float:
    """The fraction of the peak learning rate used for optimizer step ``step + 1``.

    Warmup: ``(step + 1) / (warmup + 1)`` for ``step < warmup`` (never 0, so the first step
    learns). After it, with progress ``p = (step - warmup) / max(1, total_steps - warmup)``:
    constant ``1``, linear ``1 - p``, cosine ``(1 + cos(pi * p)) / 2``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def is_decayed(name: str, parameter: nn.Parameter) -> bool:
    """Weight decay applies to matrices (LoRA A/B, convolution kernels), not to biases/norms."""
    return parameter.dim() >= 2 and not name.endswith(".bias")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, decayed (``is_decayed``) and not.

    With ``config.loraplus_lr_ratio`` set, each of those is split again by LoRA+ role (A at the
    learning rate, B at ``ratio`` times it, LoRA embedding factors at peft's
    ``loraplus_lr_embedding`` default); see ``lorakit.optimizers``.

    Raises:
        ValueError: The model has no trainable parameter.
        TrainConfigError: ``loraplus_lr_ratio`` is set and the model has no LoRA B factor.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "the model has no trainable parameter; wrap it with lorakit.get_peft_model (or load "
            "the adapter with is_trainable=True) before training."
        )
    if config.loraplus_lr_ratio is None:
        groups = _decay_groups(model, config.weight_decay)
    else:
        groups = _loraplus_groups(model, config)
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=_can_fuse(trainable))


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: the decayed trainable parameters, then the others (weight decay 0)."""
    decayed: list[nn.Parameter] = []
    not_decayed: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if is_decayed(name, parameter) else not_decayed).append(parameter)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]


def _loraplus_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """LoRA+ groups by role and by ``is_decayed`` (the trainer's rule: matrices only)."""
    assert config.loraplus_lr_ratio is not None
    if not any(role != "A" and parameter.ndim >= 2 for _, parameter, role in loraplus_roles(model)):
        raise TrainConfigError(
            f"loraplus_lr_ratio={config.loraplus_lr_ratio} is set but the model has no trainable "
            "LoRA B factor (lora_B, lora_embedding_B), so it would only change the learning rate "
            "of 1-D tensors; train LoRA adapters, or unset loraplus_lr_ratio."
        )
    groups = parameter_groups(
        model,
        lr=config.learning_rate,
        loraplus_lr_ratio=config.loraplus_lr_ratio,
        loraplus_lr_embedding=DEFAULT_LR_EMBEDDING,
        weight_decay=config.weight_decay,
        is_decayed=lambda name, parameter, _role: is_decayed(name, parameter),
    )
    return list(groups.values())


def _can_fuse(parameters: list[nn.Parameter]) -> bool | None:
    """Fused AdamW (one kernel over all tensors) where torch has it: plain CPU/CUDA floats.

    Over the 112 adapter tensors of a 33M-parameter model it takes 1 ms a step on CPU against
    5 ms for the per-tensor loop. Sharded (DTensor) parameters keep torch's default choice.
    """
    fusable = all(
        type(p.data) is torch.Tensor
        and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in parameters
    )
    return True if fusable else None


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``lr_multiplier`` for a run of ``total_steps`` steps."""
    warmup = config.warmup_for(total_steps)
    name = config.lr_scheduler

    def multiplier(step: int) -> float:
        return lr_multiplier(step, name, warmup, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
