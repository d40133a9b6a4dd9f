"""Deterministic shuffling, exact resumption and sharding of batch indices."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.train.data_errors import EmptyDatasetError, SamplerStateError
from lorakit.train.sampling import ShuffledBatchSampler


def one_epoch(sampler: ShuffledBatchSampler) -> list[list[int]]:
    return list(sampler)


def test_epoch_is_the_seeded_permutation_in_batches() -> None:
    sampler = ShuffledBatchSampler(10, 4, seed=3)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert one_epoch(sampler) == [expected[0:4], expected[4:8], expected[8:10]]
    assert sampler.epoch == 1 and sampler.position == 0
    second = torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    assert one_epoch(sampler) == [second[0:4], second[4:8], second[8:10]]
    assert len(sampler) == 3


def test_same_seed_same_order_other_seed_other_order() -> None:
    first = [one_epoch(ShuffledBatchSampler(50, 8, seed=1)) for _ in range(2)]
    assert first[0] == first[1]
    assert one_epoch(ShuffledBatchSampler(50, 8, seed=2)) != first[0]


def test_no_shuffle_and_drop_last() -> None:
    assert one_epoch(ShuffledBatchSampler(7, 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6]]
    sampler = ShuffledBatchSampler(7, 3, shuffle=False, drop_last=True)
    assert (one_epoch(sampler), len(sampler)) == ([[0, 1, 2], [3, 4, 5]], 2)


def test_resume_continues_at_the_next_batch() -> None:
    uninterrupted = ShuffledBatchSampler(23, 4, seed=5)
    reference = [batch for _ in range(3) for batch in uninterrupted]  # 3 epochs x 6 batches

    first_run = ShuffledBatchSampler(23, 4, seed=5)
    seen = list(itertools.islice(first_run, 4))  # stop mid-epoch 0 after 4 batches
    seen += list(first_run)  # the rest of epoch 0 from the same object
    seen += list(itertools.islice(first_run, 2))  # then 2 batches of epoch 1: "killed" here
    state = first_run.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)

    resumed = ShuffledBatchSampler(23, 4, seed=5)
    resumed.load_state_dict(state)
    seen += list(resumed) + list(resumed)  # rest of epoch 1, all of epoch 2
    assert seen == reference


def test_state_from_other_settings_is_refused() -> None:
    state = ShuffledBatchSampler(23, 4, seed=5).state_dict()
    with pytest.raises(
        SamplerStateError, match=r"batch_size: saved 4, now 8; seed: saved 5, now 0"
    ):
        ShuffledBatchSampler(23, 8, seed=0).load_state_dict(state)
    with pytest.raises(SamplerStateError, match=r"saved position 9 is outside 0\.\.6"):
        ShuffledBatchSampler(23, 4, seed=5).load_state_dict({**state, "position": 9})


@settings(max_examples=60, deadline=None)
@given(
    num_examples=st.integers(1, 40),
    batch_size=st.integers(1, 6),
    world_size=st.integers(1, 4),
    drop_last=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_ranks_together_form_the_single_process_global_batches(
    num_examples: int, batch_size: int, world_size: int, drop_last: bool, epoch: int
) -> None:
    if drop_last and num_examples < batch_size * world_size:
        with pytest.raises(ValueError, match="leaves no batch"):
            ShuffledBatchSampler(
                num_examples, batch_size, drop_last=drop_last, world_size=world_size
            )
        return
    ranks = [
        ShuffledBatchSampler(
            num_examples, batch_size, seed=11, drop_last=drop_last, rank=rank, world_size=world_size
        )
        for rank in range(world_size)
    ]
    for sampler in ranks:
        sampler.set_epoch(epoch)
    per_rank = [one_epoch(sampler) for sampler in ranks]
    # Every rank gets the same number of batches (collectives would hang otherwise) ...
    assert {len(batches) for batches in per_rank} == {len(ranks[0])}
    # ... and batch b of all ranks holds the examples of the permutation's global batch b.
    order = torch.randperm(
        num_examples, generator=torch.Generator().manual_seed(11 + epoch)
    ).tolist()
    if drop_last:
        order = order[: len(order) - len(order) % world_size]
    else:
        # padded by repeating the order from its start (cyclically when n < world_size)
        order += [order[i % num_examples] for i in range(-num_examples % world_size)]
    global_size = batch_size * world_size
    for index, rank_batches in enumerate(zip(*per_rank, strict=True)):
        expected = order[index * global_size : (index + 1) * global_size]
        assert sorted(i for batch in rank_batches for i in batch) == sorted(expected)
    covered = {i for batches in per_rank for batch in batches for i in batch}
    if not drop_last:
        assert covered == set(range(num_examples))


def test_argument_errors() -> None:
    with pytest.raises(EmptyDatasetError, match="from 0 examples"):
        ShuffledBatchSampler(0, 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ShuffledBatchSampler(3, 0)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ShuffledBatchSampler(3, 1, rank=2, world_size=2)
