"""Issue 6, speed and size: a 4-bit Linear(4096, 4096), lorakit vs bitsandbytes vs fp32.

Cases (all NF4, blocks of 64, double quantization, one seeded weight, no autograd):
  fp32                nn.Linear, the reference of every ratio
  lorakit             QuantLinear, fp32 compute
  bnb                 bitsandbytes Linear4bit, fp32 compute, in training mode: its forward
                      path while fine-tuning (dequantize, then one matmul)
  lorakit bf16        QuantLinear with compute_dtype=torch.bfloat16
  bnb eval bf16       Linear4bit in eval mode: on CPUs with AVX512-BF16 bitsandbytes repacks
                      the weight and runs a fused bf16 kernel (inference only: no autograd,
                      and bf16 rather than fp32 arithmetic)
at 1, 128 and 1024 tokens. The cases are interleaved round by round; each table gives medians
and ratios to fp32. Bytes per parameter count the packed codes and every scale (the constant
16- and 256-entry code tables are left out for both libraries).

Run from the repository root:
  PYTHONPATH=$PWD/src python benchmarks/bench_quant_linear.py
  python benchmarks/bench_quant_linear.py --tokens 1 --quick
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable
from typing import Any

import harness

# isort: split
import torch
from torch import nn

from lorakit.quant import QuantConfig, QuantLinear

FEATURES = 4096
DEFAULT_TOKENS = "1,128,1024"


def load_bitsandbytes() -> Any | None:
    """bitsandbytes, or None (with the reason printed) where it cannot be imported."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    except Exception as error:  # a missing native library raises more than ImportError
        print(f"bitsandbytes skipped: it cannot be imported here ({error!r})")
        return None
    return bitsandbytes


def bnb_layer(bnb: Any, linear: nn.Linear, double_quant: bool, is_eval: bool) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        FEATURES,
        FEATURES,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # quantizes the weight
    return layer.eval() if is_eval else layer.train()


def bnb_bytes(layer: nn.Module) -> int:
    """Packed codes + absmax (+ nested absmax and offset) of a quantized Linear4bit."""
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax]
    if state.nested:
        tensors += [state.state2.absmax, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def print_sizes(linear: nn.Linear, bnb: Any | None) -> None:
    parameters = FEATURES * FEATURES
    rows = []
    for double_quant in (False, True):
        ours = QuantLinear.from_linear(linear, QuantConfig(double_quant=double_quant))
        row = [f"double_quant={double_quant}", f"{ours.storage_bytes() / parameters:.4f}"]
        if bnb is not None:
            theirs = bnb_layer(bnb, linear, double_quant, is_eval=False)
            row.append(f"{bnb_bytes(theirs) / parameters:.4f}")
        rows.append(row)
    headers = ["weights", "lorakit bytes/param"] + (["bnb bytes/param"] if bnb else [])
    print("\n### Size of the quantized weight (fp32 would be 4 bytes/param)\n")
    harness.print_markdown_table(headers, rows)


def forward_cases(linear: nn.Linear, bnb: Any | None, x: torch.Tensor) -> list[harness.Case]:
    layers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32": linear,
        "lorakit": QuantLinear.from_linear(linear, QuantConfig(double_quant=True)),
    }
    if bnb is not None:
        layers["bnb"] = bnb_layer(bnb, linear, double_quant=True, is_eval=False)
    layers["lorakit bf16"] = QuantLinear.from_linear(
        linear, QuantConfig(double_quant=True, compute_dtype=torch.bfloat16)
    )
    if bnb is not None:
        layers["bnb eval bf16"] = bnb_layer(bnb, linear, double_quant=True, is_eval=True)
    return [harness.Case(name, lambda layer=layer: layer(x)) for name, layer in layers.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated batch rows")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=harness.DEFAULT_THREADS)
    parser.add_argument("--quick", action="store_true", help="3 rounds: checks the script runs")
    parser.set_defaults(default_reps=9)
    args = parser.parse_args()
    reps = harness.resolve_reps(args)
    harness.pin_threads(args.threads)
    harness.print_machine()
    bnb = load_bitsandbytes()
    if bnb is not None:
        print(f"- bitsandbytes: {bnb.__version__}")
    torch.manual_seed(0)
    linear = nn.Linear(FEATURES, FEATURES)
    print_sizes(linear, bnb)
    for tokens in (int(text) for text in args.tokens.split(",")):
        x = torch.randn(tokens, FEATURES, generator=torch.Generator().manual_seed(tokens))
        cases = forward_cases(linear, bnb, x)
        with torch.no_grad():
            expected = linear(x)
            for case in cases[1:]:
                error = (case.run() - expected).abs().max().item()  # type: ignore[operator]
                print(f"{case.name}: max |y - y_fp32| = {error:.3g} (4-bit rounding of W)")
            timings = harness.run_interleaved(cases, reps, warmup=args.warmup)
        title = f"Linear({FEATURES}, {FEATURES}) forward, {tokens} token(s)"
        harness.print_timings(title, timings, reference="fp32")
        if bnb is not None:
            ratio = timings.paired_ratio("lorakit", "bnb")
            print(f"\nlorakit / bnb (fp32 compute, paired): {ratio:.3f}")


if __name__ == "__main__":
    main()
