"""Deterministic, resumable, shardable batches of example indices.

Epoch ``e`` shuffles with a generator seeded by ``seed + e``, so the order depends only on the
seed and the epoch, never on earlier runs or global RNG state. The sampler counts the batches it
has handed out; ``state_dict()`` saves (epoch, position) and ``load_state_dict()`` restores them,
so a resumed run continues at the very next batch.

Sharding for distributed training: each epoch's order is split round-robin, rank ``r`` taking
positions ``r, r + world_size, ...``. Batch ``b`` of all ranks together is then exactly batch
``b`` of a single process with ``batch_size * world_size``: the same global batches. Without
``drop_last`` the order is padded by repeating its first indices so that every rank gets the
same number of batches (a rank with fewer batches would hang collective operations).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lorakit.train.data_errors import EmptyDatasetError, SamplerStateError

# Settings that must match for a saved position to mean the same batches.
_FIXED_SETTINGS = ("num_examples", "batch_size", "seed", "shuffle", "drop_last", "world_size")


class ShuffledBatchSampler:
    """Yields lists of example indices, one list per batch, resuming where it stopped.

    Iterating runs the rest of the current epoch; when it ends, the sampler moves to the next
    epoch. A training loop is ``for epoch in range(sampler.epoch, epochs): for batch in
    sampler: ...``.

    Args:
        num_examples: Size of the dataset.
        batch_size: Examples per batch on this rank.
        seed: Seed of the shuffle.
        shuffle: Shuffle each epoch (evaluation uses ``False``).
        drop_last: Drop the last incomplete batch (and, when sharding, the tail that does not
            divide by ``world_size``).
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of processes sharing the data.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_examples < 1:
            raise EmptyDatasetError(f"cannot sample batches from {num_examples} examples.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}."
            )
        if drop_last and num_examples < batch_size * world_size:
            raise ValueError(
                f"drop_last with {num_examples} examples and batch_size {batch_size} x "
                f"world_size {world_size} leaves no batch; lower batch_size or set drop_last=False."
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's example indices for ``epoch``, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = list(range(self.num_examples))
        if self.drop_last:
            order = order[: len(order) - len(order) % self.world_size]
        else:
            shortfall = -len(order) % self.world_size
            order += [order[index % len(order)] for index in range(shortfall)]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = self._per_rank_count()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _per_rank_count(self) -> int:
        if self.drop_last:
            return self.num_examples // self.world_size
        return -(-self.num_examples // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        batch_count = len(self)
        while self.position < batch_count:
            start = self.position * self.batch_size
            self.position += 1
            yield order[start : start + self.batch_size]
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, batches handed out) and the settings it depends on."""
        settings = {name: getattr(self, name) for name in _FIXED_SETTINGS}
        return {"epoch": self.epoch, "position": self.position, **settings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position.

        Any rank may load any rank's state: epoch and position are the same on all ranks.

        Raises:
            SamplerStateError: The state was saved with other data size, batch size, seed,
                shuffle, drop_last or world size, so its position would mean other batches.
        """
        differences = [
            f"{name}: saved {state.get(name)!r}, now {getattr(self, name)!r}"
            for name in _FIXED_SETTINGS
            if state.get(name) != getattr(self, name)
        ]
        if differences:
            raise SamplerStateError(
                "the sampler state was saved with other settings, so resuming would not "
                f"continue at the same batch ({'; '.join(differences)}). Resume with the "
                "original data and settings, or start a new run."
            )
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise SamplerStateError(
                f"saved position {position} is outside 0..{len(self)} batches per epoch."
            )
        self.epoch, self.position = int(state["epoch"]), position
