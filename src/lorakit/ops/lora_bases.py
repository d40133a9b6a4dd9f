"""Bases the fused LoRA node can run: each computes its output and its input-gradient.

Shapes: x (N, in), g (N, out). A base is stateless apart from what it needs to read its
weight (the packed 4-bit codes); the node passes the weight and bias tensors in, so that they
are autograd inputs and saved for backward like any other. See `ops.lora_node` for the
protocol.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .frozen_linear import frozen_linear, frozen_linear_add, uses_onednn
from .nf4 import Quantized4bit, linear_4bit_forward, linear_4bit_input_grad


def _add_into(into: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """grad + into, in grad's dtype (into rounded in once); grad itself when into is None."""
    return grad if into is None else grad.add_(into)


class DenseBase(NamedTuple):
    """A dense linear map: `torch.nn.Linear` (weight (out, in)) or, with `is_transposed`,
    transformers' `Conv1D` (weight (in, out)): y = x Wᵀ + b, input-gradient g W."""

    is_transposed: bool = False

    def output(
        self, x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x Wᵀ + b as a fresh (N, out) tensor the node may write into."""
        assert weight is not None
        weight_out_in = weight.t() if self.is_transposed else weight
        return frozen_linear(x2, weight_out_in, bias)

    def input_grad(
        self, g: torch.Tensor, weight: torch.Tensor | None, into: torch.Tensor | None
    ) -> torch.Tensor:
        """g W (N, in) plus `into` (a branch's input-gradient): summed in oneDNN's product
        epilogue or in place into `into` when the dtypes agree, else computed in g's dtype
        with `into` rounded in once."""
        assert weight is not None
        weight_in_out = weight if self.is_transposed else weight.t()  # g W = frozen_linear(g, Wᵀ)
        if into is not None and into.dtype == g.dtype:
            if uses_onednn(g, weight_in_out):
                return frozen_linear_add(g, weight_in_out, into)  # the sum fused into the product
            return into.addmm_(g, weight_in_out.t())
        return _add_into(into, frozen_linear(g, weight_in_out))

    def weight_grad(self, g: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """dL/dW in W's layout: gᵀ x (out, in), or xᵀ g (in, out) when transposed."""
        return x2.t() @ g if self.is_transposed else g.t() @ x2


class Quant4bitBase(NamedTuple):
    """A frozen 4-bit weight (out, in), dequantized a piece of rows at a time on each call and
    never kept dense for backward (which dequantizes it again)."""

    q: Quantized4bit

    def output(
        self, x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x dequant(Q)ᵀ + b (N, out), in x's dtype."""
        return linear_4bit_forward(x2, self.q, bias)

    def input_grad(
        self, g: torch.Tensor, weight: torch.Tensor | None, into: torch.Tensor | None
    ) -> torch.Tensor:
        """g dequant(Q) (N, in), accumulated into `into` piece by piece when the dtypes agree."""
        if into is not None and into.dtype == g.dtype:
            return linear_4bit_input_grad(g, self.q, into=into)
        return _add_into(into, linear_4bit_input_grad(g, self.q))

    def weight_grad(self, g: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a 4-bit weight is frozen; the node never asks for its gradient")
