"""Which adapters each row of the running batch uses, resolved per layer layout and cached.

A row's choice is a tuple of (adapter name, weight) pairs: () for the base, ((name, 1.0),) for
one adapter, several pairs for a blend. Every `AdapterBank` with the same layout (the same
adapters on the same rows of its stacks) shares one `RowPlan`, built once per batch
composition: the batch changes only when rows join or leave, so decoding steps reuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorakit.ops.gathered_lora import (
    Slice,
    gathered_lora_delta,
    grouped_lora_add_,
    sliced_lora_add_,
    stacked_lora_delta,
)

RowChoice = tuple[tuple[str, float], ...]
# (adapter name, first row in the stacks, rank) per loaded adapter, in row order.
Layout = tuple[tuple[str, int, int], ...]
# Cost of gathering one element of A or B for a row (index_select, then batched matmuls over
# small matrices), in multiply-adds of one large product; measured on the benchmark model
# (issue 13): decoding 16 rows over 8 adapters runs faster on the stacked route.
COPY_COST = 16.0
# Cost of regrouping one token's input for the grouped route, in the same unit.
REGROUP_COST = 1.0
# Fixed cost of one slice's two products on the sliced route (calls on small matrices), in the
# same unit: with seq = 1 slices of a few rows lose to the other routes, with seq = 64 they win.
SLICE_COST = 200.0
# Cost per token of the routes that build the update apart and then add it to the output (all
# but sliced), in the same unit (measured on the benchmark model, issue 13).
ADD_COST = 5.0


@dataclass(frozen=True)
class GroupedPlan:
    """The rows regrouped per adapter, when each uses one adapter (or none) of one rank.

    Attributes:
        first: The first stacked row of the groups' span (a multiple of `rank`).
        last: One past its last row; the span holds (last - first) / rank groups.
        rank: The adapters' common rank.
        size: Rows per group (m), padded to the largest group.
        sources: (groups · size,): the batch row at each grouped position; None when the
            rows are already in that order (position p is row p, the base rows after all
            grouped ones: nothing to regroup). The scheduler keeps its rows so ordered.
        weights: (groups · size,): each position's weight on its group's adapter (0 on
            padding); None when every one is 1.
    """

    first: int
    last: int
    rank: int
    size: int
    sources: torch.Tensor | None
    weights: torch.Tensor | None

    def cost(self, rows: int, seq: int) -> float:
        """Multiply-adds per feature, plus REGROUP_COST per token for regrouping the inputs."""
        regroup = 0.0 if self.sources is None else REGROUP_COST * rows * seq
        return (self.last - self.first) * (self.size * seq + 1) + regroup

    def add_(self, y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B_t: torch.Tensor) -> None:
        """Add the rows' updates into y: the stacks' span viewed per group, no factor copied."""
        groups = (self.last - self.first) // self.rank
        A_groups = A[self.first : self.last].view(groups, self.rank, A.shape[1])
        B_groups = B_t[self.first : self.last].view(groups, self.rank, B_t.shape[1])
        if self.sources is None:  # rows in group order, base rows after them: views only
            positions = groups * self.size
            y, x = y[:positions], x[:positions]
        grouped_lora_add_(y, x, A_groups, B_groups, self.sources, self.weights)


@dataclass(frozen=True)
class RowPlan:
    """The batch's coefficients for one layout, in the two forms the routes need.

    Attributes:
        first: The first stacked column any row uses.
        last: One past the last stacked column any row uses.
        coefficients: (rows, last - first): each row's weight on those columns (stacked route).
        columns: (rows, k): the columns each row gathers, padded with column `first`.
        column_coefficients: (rows, k): their weights, 0 on padding (gathered route).
        grouped: The rows per adapter (grouped route), None when a row blends adapters of
            this layer or the adapters used differ in rank.
        slices: (first row, end row, first stacked row, rank, weight) per run of consecutive
            rows with one choice and adapter it uses (sliced route).
        sliced_rank_rows: Σ rank · rows over the slices (the sliced route's work per token).
    """

    first: int
    last: int
    coefficients: torch.Tensor
    columns: torch.Tensor
    column_coefficients: torch.Tensor
    grouped: GroupedPlan | None = None
    slices: tuple[Slice, ...] = ()
    sliced_rank_rows: int = 0
    # The route chosen per (rows, seq): every layer of one layout asks the same question.
    _routes: dict[tuple[int, int], str] = field(default_factory=dict, compare=False, repr=False)

    def route(self, rows: int, seq: int) -> str:
        """The cheapest route for x (rows, seq, in): see `add_delta_`."""
        route = self._routes.get((rows, seq))
        if route is None:
            span, k = self.last - self.first, self.columns.shape[1]
            add_cost = ADD_COST * rows * seq
            costs = {
                "stacked": span * (rows * seq + 1) + add_cost,
                "gathered": k * (rows * seq + COPY_COST * rows) + add_cost,
                "sliced": self.sliced_rank_rows * seq + SLICE_COST * len(self.slices),
            }
            # Grouped serves prefills (seq > 1) only on rows already in group order: regrouping
            # their inputs and outputs ran far slower than its cost says (12 ms against
            # sliced's 1.4 ms for 16 x 64 tokens, one layer); in order (views, one baddbmm_)
            # it beat sliced (16 x 64 over 8 adapters, mixed / one adapter's throughput: 1.018
            # against 0.992; benchmarks/probe_prefill_routes.py).
            if self.grouped is not None and (seq == 1 or self.grouped.sources is None):
                costs["grouped"] = self.grouped.cost(rows, seq)
            route = self._routes[rows, seq] = min(costs, key=costs.__getitem__)
        return route

    def add_delta_(
        self, y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B_t: torch.Tensor
    ) -> None:
        """Add the rows' low-rank updates for x (rows, seq, in) to y (rows, seq, out) in place.

        The cheapest route runs: stacked multiplies every row by the span of columns the batch
        uses (all rows on one adapter: that adapter's columns only); gathered copies each
        row's k columns of A and B, then multiplies by k columns only; grouped multiplies each
        adapter's rows by its own columns, read in place; sliced multiplies each run of rows
        sharing a choice by its adapters' columns, read in place, adding into y.
        """
        route = self.route(x.shape[0], x.shape[1])
        if route == "sliced":
            sliced_lora_add_(y, x, A, B_t, list(self.slices))
        elif route == "grouped":
            assert self.grouped is not None
            self.grouped.add_(y, x, A, B_t)
        elif route == "stacked":
            A_used, B_used = A[self.first : self.last], B_t[self.first : self.last].t()
            y.add_(stacked_lora_delta(x, A_used, B_used, self.coefficients))
        else:
            y.add_(gathered_lora_delta(x, A, B_t.t(), self.columns, self.column_coefficients))


def build_plan(
    choices: Sequence[RowChoice], layout: Layout, dtype: torch.dtype, device: torch.device
) -> RowPlan | None:
    """Coefficients of `choices` for `layout`; None when no row uses an adapter of it."""
    offsets = {name: (first, r) for name, first, r in layout}
    end = max((first + r for _, first, r in layout), default=0)
    coefficients = torch.zeros(len(choices), end, dtype=torch.float32)
    row_columns: list[list[int]] = []
    row_weights: list[list[float]] = []
    for row, choice in enumerate(choices):
        columns: list[int] = []
        weights: list[float] = []
        for name, weight in choice:
            if name in offsets:
                start_column, r = offsets[name]
                coefficients[row, start_column : start_column + r] = weight
                columns += range(start_column, start_column + r)
                weights += [weight] * r
        row_columns.append(columns)
        row_weights.append(weights)
    k = max(len(c) for c in row_columns) if row_columns else 0
    if k == 0:
        return None
    slices = _slices(choices, offsets)
    first = min(min(c) for c in row_columns if c)
    last = max(max(c) for c in row_columns if c) + 1
    columns_tensor = torch.full((len(choices), k), first, dtype=torch.long)
    weights_tensor = torch.zeros(len(choices), k, dtype=torch.float32)
    for row, (columns, weights) in enumerate(zip(row_columns, row_weights, strict=True)):
        columns_tensor[row, : len(columns)] = torch.tensor(columns, dtype=torch.long)
        weights_tensor[row, : len(weights)] = torch.tensor(weights, dtype=torch.float32)
    return RowPlan(
        first=first,
        last=last,
        coefficients=coefficients[:, first:last].contiguous().to(device, dtype),
        columns=columns_tensor.to(device),
        column_coefficients=weights_tensor.to(device, dtype),
        grouped=_grouped_plan(choices, offsets, dtype, device),
        slices=slices,
        sliced_rank_rows=sum(r * (end_row - first_row) for first_row, end_row, _, r, _ in slices),
    )


def _slices(choices: Sequence[RowChoice], offsets: dict[str, tuple[int, int]]) -> tuple[Slice, ...]:
    """The sliced route's slices: runs of consecutive rows with one choice, per adapter used.

    Adapters the layer does not have and zero weights add nothing, so they make no slice.
    """
    runs: list[tuple[int, int, RowChoice]] = []
    for row, choice in enumerate(choices):
        used = tuple((name, weight) for name, weight in choice if name in offsets and weight)
        if runs and runs[-1][2] == used:
            runs[-1] = (runs[-1][0], row + 1, used)
        else:
            runs.append((row, row + 1, used))
    return tuple(
        (first_row, end_row, *offsets[name], weight)
        for first_row, end_row, used in runs
        for name, weight in used
    )


def _grouped_plan(
    choices: Sequence[RowChoice],
    offsets: dict[str, tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device,
) -> GroupedPlan | None:
    """Rows per adapter for `offsets` (name -> first row, rank), or None when not eligible."""
    row_adapters = [[(n, w) for n, w in choice if n in offsets] for choice in choices]
    if any(len(used) > 1 for used in row_adapters):
        return None
    ranks = {offsets[used[0][0]][1] for used in row_adapters if used}
    if len(ranks) != 1:
        return None
    rank = ranks.pop()
    members: dict[int, list[int]] = {}
    for row, used in enumerate(row_adapters):
        if used:
            start = offsets[used[0][0]][0]
            if start % rank:
                return None
            members.setdefault(start // rank, []).append(row)
    first_group, last_group = min(members), max(members) + 1
    size = max(len(rows) for rows in members.values())
    sources: list[int] = []
    weights: list[float] = []
    for group in range(first_group, last_group):
        rows = members.get(group, [])
        padding = size - len(rows)
        sources += rows + [rows[0] if rows else 0] * padding
        weights += [row_adapters[row][0][1] for row in rows] + [0.0] * padding
    return GroupedPlan(
        first=first_group * rank,
        last=last_group * rank,
        rank=rank,
        size=size,
        sources=(
            None
            if sources == list(range(len(sources)))
            else torch.tensor(sources, dtype=torch.long, device=device)
        ),
        weights=(
            None
            if all(weight == 1.0 for weight in weights)
            else torch.tensor(weights, dtype=torch.float32).to(device, dtype)
        ),
    )


class BatchRouting:
    """The running batch's row choices, shared by every bank of one engine.

    The scheduler sets the rows before each forward (`set_rows`); banks ask for their plan.
    Plans are cached per layout until the rows change.
    """

    def __init__(self) -> None:
        self.choices: tuple[RowChoice, ...] = ()
        self.tokens_per_row = 1
        # Changes whenever the cached plans are dropped, so banks may keep their plan between.
        self.version = 0
        self._plans: dict[Layout, RowPlan | None] = {}
        self._stack_order: dict[str, int] = {}

    def set_stack_order(self, names_in_stack_order: Sequence[str]) -> None:
        """The loaded adapters in the order their factors sit in the stacks (see row_order_key)."""
        self._stack_order = {name: index for index, name in enumerate(names_in_stack_order)}

    def row_order_key(self, choice: RowChoice) -> tuple[int, ...]:
        """A sort key that puts rows of one adapter together, adapters in stack order, base rows
        last: the order in which the grouped route reads rows in place and the sliced route
        multiplies each adapter's rows as one slice."""
        if not choice:
            return (len(self._stack_order),)
        return tuple(
            sorted(self._stack_order.get(name, len(self._stack_order)) for name, _ in choice)
        )

    def set_rows(self, choices: Sequence[RowChoice], tokens_per_row: int) -> None:
        """Route the next forwards' rows (in batch order), each `tokens_per_row` tokens long.

        Plans are kept when the rows are unchanged.
        """
        self.tokens_per_row = tokens_per_row
        choices = tuple(choices)
        if choices != self.choices:
            self.choices = choices
            self.invalidate()

    def invalidate(self) -> None:
        """Forget the cached plans (after the banks' layouts change)."""
        self._plans = {}
        self.version += 1

    def plan(self, layout: Layout, dtype: torch.dtype, device: torch.device) -> RowPlan | None:
        """The plan for `layout`, built on first use for the current rows."""
        if layout not in self._plans:
            self._plans[layout] = build_plan(self.choices, layout, dtype, device)
        return self._plans[layout]

    def head_choice(self) -> str | None:
        """The one adapter every row uses, for saved heads (None: base rows only).

        Raises:
            AssertionError: Rows use different adapters or blends (the engine refuses those
                for saved heads before they reach a forward).
        """
        names = {choice[0][0] if choice else None for choice in self.choices}
        assert len(names) <= 1 and all(len(c) <= 1 for c in self.choices), self.choices
        return next(iter(names), None)
