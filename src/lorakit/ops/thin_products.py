"""The LoRA branch's thin products (one side r wide), each in the form measured fastest.

The branch's products read or write an (N, in) or (N, out) tensor and multiply it by a factor
r wide, so they do little arithmetic per byte, and which library and which operand order runs
them fastest depends on the shapes. Measured inside the DoRA training step of
`benchmarks/bench_dora.py` (float32, 2 threads, `benchmarks/RESULTS.md`, session 10;
`benchmarks/probe_thin_products.py` measures both choices again on another CPU):

- the factor gradient gᵀ u (out, r) from g (N, out) and u (N, r) is faster as `g.t() @ u`
  than as (uᵀ g)ᵀ made contiguous (20.6 -> 14.4 ms a step for 56 layers);
- the rank expansion v A (N, n) from v (N, r) and a factor A (r, n) slows down by 2x in MKL
  once the output passes about 512 K entries (N = 512, n = 1376), where oneDNN's matmul keeps
  its pace (6.6 -> 2.4 ms a step for the 8 down-projections), and is faster in MKL below.
"""

from __future__ import annotations

import torch

from .frozen_linear import onednn_linear_op, uses_onednn

# Entries of a rank expansion's output above which it runs on oneDNN (see the docstring).
WIDE_OUTPUT_ENTRIES = 1 << 19


def factor_grad(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gᵀ u (out, r), contiguous: g (N, out), u (N, r)."""
    return g.t() @ u


def rank_expand(v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v F (N, n), a fresh contiguous tensor: v (N, r), F (r, n) (any strides)."""
    wide = v.shape[0] * factor.shape[1] > WIDE_OUTPUT_ENTRIES
    op = onednn_linear_op() if wide and uses_onednn(v, factor.t()) else None
    if op is None:
        return v @ factor
    return op(v, factor.t(), None, "none", [], "")
