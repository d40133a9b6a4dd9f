"""ops.thin_products: the branch's thin products equal their float64 values on every route."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from lorakit.ops import thin_products
from lorakit.ops.frozen_linear import onednn_linear_op
from lorakit.ops.thin_products import WIDE_OUTPUT_ENTRIES, factor_grad, rank_expand

EPS32 = torch.finfo(torch.float32).eps


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_product(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """got == a b within the float32 bound of any summation order, K·eps·(|a| |b|)."""
    exact = a.double() @ b.double()
    bound = a.shape[1] * EPS32 * (a.double().abs() @ b.double().abs())
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.all((got.double() - exact).abs() <= bound)


def test_factor_grad_is_g_transposed_times_u() -> None:
    g, u = _randn(300, 40, seed=0), _randn(300, 8, seed=1)
    got = factor_grad(g, u)
    assert got.shape == (40, 8)
    _assert_product(got, g.t(), u)


@pytest.mark.parametrize("rows, width", [(64, 96), (512, 1376), (1024, 1024)])
@pytest.mark.parametrize("transposed_factor", [False, True])
def test_rank_expand_equals_the_product(rows: int, width: int, transposed_factor: bool) -> None:
    v = _randn(rows, 16, seed=2)
    factor = _randn(width, 16, seed=3).t() if transposed_factor else _randn(16, width, seed=3)
    _assert_product(rank_expand(v, factor), v, factor)


def test_rank_expand_takes_onednn_only_for_wide_outputs() -> None:
    if onednn_linear_op() is None:
        pytest.skip("this torch build has no working oneDNN linear")
    calls: list[tuple[int, ...]] = []
    real = onednn_linear_op()
    assert real is not None

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *args)

    with mock.patch.object(thin_products, "onednn_linear_op", return_value=spy):
        rank_expand(_randn(512, 16, seed=4), _randn(16, WIDE_OUTPUT_ENTRIES // 512, seed=5))
        assert calls == []  # at the threshold: MKL
        rank_expand(_randn(512, 16, seed=4), _randn(16, 1376, seed=5))
        assert calls == [(512, 16)]
        factor = _randn(16, 1376, seed=5).requires_grad_()
        with torch.enable_grad():
            out = rank_expand(_randn(512, 16, seed=4), factor)
        assert calls == [(512, 16)] and out.requires_grad  # autograd needs the plain product
