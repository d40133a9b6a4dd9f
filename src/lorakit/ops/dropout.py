"""Dropout keep-masks that can be regenerated from a seed instead of being stored.

A LoRA layer needs the dropped input twice: in forward (for u = drop(x) A^T) and in backward
(for dA = du^T drop(x)). Storing it costs a full copy of every adapted layer's input; storing
a seed costs nothing, and regenerating the mask is cheap with a counter-free bit generator.
"""

from __future__ import annotations

import numpy as np
import torch

_INT32_SPAN = 2**32
_INT32_MIN = -(2**31)


def draw_seed() -> int:
    """Draw a fresh 62-bit seed from torch's default generator (so torch.manual_seed rules)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def drop_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Return a bool mask, True (drop) with probability p per element, fully set by `seed`.

    On CPU the bits come from numpy's SFC64 generator (several times faster than torch's
    per-element Mersenne Twister) as uniform int32 values r, and an element is dropped when
    r < -2^31 + round(p * 2^32): the drop probability is p to within 2^-33.
    On other devices torch's own generator of that device is seeded with `seed`.
    """
    count = 1
    for size in shape:
        count *= size
    if device.type == "cpu":
        words = np.random.SFC64(seed).random_raw((count + 1) // 2)
        draws = torch.from_numpy(words.view(np.int32)[:count]).view(shape)
        threshold = _INT32_MIN + round(p * _INT32_SPAN)
        return draws < threshold
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) < p
