"""Issue 2 probe: would running sibling adapters' A matrices as one matmul speed up a step?

Three LoRA layers reading one input x (q/k/v of the core benchmark model: 512 tokens, 512
features, r=16), forward + backward, run (a) as three (512 x 512) @ (512 x 16) matmuls and
(b) as one (512 x 512) @ (512 x 48) matmul split afterwards. Prints the 10th-percentile time of
each over 200 repetitions, three times.

  python benchmarks/probe_sibling_grouping.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

TOKENS, FEATURES, RANK = 512, 512, 16
OUT_FEATURES = (512, 256, 256)  # q, k, v of a model with grouped key/value heads


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(TOKENS, FEATURES, requires_grad=True)
    As = [torch.randn(RANK, FEATURES, requires_grad=True) for _ in OUT_FEATURES]
    Bs = [torch.randn(out, RANK, requires_grad=True) for out in OUT_FEATURES]

    def separate() -> torch.Tensor:
        return sum(((x @ A.t()) @ B.t()).sum() for A, B in zip(As, Bs, strict=True))

    def grouped() -> torch.Tensor:
        hidden = x @ torch.cat(As).t()
        parts = hidden.split(RANK, dim=1)
        return sum((h @ B.t()).sum() for h, B in zip(parts, Bs, strict=True))

    for _ in range(3):
        print(f"separate {_p10_ms(separate):.3f} ms   grouped {_p10_ms(grouped):.3f} ms")


def _p10_ms(step: Callable[[], torch.Tensor], repetitions: int = 200) -> float:
    seconds = []
    for _ in range(repetitions):
        start = time.perf_counter()
        step().backward()
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    return seconds[repetitions // 10] * 1e3


if __name__ == "__main__":
    main()
