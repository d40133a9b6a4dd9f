"""Reading a torchrun launch from the environment, and the single-process no-ops."""

from __future__ import annotations

import pytest
import torch

from lorakit.train.distributed import (
    SINGLE_PROCESS,
    DistributedRun,
    backend_for,
    detect_launch,
    frozen_names,
    gradient_sync,
    start_process_group,
    wrap_model,
)
from lorakit.train.train_errors import DistributedSetupError


def test_no_launch_variables_is_a_single_process_run() -> None:
    run = detect_launch({"PATH": "/bin"})
    assert run == SINGLE_PROCESS
    assert (run.rank, run.world_size, run.is_main, run.is_distributed) == (0, 1, True, False)


def test_torchrun_variables_give_the_rank() -> None:
    run = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (run.rank, run.world_size, run.local_rank) == (3, 4, 1)
    assert run.is_distributed and not run.is_main


def test_some_launch_variables_missing_is_refused() -> None:
    with pytest.raises(DistributedSetupError, match="found RANK but not WORLD_SIZE, LOCAL_RANK"):
        detect_launch({"RANK": "0"})


def test_non_integer_launch_variable_is_refused() -> None:
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE='two' is not an integer"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"})


def test_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(DistributedSetupError, match="RANK=2, WORLD_SIZE=2, LOCAL_RANK=0"):
        detect_launch({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_backend_follows_the_device() -> None:
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"


def test_single_process_collectives_are_identities() -> None:
    run = DistributedRun()
    assert run.sum([2, 0.5], torch.device("cpu")) == [2.0, 0.5]
    assert run.gather({"a": 1}) == [{"a": 1}]
    assert start_process_group(run, torch.device("cpu")) is False
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, run, torch.device("cpu")) is model
    with gradient_sync(model, is_enabled=False):
        model(torch.ones(1, 2)).sum().backward()  # a plain module has no no_sync: runs as is
    assert model.weight.grad is not None and torch.equal(model.weight.grad, torch.ones(2, 2))


def test_frozen_names_lists_frozen_parameters_and_buffers() -> None:
    model = torch.nn.BatchNorm1d(3)
    model.bias.requires_grad_(False)
    assert frozen_names(model) == ["bias", "running_mean", "running_var", "num_batches_tracked"]


def test_a_model_without_trainable_parameters_is_refused() -> None:
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(DistributedSetupError, match="no trainable parameter"):
        wrap_model(model, DistributedRun(0, 2, 0), torch.device("cpu"))
