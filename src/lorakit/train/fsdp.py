"""Fully sharded training (``strategy="fsdp"``): PyTorch's FSDP2 over the base and the adapters.

``fully_shard`` is applied to every transformer block of the base, then to the whole
``PeftModel`` (the root, holding the embeddings and the head). Each rank then keeps ``1 /
world_size`` of every tensor, frozen base weights included, as a ``DTensor`` shard; a block's
full weights are all-gathered just before its forward and backward and freed after. Only
tensors with ``requires_grad`` get gradients, so only the adapter gradients are reduce-scattered.

Files stay those of a single process: before a checkpoint or the final adapter is written, every
rank joins the all-gathers of the tensors the files need (``gather_*``) and rank 0 writes full
tensors. Loading a checkpoint hands every rank the full tensors and each keeps its own shard
(``load_into_parameter``, ``shard_optimizer_state``), so a checkpoint of an FSDP run, a DDP run
and a single process have one format. Commands and limits: ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from .train_errors import DistributedSetupError

logger = logging.getLogger("lorakit.train")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: the base's repeated blocks (e.g. decoder layers).

    A transformers model names its block classes in ``_no_split_modules`` (what accelerate's
    FSDP wrapping reads too); without that attribute, the items of every ``nn.ModuleList`` of
    two or more modules are taken. Nested matches are dropped (the outermost block wins).

    Raises:
        DistributedSetupError: No block was found (sharding only the root would gather the
            whole model at once on every rank).
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if names:
        found = [module for module in model.modules() if type(module).__name__ in names]
    else:
        found = [
            item
            for module in model.modules()
            if isinstance(module, nn.ModuleList) and len(module) > 1
            for item in module
        ]
    blocks = _outermost(found)
    if not blocks:
        raise DistributedSetupError(
            f"strategy 'fsdp' found no transformer block to shard in {type(model).__name__} "
            "(no _no_split_modules class and no nn.ModuleList of 2 or more modules); use "
            "strategy 'ddp', or give the model class a _no_split_modules list of block names."
        )
    return blocks


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    inner = {id(child) for module in modules for child in module.modules() if child is not module}
    return [module for module in modules if id(module) not in inner]


def shard_model(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` per block and at the root; return it.

    The trainable tensors are broadcast from rank 0 first, so every rank shards the same
    adapter (as DDP does when it starts); every rank loaded the same base itself. FSDP2 moves
    each shard to ``device``, so a base larger than one GPU never sits whole on one.

    Raises:
        DistributedSetupError: No trainable parameter, or no block to shard.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trainable = [param for param in model.parameters() if param.requires_grad]
    if not trainable:
        raise DistributedSetupError(
            "the model has no trainable parameter, so there is nothing to train on many "
            "processes; add an adapter with get_peft_model(...) first."
        )
    blocks = transformer_blocks(model)
    with torch.no_grad():
        for param in trainable:
            param.data = param.data.to(device)  # nccl sends CUDA tensors; the adapter is small
            dist.broadcast(param.data, src=0)
    mesh = init_device_mesh(device.type, (world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    logger.info("fsdp: sharded %d blocks and the root over %d ranks", len(blocks), world_size)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded with ``fully_shard`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def sharded_gradient_sync(model: nn.Module, is_enabled: bool) -> Iterator[None]:
    """FSDP2's counterpart of DDP's ``no_sync()``: keep gradients local while disabled.

    Every rank still runs every forward and backward (they all-gather the weights); only the
    reduce-scatter of the gradients waits for the micro-batch with sync enabled.
    """
    if is_enabled:
        yield
        return
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` shard (a collective: every rank calls it), on CPU.

    A plain tensor is returned as it is.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor().cpu()
    return tensor


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters by name (collective), as checkpoints store."""
    return {
        name: full_tensor(param.detach())
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (collective).

    The result has the single-process layout (states keyed by parameter position), so it
    loads into the optimizer of any strategy.
    """
    state_dict = optimizer.state_dict()
    state = {
        index: {key: full_tensor(value) for key, value in values.items()}
        for index, values in sorted(state_dict["state"].items())
    }
    return {"state": state, "param_groups": state_dict["param_groups"]}


def gather_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``state_dict()`` with the tensors the adapter files need gathered whole.

    Only those (the adapters, and e.g. saved embeddings) are all-gathered; the frozen base
    stays sharded. Pass the result to ``save_pretrained(..., state_dict=...)`` (collective).
    """
    from ..model import PeftModel
    from ..persistence import adapter_tensors

    state = model.state_dict()
    selected = adapter_tensors(cast(PeftModel, model), state_dict=state)
    needed = {id(tensor) for tensors in selected.values() for tensor in tensors.values()}
    return {key: full_tensor(t) if id(t) in needed else t for key, t in state.items()}


def load_into_parameter(parameter: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy the full ``tensor`` into ``parameter``; a sharded one keeps only its own shard.

    Every rank holds the full tensor (read from the checkpoint), so no communication is needed.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(parameter, DTensor):
            tensor = distribute_tensor(
                tensor.to(parameter.dtype),
                parameter.device_mesh,
                parameter.placements,
                src_data_rank=None,  # every rank has it: slice locally
            )
        parameter.copy_(tensor)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of full states: shard each state tensor like its parameter.

    A state tensor of the parameter's shape (AdamW's moments) becomes a ``DTensor`` with the
    parameter's placement; scalars (``step``) stay as they are. No-op for plain parameters.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if not isinstance(parameter, DTensor):
                continue
            state = optimizer.state[parameter]
            for key, value in state.items():
                if not isinstance(value, DTensor) and value.shape == parameter.shape:
                    state[key] = distribute_tensor(
                        value, parameter.device_mesh, parameter.placements, src_data_rank=None
                    )


def total_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float; with sharded gradients it is a ``DTensor``."""
    return float(full_tensor(norm))
