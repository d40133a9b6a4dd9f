"""Probe (issue 12): the LoRA branch's thin backward products in each form (`ops.thin_products`).

For every adapted layer of the core benchmark model (8 layers x q/k/v/o, gate/up, down; hidden
512, intermediate 1376, r=16) and a batch of `--tokens` tokens, each layer with its own tensors
(so operands come from memory, as in a step, not from cache), one pass over all 56 layers of:
  factor gradient   gᵀ u (out, r): `g.t() @ u` (lorakit now) against (uᵀ g)ᵀ made contiguous
                    (lorakit before session 10);
  rank expansion    v A (N, in): `rank_expand` (oneDNN past WIDE_OUTPUT_ENTRIES output
                    entries, else MKL) against MKL alone and oneDNN alone.
Cases run interleaved in rounds; prints medians and paired ratios. The threshold is this host's
(AMD EPYC, 2 threads): rerun this probe on another CPU before trusting it there.

  PYTHONPATH=$PWD/src python benchmarks/probe_thin_products.py
  PYTHONPATH=$PWD/src python benchmarks/probe_thin_products.py --tokens 2048
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import harness

# isort: split
import torch

from lorakit.ops.frozen_linear import onednn_linear_op
from lorakit.ops.thin_products import factor_grad, rank_expand

LAYERS, RANK = 8, 16
# (in, out) of one layer's adapted linears: q/k/v/o, gate/up, down.
LINEARS = [(512, 512)] * 4 + [(512, 1376)] * 2 + [(1376, 512)]


Operands = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def over_layers(make: Operands, form: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """One pass of `form` over the 56 layers, each with its own operands `make(in, out)`."""
    operands = [make(d_in, d_out) for _ in range(LAYERS) for d_in, d_out in LINEARS]

    def run() -> None:
        for first, second in operands:
            form(first, second)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, default_reps=15)
    parser.add_argument("--tokens", type=int, default=512, help="rows N (batch x length)")
    args = parser.parse_args()
    harness.pin_threads(args.threads)
    harness.print_machine()
    assert onednn_linear_op() is not None, "this probe compares against oneDNN; torch has none"
    reps, tokens = harness.resolve_reps(args), args.tokens

    def g_and_u(d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(tokens, d_out), torch.randn(tokens, RANK)

    def v_and_a(d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(tokens, RANK), torch.randn(RANK, d_in)

    with torch.no_grad():
        cases = [
            harness.Case("(uᵀ g)ᵀ contiguous", over_layers(g_and_u, _transposed_form)),
            harness.Case("gᵀ u (lorakit)", over_layers(g_and_u, factor_grad)),
        ]
        timings = harness.run_interleaved(cases, reps, args.warmup)
        harness.print_timings(f"Factor gradient, {tokens} tokens", timings, cases[0].name)
        cases = [
            harness.Case("MKL", over_layers(v_and_a, torch.mm)),
            harness.Case("oneDNN", over_layers(v_and_a, _onednn_form)),
            harness.Case("rank_expand (lorakit)", over_layers(v_and_a, rank_expand)),
        ]
        timings = harness.run_interleaved(cases, reps, args.warmup)
        harness.print_timings(f"Rank expansion, {tokens} tokens", timings, cases[0].name)


def _transposed_form(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (u.t() @ g).t().contiguous()


def _onednn_form(v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    op = onednn_linear_op()
    assert op is not None
    return op(v, factor.t(), None, "none", [], "")


if __name__ == "__main__":
    main()
