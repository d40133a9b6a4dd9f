"""Combining the LoRA adapters of one layer into one adapter (linear, cat, SVD, TIES, DARE).

Adapter i of a layer is (A_i, B_i, scale_i) with ΔW_i = scale_i · B_i A_i, and the user gives it a
weight w_i. Every function returns the factors (A, B) of one new adapter with the weights and
scales folded in, so the caller gives the new adapter the scale `COMBINED_ADAPTER_SCALE` (1.0):
peft 0.21.2 does the same by setting `r = lora_alpha = new rank` (which is 1.0 only without
rsLoRA; under rsLoRA peft's new adapter is off by sqrt(rank), a slip lorakit must not copy).

Families (peft's meanings, observed on peft 0.21.2):
- factors (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): equal ranks; A and B
  are merged entry by entry, each with weights c_i = sqrt(|w_i scale_i|) (A's carry the sign of
  w_i scale_i). Only approximate: the product has cross terms B_j A_i.
- `cat`: ranks add up; ΔW = Σ w_i ΔW_i exactly.
- svd (`svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`): merge the
  dense ΔW_i with the rule, then keep the best rank-k factors of the result.

Layouts: A_i is (r_i, *in_shape) and B_i is (out, r_i, 1, ...): the rank is dim 0 of A and dim 1
of B. Linear: A (r, in), B (out, r). Embedding: lora_embedding_A (r, num_embeddings),
lora_embedding_B (dim, r). Conv: A (r, in, *kernel), B (out, r, 1, ...). The math runs on the
2-D views A (r, in·prod(kernel)) and B (out, r), where ΔW = B @ A, and results come back in the
input layout. Random draws (DARE) come from `generator`, or from torch's global generator when
None; they are taken in peft's order (A's then B's, or the ΔW_i; embedding ΔW_i transposed, see
combine_svd), so a caller visiting the layers in module order after seeding torch as before
peft's call gets peft's masks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

MergeRule = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
MajoritySignMethod = Literal["total", "frequency"]
CombinationType = Literal[
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
# a merge rule bound to its options: (task tensors T_i, weights w_i) -> merged tensor
Merge = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]
_Family = Literal["factors", "cat", "svd"]
_Pruning = Literal["none", "magnitude", "random"]

COMBINATION_TYPES: tuple[str, ...] = get_args(CombinationType)
MERGE_RULES: tuple[str, ...] = get_args(MergeRule)
MAJORITY_SIGN_METHODS: tuple[str, ...] = get_args(MajoritySignMethod)
# Every combination folds w_i and scale_i into the factors: the new adapter's ΔW is B @ A.
COMBINED_ADAPTER_SCALE = 1.0

# merge rule -> (how each task tensor is pruned, whether signs are elected before merging)
_RULE_STEPS: dict[str, tuple[_Pruning, bool]] = {
    "linear": ("none", False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "magnitude_prune": ("magnitude", False),
}
# combination type -> (family, merge rule)
_COMBINATIONS: dict[str, tuple[_Family, MergeRule]] = {
    "linear": ("factors", "linear"),
    "ties": ("factors", "ties"),
    "dare_linear": ("factors", "dare_linear"),
    "dare_ties": ("factors", "dare_ties"),
    "magnitude_prune": ("factors", "magnitude_prune"),
    "cat": ("cat", "linear"),
    "svd": ("svd", "linear"),
    "ties_svd": ("svd", "ties"),
    "dare_linear_svd": ("svd", "dare_linear"),
    "dare_ties_svd": ("svd", "dare_ties"),
    "magnitude_prune_svd": ("svd", "magnitude_prune"),
}
# majority sign method -> per-entry score whose sign is elected, over stacked T (n, ...)
_SIGN_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "total": lambda T: T.sum(dim=0),
    "frequency": lambda T: T.sign().sum(dim=0),
}


def prune_magnitude(T: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density · numel) entries of T largest in |T|; zero the others.

    TIES' trim step: out_j = T_j if |T_j| is among the k largest, else 0 (ties between equal
    magnitudes are broken by `torch.topk`).

    Raises:
        ValueError: density outside [0, 1].
    """
    _check_density(density, "magnitude pruning")
    k = int(density * T.numel())
    flat = T.reshape(-1)
    is_kept = torch.zeros(flat.shape, dtype=torch.bool, device=T.device)
    is_kept[flat.abs().topk(k).indices] = True
    return torch.where(is_kept, flat, torch.zeros_like(flat)).reshape(T.shape)


def prune_random(
    T: torch.Tensor,
    density: float,
    *,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE's drop and rescale: out = T ⊙ m / density, with m_j ~ Bernoulli(density) i.i.d.

    Rescaling keeps E[out] = T; without it, out = T ⊙ m. The mask is drawn by `torch.bernoulli`
    on a tensor of T's dtype and device from `generator` (which must live on T's device), or
    from torch's global generator when None.

    Raises:
        ValueError: density outside [0, 1], or density 0 with rescale (division by zero).
    """
    _check_density(density, "random pruning", is_rescaled=rescale)
    probability = torch.full(T.shape, density, dtype=T.dtype, device=T.device)  # contiguous
    mask = torch.bernoulli(probability, generator=generator)
    return T * mask / density if rescale else T * mask


def elect_sign(T: torch.Tensor, method: MajoritySignMethod = "total") -> torch.Tensor:
    """Majority sign per entry of the task tensors stacked on dim 0 (TIES' elect step).

    total: γ = sign(Σ_i T_i); frequency: γ = sign(Σ_i sign(T_i)); a score of 0 elects +1.
    Returns γ of shape T.shape[1:], entries ±1 in T's dtype.

    Raises:
        ValueError: unknown method.
    """
    _check_sign_method(method)
    score = _SIGN_SCORES[method](T)
    return torch.where(score >= 0, 1.0, -1.0).to(T.dtype)


def disjoint_merge(T: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the task tensors whose sign agrees with the elected one (TIES' merge).

    out = Σ_i w_i T_i [sign(T_i) = γ] / max(1, Σ_i [sign(T_i) = γ]), with T stacked on dim 0,
    weights w of shape (n,) and γ = `sign`. Agreement is judged on the unweighted T_i, as peft
    does, so a negative w_i subtracts an adapter's agreeing entries.
    """
    is_agreeing = T.sign() == sign  # (n, ...)
    w = weights.to(T.dtype).reshape(-1, *([1] * (T.dim() - 1)))
    total = (w * T * is_agreeing).sum(dim=0)
    return total / is_agreeing.sum(dim=0).clamp(min=1)


def merge_tensors(
    T: Sequence[torch.Tensor],
    weights: Sequence[float],
    rule: MergeRule = "linear",
    *,
    density: float | None = None,
    majority_sign_method: MajoritySignMethod = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge same-shaped task tensors T_i with weights w_i by one of peft's merge rules.

    linear: Σ w_i T_i. magnitude_prune: Σ w_i prune_magnitude(T_i). dare_linear:
    Σ w_i prune_random(T_i). ties / dare_ties: P_i = prune_magnitude(T_i) / prune_random(T_i),
    then disjoint_merge(P, w, elect_sign(P)). Random masks are drawn for T_0, T_1, ... in order.

    Raises:
        ValueError: unknown rule or sign method, density missing or outside [0, 1], lengths or
            shapes that differ.
    """
    _check_rule(rule, density, majority_sign_method)
    if len(T) != len(weights) or len(T) == 0:
        raise ValueError(
            f"merge_tensors got {len(T)} tensors and {len(weights)} weights; pass one weight "
            "per tensor and at least one tensor."
        )
    shapes = [tuple(t.shape) for t in T]
    if len(set(shapes)) != 1:
        raise ValueError(f"merge_tensors needs tensors of one shape, got shapes {shapes}.")
    pruning, elects_sign = _RULE_STEPS[rule]
    P = torch.stack([_prune(t, pruning, density, generator) for t in T])  # (n, ...)
    w = torch.tensor(list(weights), dtype=P.dtype, device=P.device)
    if elects_sign:
        return disjoint_merge(P, w, elect_sign(P, majority_sign_method))
    return (w.reshape(-1, *([1] * (P.dim() - 1))) * P).sum(dim=0)


def factorize_svd(
    delta: torch.Tensor,
    rank: int,
    *,
    clamp: float | None = None,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of a 2-D ΔW (Eckart–Young): ΔW ≈ B @ A, B = U_k diag(S_k), A = Vh_k.

    ΔW = U diag(S) Vh is the reduced SVD. With clamp = q (peft's svd_clamp), h is the q-quantile
    of all entries of B and A together and both are clamped to [-h, h]. When k exceeds
    min(out, in), A and B are padded with zero rows/columns to rank k (ΔW is then exact), so
    every layer of the new adapter has the rank its config states. The SVD runs in at least
    float32 (half precision has no SVD on CPU); A (k, in) and B (out, k) come back in ΔW's dtype.

    Raises:
        ValueError: rank below 1, clamp outside [0, 1], or delta not 2-D.
    """
    _check_svd_options(rank, clamp)
    if delta.dim() != 2:
        raise ValueError(
            f"factorize_svd needs a 2-D ΔW, got shape {tuple(delta.shape)}; flatten conv "
            "kernels to (out, in·prod(kernel)) first."
        )
    work = delta.to(torch.promote_types(delta.dtype, torch.float32))
    U, S, Vh = torch.linalg.svd(work, full_matrices=False, driver=driver)
    kept = min(rank, S.shape[0])
    B = U[:, :kept] * S[:kept]  # (out, kept): U_k diag(S_k)
    A = Vh[:kept]  # (kept, in)
    if clamp is not None:
        h = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-h, h), A.clamp(-h, h)
    if kept < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - kept)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - kept, A.shape[1])], dim=0)
    return A.to(delta.dtype), B.to(delta.dtype)


def combine_factors(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scale: Sequence[float],
    weights: Sequence[float],
    merge: Merge = merge_tensors,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the factors themselves (peft's linear, ties, dare_*, magnitude_prune); equal ranks.

    With c_i = sqrt(|w_i scale_i|) and σ_i = sign(w_i scale_i): A = merge({A_i}, {σ_i c_i}),
    then B = merge({B_i}, {c_i}). `merge` is merge_tensors (linear) or a partial of it with
    another rule. For linear, B @ A = Σ_i Σ_j σ_i c_i c_j B_j A_i: the i = j terms are
    w_i ΔW_i, the cross terms make it an approximation (cat and svd give Σ w_i ΔW_i).

    Raises:
        ValueError: ranks that differ, bad lengths or shapes, or an error of `merge`.
    """
    _check_adapters(A, B, scale, weights)
    ranks = [a.shape[0] for a in A]
    if len(set(ranks)) != 1:
        raise ValueError(
            f"merging the factors needs adapters of equal rank, got ranks {ranks}; use "
            "combination_type 'cat' or 'svd' (or a '*_svd' rule) for different ranks."
        )
    dtype = _common_dtype(A, B)
    root = [math.sqrt(abs(w * s)) for w, s in zip(weights, scale, strict=True)]
    signed_root = [math.copysign(c, w * s) for c, w, s in zip(root, weights, scale, strict=True)]
    A_new = merge([a.to(dtype) for a in A], signed_root)  # A's random masks are drawn first
    B_new = merge([b.to(dtype) for b in B], root)
    return A_new, B_new


def combine_cat(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scale: Sequence[float],
    weights: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the adapters along the rank: B @ A = Σ_i w_i scale_i B_i A_i exactly.

    A = [w_0 scale_0 A_0; w_1 scale_1 A_1; ...] (rank Σ r_i on dim 0), B = [B_0, B_1, ...] on
    dim 1 (the weights go into A, as in peft's files).

    Raises:
        ValueError: bad lengths or shapes.
    """
    _check_adapters(A, B, scale, weights)
    dtype = _common_dtype(A, B)
    scaled = [a.to(dtype) * (w * s) for a, w, s in zip(A, weights, scale, strict=True)]
    return torch.cat(scaled, dim=0), torch.cat([b.to(dtype) for b in B], dim=1)


def combine_svd(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scale: Sequence[float],
    weights: Sequence[float],
    merge: Merge = merge_tensors,
    *,
    rank: int | None = None,
    clamp: float | None = None,
    driver: str | None = None,
    is_merged_transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k adapter for the merged dense update (peft's svd and *_svd).

    ΔW_i = scale_i B_i A_i (2-D views), ΔW = merge({ΔW_i}, {w_i}) (Σ w_i ΔW_i for linear), then
    (A, B) = factorize_svd(ΔW, k, clamp) with k = rank, or max r_i when None. Without clamp,
    ‖ΔW - B A‖_F is the least any rank-k matrix reaches: sqrt(Σ_{j>k} S_j²).
    With is_merged_transposed, ΔW = merge({ΔW_iᵀ}, {w_i})ᵀ: the same rule, but DARE's masks are
    drawn on the transposes, as peft does for embeddings (it keeps their ΔW as
    (num_embeddings, dim)); pass it for embedding adapters to reproduce peft's seeded masks.

    Raises:
        ValueError: bad lengths, shapes, rank or clamp, or an error of `merge`.
    """
    _check_adapters(A, B, scale, weights)
    k = max(a.shape[0] for a in A) if rank is None else rank
    _check_svd_options(k, clamp)
    dtype = _common_dtype(A, B)
    pairs = zip(A, B, scale, strict=True)
    deltas = [s * (_matrix_B(b).to(dtype) @ _matrix_A(a).to(dtype)) for a, b, s in pairs]
    if is_merged_transposed:
        delta = merge([d.T.contiguous() for d in deltas], weights).T  # (out, in)
    else:
        delta = merge(deltas, weights)  # (out, in·prod(kernel))
    A_new, B_new = factorize_svd(delta, k, clamp=clamp, driver=driver)
    return A_new.reshape(k, *A[0].shape[1:]), B_new.reshape(B[0].shape[0], k, *B[0].shape[2:])


def combine_adapters(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scale: Sequence[float],
    weights: Sequence[float],
    combination_type: CombinationType = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: MajoritySignMethod = "total",
    generator: torch.Generator | None = None,
    svd_driver: str | None = None,
    is_merged_transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of `add_weighted_adapter`: (A, B) of the new adapter, whose scale is 1.0.

    Dispatches `combination_type` to combine_factors, combine_cat or combine_svd with the merge
    rule it names (see the module docstring). As in peft, svd_rank and svd_clamp only matter for
    the svd family, density for the pruning rules (required there), majority_sign_method for
    the ties rules; is_merged_transposed as in combine_svd (True for embedding adapters). The
    options are checked before any tensor work.

    The new adapter's rank is A.shape[0]: r (factors family), Σ r_i (cat), svd_rank or max r_i
    (svd family). The function is pure, so computing every layer's result before touching a
    model validates the whole combination first.

    Raises:
        ValueError: unknown combination_type, bad options, or any error of the function it
            dispatches to.
    """
    _check_adapters(A, B, scale, weights)
    family, rule = _lookup_combination(combination_type)
    _check_rule(rule, density, majority_sign_method)
    if family == "svd":
        _check_svd_options(max(a.shape[0] for a in A) if svd_rank is None else svd_rank, svd_clamp)
    merge = functools.partial(
        merge_tensors,
        rule=rule,
        density=density,
        majority_sign_method=majority_sign_method,
        generator=generator,
    )
    if family == "cat":
        return combine_cat(A, B, scale, weights)
    if family == "factors":
        return combine_factors(A, B, scale, weights, merge)
    return combine_svd(
        A,
        B,
        scale,
        weights,
        merge,
        rank=svd_rank,
        clamp=svd_clamp,
        driver=svd_driver,
        is_merged_transposed=is_merged_transposed,
    )


def _prune(
    T: torch.Tensor, pruning: _Pruning, density: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    if pruning == "none":
        return T
    assert density is not None  # checked by _check_rule
    if pruning == "magnitude":
        return prune_magnitude(T, density)
    return prune_random(T, density, rescale=True, generator=generator)


def _matrix_A(A: torch.Tensor) -> torch.Tensor:
    return A.reshape(A.shape[0], -1)  # (r, in·prod(kernel))


def _matrix_B(B: torch.Tensor) -> torch.Tensor:
    return B.reshape(B.shape[0], B.shape[1])  # (out, r); trailing dims are 1 (checked)


def _common_dtype(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> torch.dtype:
    return functools.reduce(torch.promote_types, [t.dtype for t in [*A, *B]])


def _lookup_combination(combination_type: str) -> tuple[_Family, MergeRule]:
    if combination_type not in _COMBINATIONS:
        raise ValueError(
            f"unknown combination_type {combination_type!r}; allowed: "
            f"{', '.join(COMBINATION_TYPES)}. Pass one of those (peft's names)."
        )
    return _COMBINATIONS[combination_type]


def _check_rule(rule: str, density: float | None, majority_sign_method: str) -> None:
    if rule not in _RULE_STEPS:
        raise ValueError(f"unknown merge rule {rule!r}; allowed: {', '.join(MERGE_RULES)}.")
    pruning, elects_sign = _RULE_STEPS[rule]
    if pruning != "none":
        if density is None:
            raise ValueError(
                f"merge rule {rule!r} prunes and needs density, got None; pass density in [0, 1] "
                "(the fraction of entries kept, e.g. density=0.5)."
            )
        _check_density(density, f"merge rule {rule!r}", is_rescaled=pruning == "random")
    if elects_sign:
        _check_sign_method(majority_sign_method)


def _check_density(density: float, what: str, is_rescaled: bool = False) -> None:
    if not 0.0 <= density <= 1.0 or (is_rescaled and density == 0):
        allowed = "(0, 1] (it rescales by 1 / density)" if is_rescaled else "[0, 1]"
        raise ValueError(
            f"{what} got density={density}; density is the fraction of entries kept and must "
            f"lie in {allowed}."
        )


def _check_sign_method(method: str) -> None:
    if method not in _SIGN_SCORES:
        raise ValueError(
            f"unknown majority_sign_method {method!r}; allowed: "
            f"{', '.join(MAJORITY_SIGN_METHODS)}. Pass 'total' (sign of the sum) or 'frequency' "
            "(sign of the sign count)."
        )


def _check_svd_options(rank: int, clamp: float | None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"svd_rank must be an int >= 1, got {rank!r}; pass e.g. svd_rank=8.")
    if clamp is not None and not 0.0 <= clamp <= 1.0:
        raise ValueError(
            f"svd_clamp got {clamp}; it is a quantile and must lie in [0, 1] (or None for no "
            "clamping)."
        )


def _check_adapters(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scale: Sequence[float],
    weights: Sequence[float],
) -> None:
    lengths = {"A": len(A), "B": len(B), "scale": len(scale), "weights": len(weights)}
    if len(set(lengths.values())) != 1 or len(A) == 0:
        raise ValueError(
            f"combining needs one A, B, scale and weight per adapter and at least one adapter, "
            f"got lengths {lengths}; pass lists of equal, non-zero length."
        )
    for i, (a, b) in enumerate(zip(A, B, strict=True)):
        is_pair = min(a.dim(), b.dim()) >= 2 and b.shape[1] == a.shape[0]
        if not is_pair or any(d != 1 for d in b.shape[2:]):
            raise ValueError(
                f"adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form B @ A; "
                "pass A as (r, *in_shape) and B as (out, r, 1, ...) with the same r."
            )
        if a.shape[1:] != A[0].shape[1:] or b.shape[0] != B[0].shape[0]:
            raise ValueError(
                f"adapter {i}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit adapter 0's "
                f"A {tuple(A[0].shape)}, B {tuple(B[0].shape)}; every adapter must adapt the "
                "same layer (same input and output shape)."
            )
