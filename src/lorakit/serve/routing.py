"""Which adapters each row of the running batch uses, resolved per layer layout and cached.

A row's choice is a tuple of (adapter name, weight) pairs: () for the base, ((name, 1.0),) for
one adapter, several pairs for a blend. Every `AdapterBank` with the same layout (the same
adapters on the same rows of its stacks) shares one `RowPlan`, built once per batch
composition: the batch changes only when rows join or leave, so decoding steps reuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.ops.gathered_lora import gathered_lora_delta, stacked_lora_delta

RowChoice = tuple[tuple[str, float], ...]
# (adapter name, first row in the stacks, rank) per loaded adapter, in row order.
Layout = tuple[tuple[str, int, int], ...]
# Cost of gathering one element of A or B for a row (index_select, then batched matmuls over
# small matrices), in multiply-adds of one large product; measured on the benchmark model
# (issue 13): decoding 16 rows over 8 adapters runs faster on the stacked route.
COPY_COST = 16.0


@dataclass(frozen=True)
class RowPlan:
    """The batch's coefficients for one layout, in the two forms the routes need.

    Attributes:
        first: The first stacked column any row uses.
        last: One past the last stacked column any row uses.
        coefficients: (rows, last - first): each row's weight on those columns (stacked route).
        columns: (rows, k): the columns each row gathers, padded with column `first`.
        column_coefficients: (rows, k): their weights, 0 on padding (gathered route).
    """

    first: int
    last: int
    coefficients: torch.Tensor
    columns: torch.Tensor
    column_coefficients: torch.Tensor

    def delta(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The rows' low-rank updates for x (rows, seq, in), by the cheaper route.

        Stacked multiplies every row by the span of columns the batch uses (all rows on one
        adapter: that adapter's columns only); gathered copies each row's k columns of A and
        B, then multiplies by k columns only.
        """
        rows, seq, _ = x.shape
        span, k = self.last - self.first, self.columns.shape[1]
        stacked_cost = span * (rows * seq + 1)
        gathered_cost = k * (rows * seq + COPY_COST * rows)
        if stacked_cost <= gathered_cost:
            A_used, B_used = A[self.first : self.last], B[:, self.first : self.last]
            return stacked_lora_delta(x, A_used, B_used, self.coefficients)
        return gathered_lora_delta(x, A, B, self.columns, self.column_coefficients)


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
    )


class BatchRouting:
    """The running batch's row choices, shared by every bank of one engine.

    The scheduler sets the rows before each forward (`set_rows`); banks ask for their plan.
    Plans are cached per layout until the rows change.
    """

    def __init__(self) -> None:
        self.choices: tuple[RowChoice, ...] = ()
        self.tokens_per_row = 1
        self._plans: dict[Layout, RowPlan | None] = {}

    def set_rows(self, choices: Sequence[RowChoice], tokens_per_row: int) -> None:
        """Route the next forwards' rows (in batch order), each `tokens_per_row` tokens long.

        Plans are kept when the rows are unchanged.
        """
        self.tokens_per_row = tokens_per_row
        choices = tuple(choices)
        if choices != self.choices:
            self.choices = choices
            self._plans = {}

    def invalidate(self) -> None:
        """Forget the cached plans (after the banks' layouts change)."""
        self._plans = {}

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
