"""The engine's adapted layers: every loaded adapter's factors stacked in one module per layer.

`AdapterBank` takes the place of a targeted Linear or transformers Conv1D (or a 4-bit
`QuantLinear`) in the engine's own copy of the base. It keeps the original module as
`base_layer` and runs y = base_layer(x) + Δy, with Δy from the rows' plan (see
`serve.routing` and `ops.gathered_lora`). `HeadBank` does the same for modules an adapter saves
whole (a classifier head): the module of the batch's adapter, or the base's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.errors import ServeError
from lorakit.serve.adapters import AdapterWeights, module_features
from lorakit.serve.routing import BatchRouting, Layout


class AdapterBank(nn.Module):
    """A base layer plus the stacked factors of every adapter that adapts it.

    A (R, in) holds the adapters' A matrices one under the other, B_t (R, out) their (s·B)^T
    likewise, in `layout` order; R is the sum of their ranks (no padding, so a loaded adapter
    costs exactly its tensors). B is kept transposed so that both routes read rows of it.
    """

    def __init__(self, base_layer: nn.Module, routing: BatchRouting) -> None:
        super().__init__()
        features = module_features(base_layer)
        assert features is not None, type(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.routing = routing
        self.layout: Layout = ()
        self.A: torch.Tensor | None = None
        self.B_t: torch.Tensor | None = None

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Stack adapter `name`'s A (r, in) and s·B (out, r) after the others."""
        assert A.shape[1] == self.in_features and B.shape[0] == self.out_features
        self.A = A if self.A is None else torch.cat([self.A, A], dim=0)
        self.B_t = B.t().contiguous() if self.B_t is None else torch.cat([self.B_t, B.t()], dim=0)
        self.layout = (*self.layout, (name, A.shape[0]))

    def remove(self, name: str) -> None:
        """Drop adapter `name`'s rows (a no-op when it does not adapt this layer)."""
        names = [n for n, _ in self.layout]
        if name not in names:
            return
        assert self.A is not None and self.B_t is not None
        index = names.index(name)
        first = sum(r for _, r in self.layout[:index])
        last = first + self.layout[index][1]
        self.layout = self.layout[:index] + self.layout[index + 1 :]
        if not self.layout:
            self.A = self.B_t = None
            return
        self.A = torch.cat([self.A[:first], self.A[last:]], dim=0)
        self.B_t = torch.cat([self.B_t[:first], self.B_t[last:]], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.A is None or self.B_t is None:
            return result
        plan = self.routing.plan(self.layout, self.A.dtype, self.A.device)
        if plan is None:
            return result
        rows = len(self.routing.choices)
        tokens = x.numel() // self.in_features
        if tokens not in (rows, rows * self.routing.tokens_per_row):
            raise ServeError(
                f"An adapted {type(self.base_layer).__name__} got {tokens} inputs for a batch "
                f"of {rows} rows of {self.routing.tokens_per_row} tokens: it sees only some of "
                "the tokens (as MoE experts do), so rows cannot be told apart. Fix: serve an "
                "adapter that does not target this module, or merge it with `lorakit merge`."
            )
        # (rows, seq, in), also from inputs flattened to (rows * seq, in), rows outermost.
        x3 = x.reshape(rows, -1, self.in_features).to(self.A.dtype)
        delta = plan.delta(x3, self.A, self.B_t.t())
        return result + delta.view(result.shape).to(result.dtype)


class HeadBank(nn.Module):
    """A module some adapters save whole (modules_to_save): the base's or the adapter's copy."""

    def __init__(self, base_layer: nn.Module, routing: BatchRouting) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.copies = nn.ModuleDict()

    def add(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Hold adapter `name`'s copy of the module, with the saved tensors."""
        module = copy.deepcopy(self.base_layer)
        module.load_state_dict(state, strict=True)
        self.copies[name] = module

    def remove(self, name: str) -> None:
        """Drop adapter `name`'s copy (a no-op when it has none)."""
        if name in self.copies:
            del self.copies[name]

    def forward(self, *args: object, **kwargs: object) -> object:
        name = self.routing.head_choice()
        module = self.copies[name] if name is not None and name in self.copies else None
        return (module or self.base_layer)(*args, **kwargs)


class ModelBanks:
    """The banks installed in one model, created on first use and kept (empty) after unloads.

    Args:
        modules: The model's modules by path, as before any bank was installed.
        routing: The routing every bank reads.
    """

    def __init__(self, modules: dict[str, nn.Module], routing: BatchRouting) -> None:
        self._modules = modules
        self._routing = routing
        self.layers: dict[str, AdapterBank] = {}
        self.heads: dict[str, HeadBank] = {}

    def add(self, weights: AdapterWeights) -> None:
        """Put an adapter's factors and saved modules in the banks of the modules it adapts."""
        name = weights.info.name
        for path, (A, B) in weights.factors.items():
            if path not in self.layers:
                self.layers[path] = AdapterBank(self._modules[path], self._routing)
                self._install(path, self.layers[path])
            self.layers[path].add(name, A, B)
        for path, state in weights.heads.items():
            if path not in self.heads:
                self.heads[path] = HeadBank(self._modules[path], self._routing)
                self._install(path, self.heads[path])
            self.heads[path].add(name, state)
        self._routing.invalidate()

    def remove(self, name: str) -> None:
        """Take adapter `name` out of every bank."""
        for bank in self.layers.values():
            bank.remove(name)
        for head in self.heads.values():
            head.remove(name)
        self._routing.invalidate()

    def _install(self, path: str, module: nn.Module) -> None:
        """Put `module` in the model at `path`, in place of the original module."""
        parent_path, _, child = path.rpartition(".")
        setattr(self._modules[parent_path], child, module)
