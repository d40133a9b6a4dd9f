"""Frozen `nn.Linear` modules that no adapter wraps, run on the faster frozen product.

The modules a LoRA model leaves alone (an LM head, the projections outside `target_modules`)
are frozen, yet `nn.Linear` runs them through MKL's sgemm, which is up to 1.5x slower on CPU
than the oneDNN product lorakit uses for adapted bases (`ops.frozen_linear`). A
`FrozenLinear` is that same module with only its class changed: parameters, hooks, paths and
state-dict keys stay as they are, and its forward falls back to `F.linear` whenever its weight
or bias requires grad, under autocast and while compiling. `PeftModel` puts these in place at
every injection and takes them out again before the next one and on unload, so wrappers always
see, and users always get back, plain `nn.Linear` modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..ops.frozen_linear import linear_with_frozen_weight


class FrozenLinear(nn.Linear):
    """An `nn.Linear` whose product runs through `ops.frozen_linear` while it is frozen."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_with_frozen_weight(input, self.weight, self.bias)


def use_frozen_linears(model: nn.Module, keep: Iterable[nn.Module] = ()) -> None:
    """Make every plain `nn.Linear` in `model` a `FrozenLinear`, in place, except the modules
    in `keep` and everything inside them (wrappers, which run their base modules themselves)."""
    skipped = {id(inner) for outer in keep for inner in outer.modules()}
    for module in model.modules():
        if type(module) is nn.Linear and id(module) not in skipped:
            module.__class__ = FrozenLinear


def restore_linears(model: nn.Module) -> list[nn.Module]:
    """Give every `FrozenLinear` in `model` its `nn.Linear` class back, in place.

    Returns:
        The modules that changed class.
    """
    restored: list[nn.Module] = [m for m in model.modules() if type(m) is FrozenLinear]
    for module in restored:
        module.__class__ = nn.Linear
    return restored


@contextmanager
def linears_restored(model: nn.Module) -> Iterator[None]:
    """`model` without `FrozenLinear` modules inside the block; if the block raises, the same
    modules become `FrozenLinear` again (a failed injection leaves the model as it was)."""
    restored = restore_linears(model)
    try:
        yield
    except BaseException:
        for module in restored:
            module.__class__ = FrozenLinear
        raise
