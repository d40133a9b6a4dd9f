"""Checkpoints that resume a run exactly, written atomically.

A checkpoint is a folder ``<output_dir>/checkpoints/checkpoint-<step>/`` holding:

- ``adapter/``: the adapter in PEFT's format (``save_pretrained``), usable on its own; left out
  when the model is fine-tuned whole (its trainable tensors are then the whole model already);
- ``trainable.safetensors``: every trainable tensor by parameter name (what resuming loads);
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``;
- ``trainer_state.pt``: the step, the data loader's position, the Python/NumPy/torch RNG states
  and the run's counters; ``trainer_state.json``: the same minus RNG states, for people.

The folder is built under a hidden temporary name and renamed into place as a whole
(``lorakit.io.atomic.replace_folder``), so a run killed at any moment leaves only whole
checkpoints. Old ones are renamed away, then deleted (``remove_folder``), keeping the newest
``save_total_limit``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io.atomic import remove_folder, replace_folder
from .fsdp import load_into_parameter, shard_optimizer_state
from .train_errors import CheckpointError

CHECKPOINTS_FOLDER = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"


@dataclasses.dataclass
class TrainerState:
    """Counters of a run that a checkpoint carries."""

    step: int = 0
    micro_batches: int = 0
    trained_tokens: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    elapsed: float = 0.0
    last_checkpoint: str | None = None


@dataclasses.dataclass
class GatheredState:
    """What a checkpoint stores of the model and optimizer, as full (unsharded) tensors.

    Attributes:
        trainable: Trainable parameter name -> tensor.
        optimizer: The optimizer's ``state_dict()`` layout with full state tensors.
        adapter: A model ``state_dict()`` for ``save_pretrained(state_dict=...)``; ``None``
            lets it read the model's own.
    """

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    adapter: dict[str, torch.Tensor] | None = None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's global RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (when installed) and torch (CPU and CUDA) RNG states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy
    except ImportError:
        pass
    else:
        kind, keys, position, has_gauss, cached = numpy.random.get_state(legacy=True)
        keys_tensor = torch.tensor(numpy.asarray(keys, dtype="int64"))
        state["numpy"] = (kind, keys_tensor, position, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the RNG states saved by ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        kind, keys, position, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def saves_adapters(model: nn.Module) -> bool:
    """Whether ``model.save_pretrained`` writes adapters only (a ``peft_config`` attribute).

    True for lorakit's and peft's ``PeftModel`` (also behind ``torch.compile``, which forwards
    attributes) and for a transformers model with adapters loaded into it; false for a plain
    transformers model, which the trainer fine-tunes and saves whole.
    """
    return hasattr(model, "peft_config")


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else ``None``."""
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Whole checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return []
    found = [
        (step, path)
        for path in folder.iterdir()
        if (step := checkpoint_step(path)) is not None and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int,
    extra_state: dict[str, Any] | None = None,
    gathered: GatheredState | None = None,
) -> Path:
    """Write a checkpoint for ``state["step"]`` atomically, then keep the newest ``keep``.

    Args:
        output_dir: The run's output folder.
        model: The ``PeftModel`` being trained.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler.
        state: JSON-like trainer state with at least ``step``; RNG states are added here.
        keep: How many checkpoints to keep.
        extra_state: Tensors and objects for ``trainer_state.pt`` only (e.g. every rank's RNG
            states), left out of the readable ``trainer_state.json``.
        gathered: Full tensors to write instead of the model's and optimizer's own, for a
            sharded (FSDP) model whose own tensors are each rank's shards.

    Returns:
        The checkpoint folder.
    """
    target = Path(output_dir) / CHECKPOINTS_FOLDER / f"{CHECKPOINT_PREFIX}{int(state['step'])}"
    if gathered is None:
        gathered = GatheredState(
            trainable={
                name: parameter.detach()
                for name, parameter in model.named_parameters()
                if parameter.requires_grad
            },
            optimizer=optimizer.state_dict(),
        )
    adapter_options = {} if gathered.adapter is None else {"state_dict": gathered.adapter}
    trainable = {name: tensor.contiguous() for name, tensor in gathered.trainable.items()}
    full_state = {**state, **(extra_state or {}), "rng": capture_rng_state()}
    with replace_folder(target) as temp:  # plain writes: the folder is renamed into place whole
        if saves_adapters(model):
            model.save_pretrained(temp / "adapter", **adapter_options)  # type: ignore[operator]
        save_file(trainable, str(temp / TRAINABLE_FILE))
        torch.save(gathered.optimizer, temp / "optimizer.pt")
        torch.save(scheduler.state_dict(), temp / "scheduler.pt")
        (temp / STATE_JSON).write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
        torch.save(full_state, temp / STATE_FILE)
    for old in list_checkpoints(output_dir)[:-keep]:
        remove_folder(old)
    return target


def resolve_resume(resume: bool | str, output_dir: str) -> Path | None:
    """The checkpoint to resume from: the newest in ``output_dir`` for ``True``, or a path.

    Raises:
        CheckpointError: ``resume`` names a folder that is not a whole checkpoint, or a fresh
            start (``resume=False``) would mix its checkpoints with an earlier run's.
    """
    if resume is False:
        earlier = list_checkpoints(output_dir)
        if earlier:
            raise CheckpointError(
                f"output_dir {output_dir} already holds checkpoints of an earlier run "
                f"({earlier[-1].name}); a new run there would mix them up. Continue it with "
                "resume=True (--resume), choose another output_dir, or delete "
                f"{Path(output_dir) / CHECKPOINTS_FOLDER}."
            )
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        available = [str(p) for p in list_checkpoints(output_dir)] or ["none"]
        raise CheckpointError(
            f"resume={resume!r} is not a checkpoint folder (no {STATE_FILE} in it). Checkpoints "
            f"in {output_dir}: {', '.join(available)}. Pass one of them, or resume=True."
        )
    return path


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Load weights, optimizer and scheduler from ``path``; return the trainer state.

    The files hold full tensors; an FSDP-sharded model and its optimizer keep each rank's shard.

    The RNG states are in the returned dict under ``"rng"``; the caller restores them last,
    after anything else that may draw random numbers.

    Raises:
        CheckpointError: The checkpoint's trainable tensors do not match the model's.
    """
    tensors = load_file(str(path / TRAINABLE_FILE))
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(parameters):
        missing = sorted(set(parameters) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(parameters))[:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: trainable tensors missing from it "
            f"{missing}, unknown to the model {extra}. Resume with the same model and LoRA "
            "settings, or start a new run (resume=False or another output_dir)."
        )
    for name, tensor in tensors.items():
        if tensor.shape != parameters[name].shape:
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, the model "
                f"{tuple(parameters[name].shape)}; resume with the same LoRA settings."
            )
    for name, tensor in tensors.items():
        load_into_parameter(parameters[name], tensor)  # a sharded one keeps its shard
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    shard_optimizer_state(optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state: dict[str, Any] = torch.load(path / STATE_FILE, weights_only=True)
    return state


# Fields that must not change when resuming, or the run would not continue the same trajectory.
# loraplus_lr_ratio sets the optimizer's groups, which the saved optimizer state must match.
RESUME_FIXED_FIELDS = (
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "lr_scheduler",
    "loraplus_lr_ratio",
)


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume with settings that change the run's trajectory.

    Raises:
        CheckpointError: Naming each field whose saved and current values differ.
    """
    differences = [
        f"{name}: checkpoint {saved[name]!r}, now {current[name]!r}"
        for name in RESUME_FIXED_FIELDS
        if name in saved and saved[name] != current[name]
    ]
    if differences:
        raise CheckpointError(
            f"cannot resume from {path} with other settings ({'; '.join(differences)}). Use the "
            "checkpoint's values, or start a new run in another output_dir."
        )
