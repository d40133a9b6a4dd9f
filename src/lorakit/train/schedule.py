"""AdamW over the trainable parameters and the learning-rate schedules.

Every schedule warms up linearly from 0 to the peak over ``warmup`` steps, then stays constant,
decays linearly to 0, or follows half a cosine to 0 at ``total_steps``. The multiplier for the
step about to run is ``lr_multiplier(step)``, with ``step`` counting optimizer steps done.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import SchedulerName, TrainConfig


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
    """AdamW over the trainable parameters only, in two groups: decayed and not.

    Raises:
        ValueError: The model has no trainable parameter.
    """
    decayed: list[nn.Parameter] = []
    not_decayed: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if is_decayed(name, parameter) else not_decayed).append(parameter)
    if not decayed and not not_decayed:
        raise ValueError(
            "the model has no trainable parameter; wrap it with lorakit.get_peft_model (or load "
            "the adapter with is_trainable=True) before training."
        )
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    fused = _can_fuse(decayed + not_decayed)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused)


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
