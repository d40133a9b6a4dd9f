"""Issues 2 and 7 probe: the time a LoRA step cannot avoid, whatever the library does.

For every adapted layer of the core benchmark model ("small": 8 layers, hidden 512,
intermediate 1376, all-linear, r=16, batch 4 x 128 = 512 tokens) it times, with warm caches:
  thin     the six fp32 matmuls of the LoRA branch (x Aᵀ, + u Bᵀ, uᵀ g, g B, gᵤᵀ x, + gᵤ A);
  widen    on a bf16 base with fp32 adapters: widening each adapted input to fp32 in forward
           and again in backward, and each output gradient once (casts the fp32 branch needs);
  adamw    torch's default AdamW step over the 112 adapter tensors (the benchmarks' optimizer).
Each is the median of 15 rounds. Their sums, over the floors of bench_core_train.py (fp32)
and bench_precision_compile.py (bf16), are lower bounds on a step's ratio to its floor,
before any Python or autograd bookkeeping.

  python benchmarks/probe_branch_floor.py --fp32-floor-ms 290 --bf16-floor-ms 181
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

TOKENS, RANK, LAYERS = 512, 16, 8
# (in, out, count) of the adapted linears in one layer: q/k/v/o, gate/up, down.
LINEARS = ((512, 512, 4), (512, 1376, 2), (1376, 512, 1))


def median_ms(run: Callable[[], object], rounds: int = 15, repeats: int = 20) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times) * 1e3


def branch_matmuls(d_in: int, d_out: int) -> Callable[[], None]:
    """The branch's forward and backward matmuls for one (d_in -> d_out) layer."""
    x, gx = torch.randn(TOKENS, d_in), torch.randn(TOKENS, d_in)
    g, out = torch.randn(TOKENS, d_out), torch.randn(TOKENS, d_out)
    A, B, u = torch.randn(RANK, d_in), torch.randn(d_out, RANK), torch.randn(TOKENS, RANK)

    def branch() -> None:
        out.addmm_(x @ A.t(), B.t())  # forward
        grad_u = g @ B
        _ = (u.t() @ g, grad_u.t() @ x)  # B's and A's gradients
        gx.addmm_(grad_u, A)  # the branch's input-gradient

    return branch


def thin_matmuls_ms() -> float:
    total = sum(count * median_ms(branch_matmuls(d_in, d_out)) for d_in, d_out, count in LINEARS)
    return LAYERS * total


def widening_ms() -> float:
    total = 0.0
    for d_in, d_out, count in LINEARS:
        x, g = torch.randn(TOKENS, d_in).bfloat16(), torch.randn(TOKENS, d_out).bfloat16()
        total += count * (2 * median_ms(x.float) + median_ms(g.float))
    return LAYERS * total


def adamw_ms() -> float:
    shapes = [
        s for d_in, d_out, n in LINEARS for _ in range(n) for s in ((RANK, d_in), (d_out, RANK))
    ]
    params = [torch.nn.Parameter(torch.randn(shape)) for _ in range(LAYERS) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    return median_ms(optimizer.step, repeats=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp32-floor-ms", type=float, default=290.0)
    parser.add_argument("--bf16-floor-ms", type=float, default=181.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    thin, widen, adamw = thin_matmuls_ms(), widening_ms(), adamw_ms()
    print(f"thin fp32 branch matmuls: {thin:.1f} ms; widening casts (bf16 base): {widen:.1f} ms;")
    print(f"AdamW over the adapters: {adamw:.1f} ms")
    fp32 = 1 + (thin + adamw) / args.fp32_floor_ms
    bf16 = 1 + (thin + widen + adamw) / args.bf16_floor_ms
    print(f"fp32 step >= {fp32:.3f} x its {args.fp32_floor_ms:g} ms floor (target 1.10)")
    print(f"bf16 step >= {bf16:.3f} x its {args.bf16_floor_ms:g} ms floor (target 1.10)")


if __name__ == "__main__":
    main()
