"""Training on many processes: a ``torchrun`` launch, the process group and the DDP wrapper.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
in each. ``detect_launch`` reads them; the trainer then starts the process group (gloo on CPU,
nccl on CUDA), shards the data, wraps the model in ``DistributedDataParallel`` and stops the
group at the end, also on error. Everything else is PyTorch's own engine.

DDP reduces the gradients of the parameters with ``requires_grad`` only, so with a ``PeftModel``
just the adapter gradients cross the wire. ``wrap_model`` also tells DDP to ignore the frozen
base tensors and buffers when it starts, so they are not broadcast either: every rank loads the
same base files itself. With ``strategy="fsdp"`` the model is sharded instead
(``lorakit.train.fsdp``); ``wrap_model`` and ``gradient_sync`` choose. Commands and the global
batch: ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import fsdp
from .config import StrategyName
from .train_errors import DistributedSetupError

logger = logging.getLogger("lorakit.train")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# A collective waits this long for the other ranks before it fails (instead of hanging).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistributedRun:
    """This process's place in the run, and the collectives the trainer needs.

    ``world_size == 1`` is a plain single-process run: every method is then a no-op, so the
    trainer has one code path.

    Attributes:
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of processes.
        local_rank: Rank on this machine (picks the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """``values`` summed element-wise over all ranks (float64)."""
        if not self.is_distributed:
            return [float(value) for value in values]
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(value) for value in tensor.tolist()]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.is_distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()


SINGLE_PROCESS = DistributedRun()


def _read_int(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise DistributedSetupError(
            f"environment variable {name}={text!r} is not an integer; torchrun sets it. Launch "
            "with `torchrun --nproc_per_node N -m lorakit train ...`, or unset "
            f"{', '.join(LAUNCH_VARIABLES)} for a single-process run."
        ) from None


def detect_launch(environ: Mapping[str, str] | None = None) -> DistributedRun:
    """The run described by ``torchrun``'s environment; ``SINGLE_PROCESS`` without it.

    Raises:
        DistributedSetupError: Only some of ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are set, or
            they hold impossible values.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return SINGLE_PROCESS
    if len(present) != len(LAUNCH_VARIABLES):
        missing = [name for name in LAUNCH_VARIABLES if name not in environ]
        raise DistributedSetupError(
            f"found {', '.join(present)} but not {', '.join(missing)} in the environment; "
            "torchrun sets all three. Launch with torchrun, or unset them for one process."
        )
    rank, world_size, local_rank = (_read_int(environ, name) for name in LAUNCH_VARIABLES)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedSetupError(
            f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} is not a valid "
            "launch (need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)."
        )
    return DistributedRun(rank, world_size, local_rank)


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def training_device(run: DistributedRun, model: nn.Module) -> torch.device:
    """The device this rank trains on: its GPU (``LOCAL_RANK``) when CUDA is there.

    A single-process run keeps the model where the caller put it.
    """
    current = next(model.parameters()).device
    if run.is_distributed and torch.cuda.is_available():
        return torch.device("cuda", run.local_rank)
    return current


def start_process_group(
    run: DistributedRun, device: torch.device, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> bool:
    """Start the default process group for ``run`` unless one exists.

    Returns:
        Whether this call started it (then the caller stops it with ``stop_process_group``).
    """
    if not run.is_distributed:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != run.world_size:
            raise DistributedSetupError(
                f"a process group of {dist.get_world_size()} processes is running but "
                f"WORLD_SIZE={run.world_size}; start the group with the launch's world size."
            )
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device), rank=run.rank, world_size=run.world_size, timeout=timeout
    )
    logger.info("rank %d/%d: process group started (%s)", run.rank, run.world_size, device)
    return True


def stop_process_group(wait_for_all: bool = False) -> None:
    """Destroy the default process group, if there is one.

    `wait_for_all` (after a run every rank finished) first meets the other ranks at a barrier:
    a rank that tore its group down while gloo's threads still served another rank's last
    collective aborted at exit ("terminate called without an active exception", exit -6).
    Never after a failure, where the other ranks may not come.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def frozen_names(model: nn.Module) -> list[str]:
    """Fully qualified names of ``model``'s frozen parameters and of all its buffers."""
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    return frozen + [name for name, _ in model.named_buffers()]


def wrap_model(
    model: nn.Module, run: DistributedRun, device: torch.device, strategy: StrategyName = "ddp"
) -> nn.Module:
    """``model`` ready for data-parallel training under ``strategy``.

    ``"ddp"``: ``DistributedDataParallel`` reducing only trainable gradients. DDP registers
    only parameters with ``requires_grad`` in its gradient buckets. The frozen base tensors and
    the buffers are also left out of its start-up broadcast (every rank loaded the same base)
    and buffers are not re-broadcast each forward; the trainable parameters are broadcast from
    rank 0 once, so all ranks start from rank 0's adapter.

    ``"fsdp"``: ``model`` itself, sharded in place (``fsdp.shard_model``); build the optimizer
    after this call, over the sharded parameters.

    Returns:
        The model to call in training (a single-process run gets ``model`` itself).

    Raises:
        DistributedSetupError: The model has no trainable parameter (nothing to reduce), or
            FSDP finds no block to shard.
    """
    if not run.is_distributed:
        return model
    if strategy == "fsdp":
        return fsdp.shard_model(model, run.world_size, device)
    if not any(param.requires_grad for param in model.parameters()):
        raise DistributedSetupError(
            "the model has no trainable parameter, so there is nothing to train on many "
            "processes; add an adapter with get_peft_model(...) first."
        )
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen_names(model))
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def gradient_sync(wrapped: nn.Module, is_enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient reduction when ``is_enabled`` is false: accumulate locally, reduce later.

    DDP's ``no_sync()``, or FSDP2's ``set_requires_gradient_sync(False)``. Gradient accumulation
    reduces once per optimizer step, in the last micro-batch's backward.
    """
    from torch.nn.parallel import DistributedDataParallel

    if is_enabled:
        return contextlib.nullcontext()
    if isinstance(wrapped, DistributedDataParallel):
        return wrapped.no_sync()
    if fsdp.is_sharded(wrapped):
        return fsdp.sharded_gradient_sync(wrapped, is_enabled)
    return contextlib.nullcontext()
