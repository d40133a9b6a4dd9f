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
from lorakit.serve.routing import BatchRouting, Layout, RowPlan

# Capacity of a full bank's stacks is multiplied by this when an adapter does not fit, so a
# load copies the other adapters' factors only when the stacks grow (amortised O(1) per load).
GROWTH_FACTOR = 2


class AdapterBank(nn.Module):
    """A base layer plus the stacked factors of every adapter that adapts it.

    A (capacity, in) holds the adapters' A matrices as row segments, B_t (capacity, out) their
    (s·B)^T on the same rows; `layout` says which adapter owns which segment (name, first row,
    rank), in row order. Rows no adapter owns are zero, so their zero coefficients add exact
    zeros. A load writes only its own segment: the first free run of rows long enough (rows
    an unload freed, or the reserve); when none is, the owned rows are copied once into new
    stacks, packed, of the same rows if the free ones were only scattered, else of
    max(needed, GROWTH_FACTOR × capacity) rows. B is kept transposed so that every route reads
    rows of it.

    Args:
        base_layer: The Linear, Conv1D or QuantLinear the bank wraps.
        routing: The routing every bank of the engine reads.
        reserve_rank: Rows the stacks get at the first load (at least that adapter's rank).
    """

    def __init__(self, base_layer: nn.Module, routing: BatchRouting, reserve_rank: int = 0) -> None:
        super().__init__()
        features = module_features(base_layer)
        assert features is not None, type(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.routing = routing
        self.reserve_rank = reserve_rank
        self.layout: Layout = ()
        self.A: torch.Tensor | None = None
        self.B_t: torch.Tensor | None = None
        # The routing's plan for this layout: (routing version, layout, plan) when read.
        self._plan: tuple[int, Layout, RowPlan | None] = (-1, (), None)

    @property
    def capacity(self) -> int:
        """Rows the stacks hold, owned or free."""
        return 0 if self.A is None else self.A.shape[0]

    @property
    def used_rank(self) -> int:
        """Rows the loaded adapters own."""
        return sum(r for _, _, r in self.layout)

    def _free_start(self, r: int) -> int | None:
        """The first row of the first free run of `r` rows, or None."""
        start = 0
        for _, first, rank in self.layout:
            if first - start >= r:
                return start
            start = first + rank
        return start if self.capacity - start >= r else None

    def _make_room(self, r: int, like: torch.Tensor) -> None:
        """New stacks where `r` rows fit after the owned ones, packed in order.

        Free rows that are enough but scattered keep the capacity; too few grow it to
        max(needed, reserve, GROWTH_FACTOR × capacity): at most max(reserve, 2 × owned) after.
        """
        capacity = self.capacity
        if capacity - self.used_rank < r:
            capacity = max(self.used_rank + r, self.reserve_rank, GROWTH_FACTOR * capacity)
        self._repack(capacity, like)

    def _repack(self, capacity: int, like: torch.Tensor) -> None:
        """Stacks of `capacity` rows (zero), the owned segments copied in, packed in order."""
        A = like.new_zeros(capacity, self.in_features)
        B_t = like.new_zeros(capacity, self.out_features)
        layout, row = [], 0
        for name, start, r in self.layout:
            assert self.A is not None and self.B_t is not None
            A[row : row + r] = self.A[start : start + r]
            B_t[row : row + r] = self.B_t[start : start + r]
            layout.append((name, row, r))
            row += r
        self.A, self.B_t, self.layout = A, B_t, tuple(layout)

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Write adapter `name`'s A (r, in) and scale·B (out, r) into free rows of the stacks.

        B (float32) is scaled, transposed and cast to the stacks' dtype in one pass.
        """
        assert A.shape[1] == self.in_features and B.shape[0] == self.out_features
        r = A.shape[0]
        start = self._free_start(r)
        if start is None:
            self._make_room(r, A)
            start = self._free_start(r)
        assert start is not None and self.A is not None and self.B_t is not None
        self.A[start : start + r] = A
        torch.mul(B.t(), scale, out=self.B_t[start : start + r])
        self.layout = tuple(sorted((*self.layout, (name, start, r)), key=lambda s: s[1]))

    def remove(self, name: str) -> None:
        """Free adapter `name`'s rows for later loads (a no-op if it has none).

        The rows are zeroed in place. When the free rows then outnumber both the owned rows
        and the reserve, the stacks shrink to max(owned, reserve) rows (the owned segments
        packed in order; none left and no reserve: no stacks), so free rows never hold more
        than the loaded adapters do beyond the reserve.
        """
        segment = next((s for s in self.layout if s[0] == name), None)
        if segment is None:
            return
        assert self.A is not None and self.B_t is not None
        _, start, r = segment
        self.layout = tuple(s for s in self.layout if s[0] != name)
        if self.capacity - self.used_rank <= max(self.used_rank, self.reserve_rank):
            self.A[start : start + r] = 0
            self.B_t[start : start + r] = 0
            return
        self._compact()

    def _compact(self) -> None:
        """Stacks of max(owned, reserve) rows holding the owned segments (none: no stacks)."""
        assert self.A is not None
        capacity = max(self.used_rank, self.reserve_rank)
        if capacity == 0:
            self.A = self.B_t = None
            return
        self._repack(capacity, self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.A is None or self.B_t is None or not self.layout:
            return result
        version, layout, plan = self._plan
        if version != self.routing.version or layout is not self.layout:
            plan = self.routing.plan(self.layout, self.A.dtype, self.A.device)
            self._plan = (self.routing.version, self.layout, plan)
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
        dtype = self.A.dtype
        x3 = x.reshape(rows, -1, self.in_features)
        if x3.dtype != dtype:
            x3 = x3.to(dtype)
        # The base's fresh output takes the update in place (a copy only to change its dtype
        # or layout); (rows, seq, out) like x3.
        y = result if result.dtype == dtype else result.to(dtype)
        y = y.contiguous()
        plan.add_delta_(y.view(rows, -1, self.out_features), x3, self.A, self.B_t)
        return y if y.dtype == result.dtype else y.to(result.dtype)


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
        reserve_rank: Rows each layer bank's stacks get at its first load (see `AdapterBank`).
    """

    def __init__(
        self, modules: dict[str, nn.Module], routing: BatchRouting, reserve_rank: int = 0
    ) -> None:
        self._modules = modules
        self._routing = routing
        self._reserve_rank = reserve_rank
        self.layers: dict[str, AdapterBank] = {}
        self.heads: dict[str, HeadBank] = {}

    def add(self, weights: AdapterWeights) -> None:
        """Put an adapter's factors and saved modules in the banks of the modules it adapts."""
        name = weights.info.name
        for path, (A, B, scale) in weights.factors.items():
            if path not in self.layers:
                self.layers[path] = AdapterBank(
                    self._modules[path], self._routing, self._reserve_rank
                )
                self._install(path, self.layers[path])
            self.layers[path].add(name, A, B, scale)
        for path, state in weights.heads.items():
            if path not in self.heads:
                self.heads[path] = HeadBank(self._modules[path], self._routing)
                self._install(path, self.heads[path])
            self.heads[path].add(name, state)
        self._routing.invalidate()
        self._routing.set_stack_order(self.stack_order())

    def factor_bytes(self) -> tuple[int, int]:
        """Bytes of the layer banks' stacks: (rows adapters own, rows free or reserved)."""
        owned = free = 0
        for bank in self.layers.values():
            if bank.A is None or bank.B_t is None:
                continue
            row_bytes = (bank.in_features + bank.out_features) * bank.A.element_size()
            owned += bank.used_rank * row_bytes
            free += (bank.capacity - bank.used_rank) * row_bytes
        return owned, free

    def remove(self, name: str) -> None:
        """Take adapter `name` out of every bank."""
        for bank in self.layers.values():
            bank.remove(name)
        for head in self.heads.values():
            head.remove(name)
        self._routing.invalidate()
        self._routing.set_stack_order(self.stack_order())

    def stack_order(self) -> list[str]:
        """The adapters in the order of their rows in the stacks: each bank's layout order,
        banks taken in the order they were made (adapters of the same modules, the common
        case, share one order)."""
        names: dict[str, None] = {}
        for bank in self.layers.values():
            names.update((name, None) for name, _, _ in bank.layout)
        return list(names)

    def _install(self, path: str, module: nn.Module) -> None:
        """Put `module` in the model at `path`, in place of the original module."""
        parent_path, _, child = path.rpartition(".")
        setattr(self._modules[parent_path], child, module)
