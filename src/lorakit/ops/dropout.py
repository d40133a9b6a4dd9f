"""Dropout on the LoRA branch's input: seeded masks, shared by layers that read one input.

peft draws a full-size mask per adapted layer and keeps the dropped copy of every layer's
input for backward. lorakit draws one mask per distinct input tensor per forward (q, k and v
projections read the same hidden states, so they share a mask), keeps only that mask for
backward, packed eight elements to a byte on CPU, and rebuilds the mask and the dropped input
once per group in backward.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

_INT16_SPAN = 2**16
_INT16_MIN = -(2**15)


def draw_seed() -> int:
    """Draw a fresh 62-bit seed from torch's default generator (so torch.manual_seed rules)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def drop_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Return a bool mask, True (drop) with probability p per element, fully set by `seed`.

    On CPU the bits come from numpy's SFC64 generator (several times faster than torch's
    per-element Mersenne Twister) as uniform int16 values r, four per 64-bit draw, and an
    element is dropped when r < -2^15 + round(p * 2^16): the drop probability is p to within
    2^-17 (torch's own dropout compares float32 uniforms, 2^-24). On other devices torch's own
    generator of that device is seeded with `seed`.
    """
    count = 1
    for size in shape:
        count *= size
    if device.type == "cpu":
        cutoff = round(p * _INT16_SPAN)
        if cutoff in (0, _INT16_SPAN):
            return torch.full(shape, cutoff != 0, dtype=torch.bool)
        words = np.random.SFC64(seed).random_raw((count + 3) // 4)
        draws = torch.from_numpy(words.view(np.int16)[:count]).view(shape)
        return draws <= _INT16_MIN + cutoff - 1  # every bound fits in int16
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) < p


def pack_mask(dropped: torch.Tensor) -> torch.Tensor:
    """The mask to keep for backward: 1 bit per element on CPU (uint8), as it is elsewhere.

    Packing and unpacking cost about 10 µs per 256K elements, an eighth of the bytes of a
    bool mask that would otherwise live from forward to backward.
    """
    if dropped.device.type != "cpu":
        return dropped
    return torch.from_numpy(np.packbits(dropped.numpy().reshape(-1)))


def unpack_mask(saved: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of `shape` that `pack_mask` returned `saved` for."""
    if saved.dtype == torch.bool:
        return saved.view(shape)
    count = 1
    for size in shape:
        count *= size
    bits = np.unpackbits(saved.numpy(), count=count).view(np.bool_)
    return torch.from_numpy(bits).view(shape)


class DropoutDraw(NamedTuple):
    """One dropout draw for an input x viewed as (N, in)."""

    saved_mask: torch.Tensor  # `pack_mask` of the bool (N, in) mask, True where x is zeroed
    x_kept: torch.Tensor  # (N, in): x with dropped entries zeroed, not yet rescaled
    seed: int


def new_draw(x: torch.Tensor, p: float) -> DropoutDraw:
    """Draw a fresh mask for x (..., in); the result carries no autograd history."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    seed = draw_seed()
    dropped = drop_mask(tuple(x2.shape), p, seed, x2.device)
    return DropoutDraw(pack_mask(dropped), x2.masked_fill(dropped, 0), seed)


def rebuild(
    x2: torch.Tensor, saved_mask: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask, x ⊙ keep) of a draw, from its saved mask, for backward."""
    dropped = unpack_mask(saved_mask, tuple(x2.shape))
    return dropped, x2.masked_fill(dropped, 0)


class SharedDropout:
    """Per-model memo of the last draw (forward) and the last rebuilt input (backward).

    A forward that feeds the very same tensor to several LoRA layers in a row gets one draw
    for all of them; in backward the first layer of such a group to run rebuilds the mask and
    x ⊙ keep from the saved mask and the others reuse them. Only the latest entry of each is
    held.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._source: torch.Tensor | None = None
        self._source_version = -1
        self._p = -1.0
        self._draw: DropoutDraw | None = None
        self._kept_seed: int | None = None
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def draw(self, x: torch.Tensor, p: float) -> DropoutDraw:
        """The draw for x: reused if x is the tensor the previous draw was made for."""
        if (
            self._draw is not None
            and self._source is x
            and self._source_version == x._version
            and self._p == p
        ):
            return self._draw
        draw = new_draw(x, p)
        self._source, self._source_version, self._p, self._draw = x, x._version, p, draw
        return draw

    def rebuild(
        self, x2: torch.Tensor, saved_mask: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool mask, x ⊙ keep) for backward, rebuilt once per draw."""
        if self._kept_seed == seed and self._kept is not None:
            return self._kept
        rebuilt = rebuild(x2, saved_mask, seed)
        self._kept_seed, self._kept = seed, rebuilt
        return rebuilt
