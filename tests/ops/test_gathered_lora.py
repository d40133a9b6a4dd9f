"""ops.gathered_lora: both routes equal Σ_i w_i s_i B_i A_i x per row, by hand in float64."""

from __future__ import annotations

import torch

from lorakit.ops.gathered_lora import (
    gathered_lora_delta,
    grouped_lora_add_,
    stacked_lora_delta,
)

EXACT_ATOL = 1e-10  # float64, sums of a few dozen products


def test_stacked_and_gathered_routes_equal_the_per_row_sum_of_adapter_updates() -> None:
    generator = torch.Generator().manual_seed(0)
    ranks, scales, n_in, n_out = [2, 5, 3], [0.5, 2.0, 1.25], 7, 6
    As = [torch.randn(r, n_in, generator=generator, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(n_out, r, generator=generator, dtype=torch.float64) for r in ranks]
    A = torch.cat(As)  # (10, in)
    B = torch.cat([s * b for s, b in zip(scales, Bs, strict=True)], dim=1)  # (out, 10)
    offsets = [0, 2, 7]
    # rows: adapter 1; a blend 0.7·a0 - 0.4·a2; the base; adapter 2 with weight 1.
    choices = [{1: 1.0}, {0: 0.7, 2: -0.4}, {}, {2: 1.0}]
    x = torch.randn(len(choices), 4, n_in, generator=generator, dtype=torch.float64)
    coefficients = torch.zeros(len(choices), A.shape[0], dtype=torch.float64)
    k = max(sum(ranks[i] for i in choice) for choice in choices)
    columns = torch.zeros(len(choices), k, dtype=torch.long)
    column_coefficients = torch.zeros(len(choices), k, dtype=torch.float64)
    for row, choice in enumerate(choices):
        used = []
        for i, weight in choice.items():
            span = list(range(offsets[i], offsets[i] + ranks[i]))
            coefficients[row, span] = weight
            used += [(c, weight) for c in span]
        for j, (column, weight) in enumerate(used):
            columns[row, j], column_coefficients[row, j] = column, weight
    expected = torch.zeros(len(choices), 4, n_out, dtype=torch.float64)
    for row, choice in enumerate(choices):
        for i, weight in choice.items():
            expected[row] += weight * scales[i] * x[row] @ (Bs[i] @ As[i]).t()
    stacked = stacked_lora_delta(x, A, B, coefficients)
    gathered = gathered_lora_delta(x, A, B, columns, column_coefficients)
    assert (stacked - expected).abs().max() < EXACT_ATOL
    assert (gathered - expected).abs().max() < EXACT_ATOL
    assert torch.equal(stacked[2], torch.zeros(4, n_out, dtype=torch.float64))
    assert expected[0].abs().max() > 0.1


def test_grouped_route_adds_each_rows_adapter_update_and_leaves_base_rows_alone() -> None:
    generator = torch.Generator().manual_seed(1)
    n, r, n_in, n_out, seq = 3, 4, 7, 5, 2
    A = torch.randn(n, r, n_in, generator=generator, dtype=torch.float64)
    B_t = torch.randn(n, r, n_out, generator=generator, dtype=torch.float64)
    # rows: group 2; base; group 0 weight 0.5; group 2 weight -1.5; group 0. Group 1 unused.
    groups, weights = [2, None, 0, 2, 0], [1.0, 0.0, 0.5, -1.5, 1.0]
    x = torch.randn(len(groups), seq, n_in, generator=generator, dtype=torch.float64)
    y = torch.randn(len(groups), seq, n_out, generator=generator, dtype=torch.float64)
    size = 2  # the largest group
    # Group 0: rows 2, 4; group 1 (unused): padding repeating row 0; group 2: rows 0, 3.
    sources = torch.tensor([2, 4, 0, 0, 0, 3])
    position_weights = torch.tensor([0.5, 1.0, 0.0, 0.0, 1.0, -1.5], dtype=torch.float64)
    got = y.clone()
    grouped_lora_add_(got, x, A, B_t, sources, position_weights)
    assert sources.numel() == n * size
    for row, group in enumerate(groups):
        if group is None:
            assert torch.equal(got[row], y[row])
            continue
        expected = weights[row] * x[row] @ A[group].t() @ B_t[group]
        assert (got[row] - y[row] - expected).abs().max() < EXACT_ATOL
        assert expected.abs().max() > 0.1


def test_grouped_route_on_rows_already_in_group_order_adds_in_place() -> None:
    generator = torch.Generator().manual_seed(2)
    n, r, n_in, n_out, seq = 3, 4, 7, 5, 1
    A = torch.randn(n, r, n_in, generator=generator, dtype=torch.float64)
    B_t = torch.randn(n, r, n_out, generator=generator, dtype=torch.float64)
    x = torch.randn(2 * n, seq, n_in, generator=generator, dtype=torch.float64)
    y = torch.randn(2 * n, seq, n_out, generator=generator, dtype=torch.float64)
    got = y.clone()
    storage = got.data_ptr()
    grouped_lora_add_(got, x, A, B_t, None, None)  # rows 2g and 2g + 1 on group g, weight 1
    assert got.data_ptr() == storage
    for row in range(2 * n):
        expected = x[row] @ A[row // 2].t() @ B_t[row // 2]
        assert (got[row] - y[row] - expected).abs().max() < EXACT_ATOL
