"""The running batch's KV cache: every row's keys and values, left-padded to one length.

transformers' `DynamicCache` holds (rows, heads, length, head_dim) per layer. Rows of different
lengths share it left-padded, with a 0/1 attention mask (rows, length) marking real positions:
transformers masks a padded position's score (its attention weight underflows to exactly 0),
so padding adds nothing to a row's attention, and each row keeps its own position ids. Rows
join (their prefill's cache is padded to the common length) and leave (their rows are dropped,
then the columns no row uses any more are cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the position dimension (-2 for keys/values, -1 for masks) on the left to `length`."""
    missing = length - tensor.shape[-2 if tensor.dim() == 4 else -1]
    if missing == 0:
        return tensor
    if tensor.dim() == 4:
        return F.pad(tensor, (0, 0, missing, 0))
    return F.pad(tensor, (missing, 0))


class BatchCache:
    """Keys, values and attention mask of the running rows, in batch order."""

    def __init__(self, cache_class: Any) -> None:
        self._cache_class = cache_class
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (rows, length), 1 on real positions

    @property
    def rows(self) -> int:
        """Rows held."""
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        """Positions per row, padding included."""
        return 0 if self.mask is None else self.mask.shape[1]

    def positions(self) -> torch.Tensor:
        """(rows, 1): each row's next position id (its number of real positions)."""
        assert self.mask is not None
        return self.mask.sum(dim=1, keepdim=True)

    def step_mask(self) -> torch.Tensor:
        """(rows, length + 1): the mask for a forward of one new token per row."""
        assert self.mask is not None
        return F.pad(self.mask, (0, 1), value=1)

    def advance(self) -> None:
        """Record the position the last one-token forward appended to every row."""
        self.mask = self.step_mask()

    def add_rows(self, cache: Any, mask: torch.Tensor) -> None:
        """Append rows from a prefill's cache and mask (rows_new, length_new)."""
        if self.mask is None:
            self.cache, self.mask = cache, mask
            return
        length = max(self.length, mask.shape[1])
        joined = [
            (
                torch.cat([_pad_left(k_old, length), _pad_left(k_new, length)]),
                torch.cat([_pad_left(v_old, length), _pad_left(v_new, length)]),
            )
            for (k_old, v_old), (k_new, v_new) in zip(
                _layer_tensors(self.cache), _layer_tensors(cache), strict=True
            )
        ]
        self.cache = self._cache_class(ddp_cache_data=joined)
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(mask, length)])

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order); cut leading columns no remaining row uses."""
        if self.mask is None:
            return
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int((mask.sum(dim=0) > 0).nonzero()[0])
        kept = [
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
            for k, v in _layer_tensors(self.cache)
        ]
        self.cache = self._cache_class(ddp_cache_data=kept)
        self.mask = mask[:, first:]
