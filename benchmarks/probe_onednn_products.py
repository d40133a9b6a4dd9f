"""Probe (issues 12, 13): frozen base products through F.linear (MKL) vs ops.frozen_linear (oneDNN).

The products a frozen base runs on the benchmark model (hidden 512, intermediate 1376, vocab
8000): one decoding step of 16 rows through every linear layer of the 8 layers and the LM head,
each weight its own tensor (read from memory, as in a real step, not from cache); and a
training step's worth (512 tokens) of forward products x Wᵀ and input-gradients g W. Both
routes run interleaved in rounds; prints each route's median and the paired ratio.

  PYTHONPATH=$PWD/src python benchmarks/probe_onednn_products.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import harness

# isort: split
import torch
import torch.nn.functional as F

from lorakit.ops.frozen_linear import frozen_linear, uses_onednn

LAYERS = 8
HIDDEN, INTERMEDIATE, VOCAB = 512, 1376, 8000
DECODE_ROWS, TRAIN_TOKENS = 16, 512


def model_weights() -> list[torch.Tensor]:
    """(out, in) weights of the 8 layers' 7 projections and the LM head."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]
    weights = [torch.randn(*shape, generator=generator) for _ in range(LAYERS) for shape in shapes]
    return [*weights, torch.randn(VOCAB, HIDDEN, generator=generator)]


def products(
    weights: list[torch.Tensor], rows: int, linear: Callable[..., torch.Tensor], backward: bool
) -> Callable[[], None]:
    """One pass over every weight: x Wᵀ (forward), or also g W (the input-gradient)."""
    inputs = {n: torch.randn(rows, n) for n in {w.shape[1] for w in weights}}
    grads = {n: torch.randn(rows, n) for n in {w.shape[0] for w in weights}}

    def run() -> None:
        with torch.no_grad():
            for weight in weights:
                linear(inputs[weight.shape[1]], weight)
                if backward:
                    linear(grads[weight.shape[0]], weight.t())

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser, default_reps=15)
    args = parser.parse_args()
    harness.pin_threads(args.threads)
    harness.print_machine()
    weights = model_weights()
    assert uses_onednn(torch.randn(DECODE_ROWS, HIDDEN), weights[0])
    for title, rows, backward in [
        (f"Decoding step: {DECODE_ROWS} rows through every weight", DECODE_ROWS, False),
        (f"Training: {TRAIN_TOKENS} tokens, x Wᵀ and g W per weight", TRAIN_TOKENS, True),
    ]:
        cases = [
            harness.Case("F.linear (MKL)", products(weights, rows, F.linear, backward)),
            harness.Case(
                "frozen_linear (oneDNN)", products(weights, rows, frozen_linear, backward)
            ),
        ]
        timings = harness.run_interleaved(cases, harness.resolve_reps(args), args.warmup)
        harness.print_timings(title, timings, "F.linear (MKL)")


if __name__ == "__main__":
    main()
