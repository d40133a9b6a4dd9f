"""Fine-tuning workflow: data reading, tokenisation, batching, metrics and the trainer.

The data pieces live in their modules (``lorakit.train.data``, ``lorakit.train.metrics``, ...);
the trainer's public API is re-exported here.
"""

from .config import TrainConfig, load_train_config
from .train_errors import (
    CheckpointError,
    DistributedSetupError,
    NonFiniteLossError,
    TrainConfigError,
)
from .trainer import Trainer, TrainerState, finetune

__all__ = [
    "CheckpointError",
    "DistributedSetupError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainConfigError",
    "Trainer",
    "TrainerState",
    "finetune",
    "load_train_config",
]
