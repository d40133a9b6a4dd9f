"""EVA's math: an incremental SVD of a layer's inputs, its convergence, and the rank budget.

Pure tensor functions. A layer sees input rows x (n, d) batch after batch; EVA wants the top
right-singular vectors of all rows seen so far, centred (their principal directions). With
m rows seen, mean μ and the top-k SVD U diag(S) Vᵀ of the centred rows so far, a new batch X
(n rows, batch mean μ_b) is folded in by one SVD of the stacked matrix

    [ diag(S) Vᵀ ; X - μ_b ; √(m·n / (m + n)) · (μ - μ_b) ]

whose right-singular vectors are those of all m + n centred rows (the last row accounts for
the two means differing). The fraction of the total variance a component explains is
S_i² / Σ_j Σ_rows (x_j - μ_j)², the denominator kept as a running sum of squared deviations.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# The randomized SVD draws its test matrix from a generator seeded with this value (PEFT's
# seed, so both libraries find the same components), q = 2 k columns, this many iterations.
LOWRANK_SEED = 42
LOWRANK_NITER = 4


@dataclass
class IncrementalSVD:
    """The running top-k SVD of the centred rows seen so far.

    Attributes:
        n_components: k.
        count: Rows seen (m).
        mean: Their mean (d,), float64.
        squared_deviations: Σ over rows and features of (x - mean)², float64.
        components: Vᵀ (k, d): the top right-singular vectors, as rows.
        singular_values: S (k,).
        explained_variance_ratio: S² / squared_deviations (k,).
    """

    n_components: int
    count: int
    mean: torch.Tensor
    squared_deviations: torch.Tensor
    components: torch.Tensor
    singular_values: torch.Tensor
    explained_variance_ratio: torch.Tensor


def _randomized_svd(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S and Vᵀ of M from `torch.svd_lowrank(M, q=2k, niter=4)` with its draws from a
    generator seeded with `LOWRANK_SEED` (torch's own generators are restored after)."""
    devices = [M.device] if M.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(LOWRANK_SEED)
        _, S, V = torch.svd_lowrank(M, q=2 * k, niter=LOWRANK_NITER)
    return S, V.mH


def _sign_fixed(Vh: torch.Tensor) -> torch.Tensor:
    """Vᵀ with each row's largest-magnitude entry made positive (a deterministic sign, so
    consecutive batches can be compared by cosine similarity)."""
    largest = Vh.abs().argmax(dim=1)
    signs = torch.sign(Vh[torch.arange(Vh.shape[0], device=Vh.device), largest])
    return Vh * signs[:, None]


def incremental_svd_update(
    state: IncrementalSVD | None, X: torch.Tensor, n_components: int
) -> IncrementalSVD:
    """Fold the rows X (n, d) into the running SVD (`state` None: the first batch).

    The first batch is centred and decomposed in float32; later stacks hold the float64 mean
    correction and are decomposed in float64 (as PEFT does; float64 rows stay float64).

    Args:
        state: The SVD of the rows seen so far, or None.
        X: New rows (n, d); n >= n_components.
        n_components: k, the components kept.

    Returns:
        The SVD of all rows seen, k components.
    """
    X = X.detach().to(torch.float64 if X.dtype == torch.float64 else torch.float32)
    n = X.shape[0]
    batch_mean = X.sum(dim=0, dtype=torch.float64) / n  # (d,)
    batch_deviations = (X.double() - batch_mean).square().sum()
    if state is None:
        count, mean, squared_deviations = n, batch_mean, batch_deviations
        stacked = X - batch_mean.to(X.dtype)  # (n, d)
    else:
        m = state.count
        count = m + n
        mean = (m * state.mean + n * batch_mean) / count
        mean_gap = state.mean - batch_mean  # (d,)
        squared_deviations = (
            state.squared_deviations + batch_deviations + (m * n / count) * mean_gap.square().sum()
        )
        stacked = torch.vstack(
            (
                state.singular_values[:, None] * state.components,  # (k, d)
                X - X.mean(dim=0),  # (n, d)
                (m * n / count) ** 0.5 * mean_gap[None, :],  # (1, d)
            )
        )
    S, Vh = _randomized_svd(stacked, n_components)
    S, Vh = S[:n_components], _sign_fixed(Vh)[:n_components]
    return IncrementalSVD(
        n_components=n_components,
        count=count,
        mean=mean,
        squared_deviations=squared_deviations,
        components=Vh,
        singular_values=S,
        explained_variance_ratio=S.square() / squared_deviations,
    )


def converged_components(previous: torch.Tensor, current: torch.Tensor, tau: float) -> torch.Tensor:
    """Which components have settled: cos(previous_i, current_i) >= tau, (k,) bool."""
    return torch.nn.functional.cosine_similarity(current, previous, dim=1) >= tau


def distribute_ranks(
    explained_variance_ratios: Mapping[str, torch.Tensor], rank_budget: int
) -> dict[str, int]:
    """Each layer's rank: how many of the `rank_budget` largest ratios, over all layers, are
    its own (a layer whose components explain more of its inputs gets more rank).

    Ties are broken by layer order, then component order (a stable sort).

    Args:
        explained_variance_ratios: Layer name -> its ratios, largest first (at most the
            layer's largest allowed rank of them).
        rank_budget: The total rank to hand out.

    Returns:
        Layer name -> rank (0 for a layer that gets none), in the mapping's order.
    """
    names = [name for name, ratios in explained_variance_ratios.items() for _ in ratios]
    values = torch.cat([ratios.double().cpu() for ratios in explained_variance_ratios.values()])
    order = torch.argsort(values, descending=True, stable=True)
    counts = Counter(names[int(index)] for index in order[:rank_budget])
    return {name: counts.get(name, 0) for name in explained_variance_ratios}


def whitened(components: torch.Tensor, singular_values: torch.Tensor) -> torch.Tensor:
    """Vᵀ_i / √S_i for each component row i."""
    return components / singular_values.sqrt()[:, None]


def group_ranks_to_leader(ranks: dict[str, int], groups: Sequence[Sequence[str]]) -> None:
    """Within each group of layers sharing one SVD (the first is its leader), give the
    leader the largest rank (swapped with the layer that had it), in place: the leader's
    components are the ones checked for convergence."""
    for group in groups:
        leader = group[0]
        for name in group[1:]:
            if ranks[name] > ranks[leader]:
                ranks[name], ranks[leader] = ranks[leader], ranks[name]
