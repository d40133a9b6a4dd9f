"""Tests for lorakit.ops.combine: float64 hand computations, Eckart–Young, peft as the oracle."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.ops.combine import (
    COMBINATION_TYPES,
    COMBINED_ADAPTER_SCALE,
    combine_adapters,
    combine_cat,
    combine_factors,
    combine_svd,
    disjoint_merge,
    elect_sign,
    factorize_svd,
    merge_tensors,
    prune_magnitude,
    prune_random,
)

# Same float64 sums computed in another order: only rounding differs.
EXACT = 1e-10
# The bounds for cat (Σ w_i ΔW_i) and svd (distance to the optimal truncation error).
CAT_TOL = 1e-6
EY_TOL = 1e-5
# peft turns the weights into a float32 tensor, so its weights (and sqrt(w·s)) differ from ours
# by up to ~6e-8 relative; masks and signs do not depend on the weights. Entries where terms
# cancel can differ more in relative terms, so the bound is relative to the tensor's largest entry.
PEFT_RTOL = 1e-6
# Fraction of kept entries over 40 000 Bernoulli(0.3) draws: 5 standard deviations ≈ 0.0115.
FREQUENCY_TOL = 0.0115
# bfloat16 keeps 8 significant bits: factors of size ~3 round by ~0.01 each, their products by
# a few hundredths; a float32 SVD rounded once to bfloat16 stays well within this.
BF16_ATOL = 0.1

FACTOR_TYPES = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD_TYPES = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


def _adapters(
    ranks: list[int], out: int, in_shape: tuple[int, ...], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, *in_shape, generator=g, dtype=torch.float64) for r in ranks]
    B = [
        torch.randn(out, r, *([1] * (len(in_shape) - 1)), generator=g, dtype=torch.float64)
        for r in ranks
    ]
    return A, B


def _delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B @ A on the 2-D views (out, r) and (r, in·prod(kernel))."""
    return scale * B.reshape(B.shape[0], B.shape[1]) @ A.reshape(A.shape[0], -1)


def _assert_close_to_peft(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    bound = PEFT_RTOL * theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= bound


def _weighted_sum(
    A: list[torch.Tensor], B: list[torch.Tensor], scale: list[float], weights: list[float]
) -> torch.Tensor:
    return sum(
        (w * _delta(a, b, s) for a, b, s, w in zip(A, B, scale, weights, strict=True)),
        torch.zeros(()),
    )


# ---------------------------------------------------------------------------------------------
# cat and svd: exact sum, Eckart–Young


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 10),
    n_in=st.integers(1, 10),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_cat_reproduces_weighted_sum(
    out: int, n_in: int, ranks: list[int], data: st.DataObject, seed: int
) -> None:
    weights = data.draw(st.lists(st.floats(-3, 3), min_size=len(ranks), max_size=len(ranks)))
    scale = data.draw(st.lists(st.floats(0.1, 4), min_size=len(ranks), max_size=len(ranks)))
    A, B = _adapters(ranks, out, (n_in,), seed)
    A_new, B_new = combine_cat(A, B, scale, weights)
    assert A_new.shape == (sum(ranks), n_in) and B_new.shape == (out, sum(ranks))
    torch.testing.assert_close(
        B_new @ A_new, _weighted_sum(A, B, scale, weights), rtol=0, atol=CAT_TOL
    )


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 12),
    n_in=st.integers(1, 12),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    svd_rank=st.integers(1, 14),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_svd_error_is_the_optimal_truncation_error(
    out: int, n_in: int, ranks: list[int], svd_rank: int, data: st.DataObject, seed: int
) -> None:
    weights = data.draw(st.lists(st.floats(-3, 3), min_size=len(ranks), max_size=len(ranks)))
    scale = [2.0, 0.5, 1.5][: len(ranks)]
    A, B = _adapters(ranks, out, (n_in,), seed)
    target = _weighted_sum(A, B, scale, weights)
    A_new, B_new = combine_svd(A, B, scale, weights, rank=svd_rank)
    assert A_new.shape == (svd_rank, n_in) and B_new.shape == (out, svd_rank)
    S = torch.linalg.svdvals(target)
    optimal = S[svd_rank:].square().sum().sqrt()  # Eckart–Young: the dropped singular values
    error = torch.linalg.matrix_norm(target - B_new @ A_new)
    assert abs(error.item() - optimal.item()) < EY_TOL


def test_svd_default_rank_is_the_largest_rank_and_factors_are_u_s_and_vh() -> None:
    A, B = _adapters([2, 3], 7, (9,), seed=1)
    scale, weights = [2.0, 0.5], [0.7, -1.3]
    A_new, B_new = combine_svd(A, B, scale, weights)
    assert A_new.shape == (3, 9) and B_new.shape == (7, 3)
    S = torch.linalg.svdvals(_weighted_sum(A, B, scale, weights))
    # A = Vh_k has orthonormal rows; the columns of B = U_k S_k have norms S_k.
    torch.testing.assert_close(
        A_new @ A_new.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=EXACT
    )
    torch.testing.assert_close(B_new.norm(dim=0), S[:3], rtol=0, atol=EXACT)


def test_svd_rank_above_the_matrix_size_pads_with_zeros_and_is_exact() -> None:
    A, B = _adapters([3, 4], 4, (5,), seed=2)
    scale, weights = [1.0, 2.0], [0.5, 0.25]
    A_new, B_new = combine_svd(A, B, scale, weights, rank=8)
    assert A_new.shape == (8, 5) and B_new.shape == (4, 8)
    assert torch.count_nonzero(A_new[4:]) == 0 and torch.count_nonzero(B_new[:, 4:]) == 0
    torch.testing.assert_close(
        B_new @ A_new, _weighted_sum(A, B, scale, weights), rtol=0, atol=EXACT
    )


def test_svd_clamp_bounds_every_entry_by_the_quantile_of_the_unclamped_factors() -> None:
    A, B = _adapters([4, 4], 30, (40,), seed=3)
    scale, weights = [1.0, 0.5], [1.0, 1.0]
    A_free, B_free = combine_svd(A, B, scale, weights, rank=3)
    A_new, B_new = combine_svd(A, B, scale, weights, rank=3, clamp=0.9)
    values = torch.cat([B_free.flatten(), A_free.flatten()])
    h = torch.quantile(values, 0.9)
    torch.testing.assert_close(A_new, A_free.clamp(-h, h), rtol=0, atol=EXACT)
    torch.testing.assert_close(B_new, B_free.clamp(-h, h), rtol=0, atol=EXACT)
    assert torch.count_nonzero(B_new != B_free) > 0  # the clamp did bite


def test_conv_layout_comes_back_in_the_layout_given() -> None:
    A, B = _adapters([2, 3], 5, (3, 3, 3), seed=4)  # conv: A (r, in, kh, kw), B (out, r, 1, 1)
    scale, weights = [2.0, 1.0], [0.5, -1.5]
    target = _weighted_sum(A, B, scale, weights)  # (5, 27)
    A_cat, B_cat = combine_cat(A, B, scale, weights)
    assert A_cat.shape == (5, 3, 3, 3) and B_cat.shape == (5, 5, 1, 1)
    torch.testing.assert_close(_delta(A_cat, B_cat, 1.0), target, rtol=0, atol=EXACT)
    A_svd, B_svd = combine_svd(A, B, scale, weights, rank=2)
    assert A_svd.shape == (2, 3, 3, 3) and B_svd.shape == (5, 2, 1, 1)
    S = torch.linalg.svdvals(target)
    error = torch.linalg.matrix_norm(target - _delta(A_svd, B_svd, 1.0))
    assert abs(error.item() - S[2:].norm().item()) < EY_TOL


def test_half_precision_svd_runs_in_float32_and_returns_half() -> None:
    A, B = _adapters([2, 2], 6, (5,), seed=5)
    A16, B16 = [a.to(torch.bfloat16) for a in A], [b.to(torch.bfloat16) for b in B]
    A_new, B_new = combine_svd(A16, B16, [1.0, 1.0], [1.0, 1.0], rank=4)
    assert A_new.dtype == torch.bfloat16 and B_new.dtype == torch.bfloat16
    target = _weighted_sum(
        [a.double() for a in A16], [b.double() for b in B16], [1.0, 1.0], [1.0, 1.0]
    )
    torch.testing.assert_close(B_new.double() @ A_new.double(), target, rtol=0, atol=BF16_ATOL)


# ---------------------------------------------------------------------------------------------
# factors family (linear and the merge rules on A and B)


@pytest.mark.parametrize(("weight", "scale"), [(0.7, 2.0), (-1.3, 0.5), (0.8, -1.5)])
def test_linear_of_one_adapter_is_its_weighted_delta(weight: float, scale: float) -> None:
    A, B = _adapters([3], 6, (4,), seed=6)
    A_new, B_new = combine_factors(A, B, [scale], [weight])
    torch.testing.assert_close(
        B_new @ A_new, weight * _delta(A[0], B[0], scale), rtol=0, atol=EXACT
    )


def test_linear_is_the_double_sum_with_cross_terms() -> None:
    A, B = _adapters([3, 3], 6, (4,), seed=7)
    scale, weights = [2.0, 0.5], [0.75, -1.25]
    c = [math.sqrt(abs(w * s)) for w, s in zip(weights, scale, strict=True)]
    sigma = [math.copysign(1.0, w * s) for w, s in zip(weights, scale, strict=True)]
    expected = sum(
        (sigma[i] * c[i] * c[j] * B[j] @ A[i] for i in range(2) for j in range(2)),
        torch.zeros(()),
    )
    A_new, B_new = combine_adapters(A, B, scale, weights, "linear")
    torch.testing.assert_close(B_new @ A_new, expected, rtol=0, atol=EXACT)


def test_prune_magnitude_keeps_the_largest_magnitudes() -> None:
    T = torch.tensor([[0.5, -3.0, 2.0], [-0.1, 1.0, 0.2]], dtype=torch.float64)
    expected = torch.tensor([[0.0, -3.0, 2.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(prune_magnitude(T, 0.5), expected)  # k = int(0.5 · 6) = 3
    assert torch.equal(prune_magnitude(T, 0.1), torch.zeros_like(T))  # k = 0
    assert torch.equal(prune_magnitude(T, 1.0), T)


def test_prune_random_drops_and_rescales_with_the_generators_mask() -> None:
    T = torch.randn(200, 200, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = prune_random(T, 0.3, generator=torch.Generator().manual_seed(9))
    mask = torch.bernoulli(torch.full_like(T, 0.3), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out, T * mask / 0.3, rtol=0, atol=EXACT)
    assert abs(mask.mean().item() - 0.3) < FREQUENCY_TOL
    plain = prune_random(T, 0.3, rescale=False, generator=torch.Generator().manual_seed(9))
    assert torch.equal(plain, T * mask)


def test_elect_sign_total_and_frequency() -> None:
    T = torch.tensor([[1.0, -2.0, 0.0, 1.0], [1.0, 1.0, 0.0, -1.0], [-3.0, 0.5, 0.0, 0.0]])
    # total: sums -1, -0.5, 0, 0 -> -1, -1, +1, +1; frequency: sign counts 1, 1, 0, 0 -> all +1.
    assert torch.equal(elect_sign(T, "total"), torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert torch.equal(elect_sign(T, "frequency"), torch.tensor([1.0, 1.0, 1.0, 1.0]))


def test_disjoint_merge_averages_the_agreeing_weighted_entries() -> None:
    T = torch.tensor([[1.0, -2.0, 0.0, 1.0], [1.0, 1.0, 0.0, -1.0], [-3.0, 0.5, 0.0, 0.0]])
    w = torch.tensor([0.5, 2.0, 1.0])
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0])
    # col 0: rows 0, 1 agree -> (0.5 + 2) / 2; col 1: row 0 -> -1; col 2: none -> 0; col 3: row 0.
    expected = torch.tensor([1.25, -1.0, 0.0, 0.5])
    torch.testing.assert_close(disjoint_merge(T, w, sign), expected, rtol=0, atol=EXACT)


def test_ties_prunes_elects_on_unweighted_tensors_and_merges_weighted() -> None:
    T = [
        torch.tensor([4.0, -0.1, 3.0, -1.0], dtype=torch.float64),
        torch.tensor([-2.0, 5.0, 0.2, -3.0], dtype=torch.float64),
    ]
    # density 0.5 keeps 2 of 4: P_0 = [4, 0, 3, 0], P_1 = [0, 5, 0, -3]; total signs + + + -.
    # Weighted merge with w = (-1, 0.5): [-4, 2.5, -3, -1.5] (one agreeing tensor per entry).
    out = merge_tensors(T, [-1.0, 0.5], "ties", density=0.5)
    expected = torch.tensor([-4.0, 2.5, -3.0, -1.5], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=EXACT)


@pytest.mark.parametrize("rule", ["dare_linear", "magnitude_prune"])
def test_pruning_rules_at_full_density_are_the_weighted_sum(rule: str) -> None:
    T = [
        torch.randn(4, 5, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        for i in range(3)
    ]
    weights = [0.5, -1.0, 2.0]
    expected = sum((w * t for w, t in zip(weights, T, strict=True)), torch.zeros(()))
    torch.testing.assert_close(
        merge_tensors(T, weights, rule, density=1.0), expected, rtol=0, atol=EXACT
    )  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"combination_type": "mean"},
            r"unknown combination_type 'mean'; allowed: svd, linear, cat",
        ),
        ({"combination_type": "linear", "ranks": [2, 3]}, r"equal rank.*\[2, 3\].*'cat' or 'svd'"),
        ({"combination_type": "ties"}, r"'ties' prunes and needs density, got None"),
        ({"combination_type": "ties", "density": 1.5}, r"density=1.5.*\[0, 1\]"),
        ({"combination_type": "dare_linear", "density": 0.0}, r"density=0.0.*\(0, 1\]"),
        (
            {"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"},
            r"'mean'; allowed: total, frequency",
        ),
        ({"combination_type": "svd", "svd_rank": 0}, r"svd_rank must be an int >= 1, got 0"),
        ({"combination_type": "svd", "svd_clamp": 1.5}, r"svd_clamp got 1.5.*\[0, 1\]"),
    ],
)
def test_bad_options_raise_value_error(kwargs: dict[str, object], match: str) -> None:
    ranks = kwargs.pop("ranks", [2, 2])
    A, B = _adapters(ranks, 3, (4,), seed=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        combine_adapters(A, B, [1.0, 1.0], [1.0, 1.0], **kwargs)  # type: ignore[arg-type]


def test_bad_lists_and_shapes_raise_value_error() -> None:
    A, B = _adapters([2, 2], 3, (4,), seed=11)
    with pytest.raises(
        ValueError, match=r"got lengths \{'A': 2, 'B': 2, 'scale': 2, 'weights': 1\}"
    ):
        combine_cat(A, B, [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match=r"adapter 1: A \(2, 4\) and B \(3, 3\) do not form B @ A"):
        combine_cat(A, [B[0], torch.zeros(3, 3)], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"adapter 1: A \(2, 5\).*do not fit adapter 0's"):
        combine_svd([A[0], torch.zeros(2, 5)], B, [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"needs a 2-D ΔW, got shape \(2, 3, 4\)"):
        factorize_svd(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ValueError, match=r"one shape, got shapes \[\(2,\), \(3,\)\]"):
        merge_tensors([torch.zeros(2), torch.zeros(3)], [1.0, 1.0])


@pytest.mark.parametrize("combination_type", COMBINATION_TYPES)
def test_every_combination_type_gives_its_rank(combination_type: str) -> None:
    A, B = _adapters([3, 3], 4, (5,), seed=12)
    expected_rank = {"cat": 6}.get(combination_type, 3)  # svd family: max r_i by default
    A_new, B_new = combine_adapters(A, B, [1.0, 2.0], [0.5, 0.5], combination_type, density=1.0)  # type: ignore[arg-type]
    assert A_new.shape == (expected_rank, 5) and B_new.shape == (4, expected_rank)
    A_low, _ = combine_adapters(A, B, [1.0, 2.0], [0.5, 0.5], "ties_svd", svd_rank=2, density=1.0)
    assert A_low.shape == (2, 5)


# ---------------------------------------------------------------------------------------------
# peft as the oracle


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 4)


def _peft_model(ranks: list[int], alphas: list[float], use_rslora: bool = False) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = None
    for i, (r, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=["emb", "conv", "fc1", "fc2"],
            init_lora_weights=False,
            use_rslora=use_rslora,
        )
        if model is None:
            model = get_peft_model(_TinyNet(), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    assert model is not None
    return model.double()


def _lora_layers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """peft's LoRA layers in module order (the order add_weighted_adapter visits them)."""
    return (m for _, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling"))


def _factors(layer: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    if name in layer.lora_embedding_A:
        A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    return A.detach(), B.detach(), float(layer.scaling[name])


def _run_peft(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, new: str, **kwargs: object
) -> torch.Generator:
    """Call peft's add_weighted_adapter; return a generator in the RNG state of its first draw."""
    states: list[torch.Tensor] = []
    bernoulli = torch.bernoulli

    def recording_bernoulli(*args: object, **kw: object) -> torch.Tensor:
        states.append(torch.get_rng_state())
        return bernoulli(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "bernoulli", recording_bernoulli)
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(**kwargs, adapter_name=new)  # type: ignore[operator]
    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    generator = torch.Generator()
    if states:
        generator.set_state(states[0])
    return generator


_EQUAL_RANK_MODEL: list[torch.nn.Module] = []
_MIXED_RANK_MODEL: list[torch.nn.Module] = []


def _cached(cache: list[torch.nn.Module], ranks: list[int]) -> torch.nn.Module:
    if not cache:
        cache.append(_peft_model(ranks, alphas=[8.0, 3.0, 5.0]))
    return cache[0]


def _compare_with_peft(
    model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    combination_type: str,
    compare_factors: bool,
    **options: object,
) -> None:
    names, weights = ["a0", "a1", "a2"], [0.75, -1.25, 0.5]
    new = f"new_{combination_type}_{len(model.peft_config)}"
    generator = _run_peft(
        model,
        monkeypatch,
        new,
        adapters=names,
        weights=weights,
        combination_type=combination_type,
        **options,
    )
    svd_options = {"svd_rank": options.get("svd_rank"), "svd_clamp": options.get("svd_clamp")}
    for layer in _lora_layers(model):
        parts = [_factors(layer, n) for n in names]
        A_new, B_new = combine_adapters(
            [p[0] for p in parts],
            [p[1] for p in parts],
            [p[2] for p in parts],
            weights,
            combination_type,  # type: ignore[arg-type]
            density=options.get("density"),  # type: ignore[arg-type]
            majority_sign_method=options.get("majority_sign_method", "total"),  # type: ignore[arg-type]
            generator=generator,
            is_merged_transposed="a0" in layer.lora_embedding_A,  # peft's (num_emb, dim) ΔW
            **svd_options,  # type: ignore[arg-type]
        )
        A_peft, B_peft, scale_peft = _factors(layer, new)
        assert scale_peft == COMBINED_ADAPTER_SCALE
        assert A_new.shape == A_peft.shape and B_new.shape == B_peft.shape
        ours, theirs = _delta(A_new, B_new, 1.0), _delta(A_peft, B_peft, scale_peft)
        _assert_close_to_peft(ours, theirs)
        if compare_factors:
            _assert_close_to_peft(A_new, A_peft)
            _assert_close_to_peft(B_new, B_peft)


@pytest.mark.parametrize(
    ("combination_type", "majority_sign_method"),
    [(t, "total") for t in FACTOR_TYPES] + [("ties", "frequency"), ("dare_ties", "frequency")],
)
def test_factor_types_match_peft(
    combination_type: str, majority_sign_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _cached(_EQUAL_RANK_MODEL, [4, 4, 4])
    options = (
        {}
        if combination_type == "linear"
        else {"density": 0.5, "majority_sign_method": majority_sign_method}
    )
    _compare_with_peft(model, monkeypatch, combination_type, compare_factors=True, **options)


def test_cat_matches_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _cached(_MIXED_RANK_MODEL, [2, 3, 4])
    _compare_with_peft(model, monkeypatch, "cat", compare_factors=True)


@pytest.mark.parametrize("combination_type", SVD_TYPES)
@pytest.mark.parametrize(("svd_rank", "svd_clamp"), [(None, None), (3, 0.9)])
def test_svd_types_match_peft(
    combination_type: str,
    svd_rank: int | None,
    svd_clamp: float | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _cached(_MIXED_RANK_MODEL, [2, 3, 4])
    density = None if combination_type == "svd" else 0.5
    _compare_with_peft(
        model,
        monkeypatch,
        combination_type,
        compare_factors=False,
        density=density,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
    )


def test_rslora_factors_match_peft_whose_new_scale_is_not_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # peft 0.21.2 sets the new adapter's r = lora_alpha = rank and keeps use_rslora, so its scale
    # is sqrt(rank); its factors still carry Σ w_i ΔW_i, which lorakit applies with scale 1.0.
    model = _peft_model([2, 3, 4], [8.0, 3.0, 5.0], use_rslora=True)
    names, weights = ["a0", "a1", "a2"], [0.75, -1.25, 0.5]
    _run_peft(model, monkeypatch, "cat", adapters=names, weights=weights, combination_type="cat")
    for layer in _lora_layers(model):
        parts = [_factors(layer, n) for n in names]
        A, B, scale = [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]
        A_new, B_new = combine_cat(A, B, scale, weights)
        A_peft, B_peft, scale_peft = _factors(layer, "cat")
        assert scale_peft == pytest.approx(math.sqrt(9))
        torch.testing.assert_close(
            _delta(A_new, B_new, 1.0), _weighted_sum(A, B, scale, weights), rtol=0, atol=CAT_TOL
        )
        _assert_close_to_peft(A_new, A_peft)
        _assert_close_to_peft(B_new, B_peft)
