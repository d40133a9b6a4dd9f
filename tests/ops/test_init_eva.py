"""ops.init_eva against the hand computation in float64: the incremental SVD equals one SVD of
every row seen, centred; the rank budget goes to the largest explained-variance ratios."""

from __future__ import annotations

import torch

from lorakit.ops.init_eva import (
    converged_components,
    distribute_ranks,
    group_ranks_to_leader,
    incremental_svd_update,
    whitened,
)

# float64 SVDs of a 6-column matrix: agreement to rounding of values of order 1.
EXACT_TOL = 1e-10


def _rows(seed: int, n: int, d: int = 6) -> torch.Tensor:
    """Rows on a 3-dimensional affine subspace: keeping 3 components loses nothing, so the
    incremental SVD is exact."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(9)))[0]
    scales = torch.tensor([3.0, 1.5, 0.5], dtype=torch.float64)  # distinct singular values
    Z = torch.randn(n, 3, generator=generator, dtype=torch.float64) * scales
    return Z @ basis.t().double() + 0.7


def test_incremental_svd_equals_one_svd_of_all_centred_rows() -> None:
    batches = [_rows(0, 9), _rows(1, 7), _rows(2, 11)]
    state = None
    for batch in batches:
        state = incremental_svd_update(state, batch, n_components=3)  # q = 2k = d: exact
    assert state is not None
    rows = torch.cat(batches)
    centred = rows - rows.mean(dim=0)
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    # sign: each component's largest-magnitude entry is positive
    largest = Vh.abs().argmax(dim=1)
    Vh = Vh * torch.sign(Vh[torch.arange(6), largest])[:, None]
    assert state.count == 27
    torch.testing.assert_close(state.mean, rows.mean(dim=0), atol=EXACT_TOL, rtol=0)
    torch.testing.assert_close(state.components, Vh[:3], atol=EXACT_TOL, rtol=0)
    torch.testing.assert_close(state.singular_values, S[:3], atol=EXACT_TOL, rtol=0)
    total = centred.square().sum()
    torch.testing.assert_close(
        state.explained_variance_ratio, S[:3].square() / total, atol=EXACT_TOL, rtol=0
    )


def test_first_batch_of_float32_rows_is_decomposed_in_float32() -> None:
    state = incremental_svd_update(None, _rows(0, 9).float(), n_components=2)
    assert state.components.dtype == torch.float32


def test_converged_components_compare_cosine_similarity_with_tau() -> None:
    previous = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    angle = torch.tensor(0.2, dtype=torch.float64)  # cos 0.2 = 0.980
    current = torch.stack(
        [torch.stack([angle.cos(), angle.sin()]), torch.tensor([0.0, -1.0], dtype=torch.float64)]
    )
    assert converged_components(previous, current, tau=0.98).tolist() == [True, False]
    assert converged_components(previous, current, tau=0.99).tolist() == [False, False]


def test_distribute_ranks_gives_the_budget_to_the_largest_ratios() -> None:
    ratios = {
        "a": torch.tensor([0.5, 0.2, 0.01]),
        "b": torch.tensor([0.4, 0.3, 0.25]),
        "c": torch.tensor([0.05]),
    }
    # the 4 largest: 0.5 (a), 0.4 (b), 0.3 (b), 0.25 (b)
    assert distribute_ranks(ratios, 4) == {"a": 1, "b": 3, "c": 0}
    # ties break by layer order: "x" before "y"
    tied = {"x": torch.tensor([0.3, 0.1]), "y": torch.tensor([0.3, 0.1])}
    assert distribute_ranks(tied, 3) == {"x": 2, "y": 1}


def test_group_leader_gets_the_largest_rank_of_its_group() -> None:
    ranks = {"q": 1, "k": 3, "v": 2, "up": 4}
    group_ranks_to_leader(ranks, [["q", "k", "v"], ["up"]])
    assert ranks == {"q": 3, "k": 1, "v": 2, "up": 4}


def test_whitened_divides_each_component_by_the_root_of_its_singular_value() -> None:
    components = torch.tensor([[0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)
    S = torch.tensor([4.0, 0.25], dtype=torch.float64)
    expected = torch.tensor([[0.3, 0.4], [1.6, -1.2]], dtype=torch.float64)
    torch.testing.assert_close(whitened(components, S), expected, atol=EXACT_TOL, rtol=0)
