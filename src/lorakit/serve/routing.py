"""Which adapters each row of the running batch uses, resolved per layer layout and cached.

A row's choice is a tuple of (adapter name, weight) pairs: () for the base, ((name, 1.0),) for
one adapter, several pairs for a blend. Every `AdapterBank` with the same layout (the same
adapters with the same ranks, in bank order) shares one `RowPlan`, built once per batch
composition: the batch changes only when rows join or leave, so decoding steps reuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.ops.gathered_lora import gathered_lora_delta, stacked_lora_delta

RowChoice = tuple[tuple[str, float], ...]
Layout = tuple[tuple[str, int], ...]
# Cost of copying one element, in multiply-adds, for choosing between the two routes.
COPY_COST = 2.0


@dataclass(frozen=True)
class RowPlan:
    """The batch's coefficients for one layout, in the two forms the routes need.

    Attributes:
        coefficients: (rows, R): row's weight on each stacked column (stacked route).
        columns: (rows, k): the columns each row gathers, padded with column 0.
        column_coefficients: (rows, k): their weights, 0 on padding (gathered route).
    """

    coefficients: torch.Tensor
    columns: torch.Tensor
    column_coefficients: torch.Tensor

    def delta(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The rows' low-rank updates for x (rows, seq, in), by the cheaper route.

        Stacked multiplies every row by all R columns; gathered copies each row's k columns
        of A and B, then multiplies by k columns only.
        """
        rows, seq, _ = x.shape
        R, k = self.coefficients.shape[1], self.columns.shape[1]
        stacked_cost = R * (rows * seq + 1)
        gathered_cost = k * (rows * seq + COPY_COST * rows)
        if stacked_cost <= gathered_cost:
            return stacked_lora_delta(x, A, B, self.coefficients)
        return gathered_lora_delta(x, A, B, self.columns, self.column_coefficients)


def build_plan(
    choices: Sequence[RowChoice], layout: Layout, dtype: torch.dtype, device: torch.device
) -> RowPlan | None:
    """Coefficients of `choices` for `layout`; None when no row uses an adapter of it."""
    offsets: dict[str, tuple[int, int]] = {}
    start = 0
    for name, r in layout:
        offsets[name] = (start, r)
        start += r
    coefficients = torch.zeros(len(choices), start, dtype=torch.float32)
    row_columns: list[list[int]] = []
    row_weights: list[list[float]] = []
    for row, choice in enumerate(choices):
        columns: list[int] = []
        weights: list[float] = []
        for name, weight in choice:
            if name in offsets:
                first, r = offsets[name]
                coefficients[row, first : first + r] = weight
                columns += range(first, first + r)
                weights += [weight] * r
        row_columns.append(columns)
        row_weights.append(weights)
    k = max(len(c) for c in row_columns) if row_columns else 0
    if k == 0:
        return None
    columns_tensor = torch.zeros(len(choices), k, dtype=torch.long)
    weights_tensor = torch.zeros(len(choices), k, dtype=torch.float32)
    for row, (columns, weights) in enumerate(zip(row_columns, row_weights, strict=True)):
        columns_tensor[row, : len(columns)] = torch.tensor(columns, dtype=torch.long)
        weights_tensor[row, : len(weights)] = torch.tensor(weights, dtype=torch.float32)
    return RowPlan(
        coefficients=coefficients.to(device, dtype),
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
        self._plans: dict[Layout, RowPlan | None] = {}

    def set_rows(self, choices: Sequence[RowChoice]) -> None:
        """Route the next forwards' rows (in batch order); keeps the plans if unchanged."""
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
