"""Blockwise 4-bit quantization (NF4 / FP4), byte-compatible with bitsandbytes 0.50.

A weight `W` is flattened and cut into blocks of `blocksize` values. Each block keeps its
absolute maximum `absmax` (fp32) and each value keeps the index `q` of the nearest of 16 code
values in [-1, 1] (a tie goes to the lower code value), so that `W ≈ code[q] · absmax`. Two
indices share a byte, the first element in the high nibble.

With double quantization the fp32 `absmax` vector is stored in 8 bits: its mean (`offset`) is
subtracted and the rest is quantized blockwise (256 scales per block) with the signed dynamic
8-bit map, so a scale costs 1 byte instead of 4. The code tables, rounding rules and byte
layout are those bitsandbytes uses on CPU, so the same weight gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .nf4_rows import RowDecoder, row_decoder

QuantType = Literal["nf4", "fp4"]
QUANT_TYPES: tuple[QuantType, ...] = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DOUBLE_QUANT_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, Dettmers 2023).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, divided by its maximum 12.
# Code 8 (sign bit alone) decodes to +0.0, as in bitsandbytes.
FP4_CODE_UNSCALED = (
    *(0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0),
    *(0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0),
)
FP4_MAX = 12.0

# bitsandbytes' CPU 8-bit quantizer rounds through a 65536-entry table over [-1, 1].
LUT_8BIT_SIZE = 65536
# Elements quantized per step, to bound temporary memory on large weights.
QUANTIZE_CHUNK = 1 << 20
# CPU matmul tiling (measured on a 2-core Xeon, Linear(4096, 4096)). Weight rows are decoded
# and multiplied a piece at a time. With few tokens a piece holds DECODE_ELEMENTS values per
# thread: smaller pieces stay in L2 (256K values decode ~20% faster at 1 token), but every
# piece costs a few parallel regions, and on a machine whose cores are shared each region can
# wait milliseconds for a descheduled thread. With more tokens a piece grows to
# MATMUL_ELEMENTS_PER_TOKEN values per token (whole decode pieces, at most MATMUL_ELEMENTS_MAX):
# a thousand tokens run ~10% slower on 256 weight rows per matmul than on 1024.
DECODE_ELEMENTS = 1 << 20
MATMUL_ELEMENTS_PER_TOKEN = 1 << 13
MATMUL_ELEMENTS_MAX = 1 << 22


@dataclass(frozen=True)
class Quantized4bit:
    """A 4-bit quantized tensor: packed codes, block scales and what is needed to undo it.

    `absmax` is fp32 (one scale per block), or uint8 codes of the scales when
    `nested_absmax` and `offset` are set (double quantization).
    """

    packed: Tensor  # uint8 ((numel + 1) // 2,)
    absmax: Tensor  # fp32 or uint8 (n_blocks,)
    shape: torch.Size
    dtype: torch.dtype
    quant_type: QuantType
    blocksize: int
    nested_absmax: Tensor | None = None  # fp32 (ceil(n_blocks / 256),)
    offset: Tensor | None = None  # fp32 ()

    @property
    def is_double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def storage_bytes(self) -> int:
        """Bytes held by the codes and the scales (the constant code tables are not counted)."""
        tensors = (self.packed, self.absmax, self.nested_absmax, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_quant_options(quant_type: str, blocksize: int) -> None:
    """Raise ValueError naming the allowed values if `quant_type` or `blocksize` is not one."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; use one of {QUANT_TYPES}.")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; use one of {BLOCKSIZES}.")


def code_book(quant_type: QuantType, device: torch.device | str = "cpu") -> Tensor:
    """The 16 fp32 code values of `quant_type`, indexed by the 4-bit code (a fresh tensor)."""
    return _code_book(quant_type, device).clone()


@lru_cache(maxsize=16)
def _code_book(quant_type: QuantType, device: torch.device | str) -> Tensor:
    check_quant_options(quant_type, BLOCKSIZES[0])
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return torch.tensor(FP4_CODE_UNSCALED, dtype=torch.float32, device=device) / FP4_MAX


@lru_cache(maxsize=16)
def _rounding_bounds(quant_type: QuantType, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Midpoints between sorted code values, and the code of each sorted position."""
    code = _code_book(quant_type, device)
    order = torch.argsort(code, stable=True)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


@lru_cache(maxsize=16)
def _byte_table(quant_type: QuantType, device: torch.device | str) -> Tensor:
    """Both decoded values of every byte, as one int64 per byte so a gather moves them at once.

    Entry b holds the fp32 pair (code[b >> 4], code[b & 15]) reinterpreted as 8 bytes; gathering
    8-byte elements is about 3x faster on CPU than gathering rows of two floats.
    """
    code = _code_book(quant_type, device)
    byte = torch.arange(256, device=device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()  # (256, 2)
    return pairs.view(torch.int64).view(256)


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """The signed dynamic 8-bit map (256 sorted fp32 values in [-1, 1]), a fresh tensor.

    For each exponent e = 0..6 it holds 2^e values 10^(e-6) · m and their negatives, where the
    m are the centres of 2^e equal steps of [0.1, 1]; plus 0 and 1.
    """
    return _dynamic_map(device).clone()


@lru_cache(maxsize=4)
def _dynamic_map(device: torch.device | str) -> Tensor:
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1.0, 2**exponent + 1, dtype=torch.float32)
        scaled = (10.0 ** (exponent - 6)) * ((edges[:-1] + edges[1:]) / 2)
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@lru_cache(maxsize=4)
def _lut_8bit(device: torch.device | str) -> Tensor:
    """Code index of each of 65536 evenly spaced points of [-1, 1]: the nearest map value."""
    code = _dynamic_map(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(LUT_8BIT_SIZE, dtype=torch.float32, device=device)) / (
        LUT_8BIT_SIZE - 1.0
    )
    return torch.searchsorted(midpoints, points).to(torch.uint8)


def quantize_blockwise_8bit(
    values: Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
) -> tuple[Tensor, Tensor]:
    """Quantize `values` to uint8 codes of the dynamic map, blockwise, with fp32 absmax.

    Formula: u = clamp(v · (1 / absmax), -1, 1); code = LUT[trunc((u + 1) / 2 · 65535 + 1/2)],
    where LUT maps each of 65536 grid points to its nearest map value (bitsandbytes' rounding).
    Returns (codes with the shape of `values`, absmax (n_blocks,)).
    """
    flat = values.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    is_zero = absmax == 0
    inverse = torch.where(is_zero, torch.zeros_like(absmax), 1.0 / absmax)
    unit = (blocks * inverse[:, None]).clamp_(-1.0, 1.0)
    position = ((unit + 1.0) * 0.5 * (LUT_8BIT_SIZE - 1.0) + 0.5).to(torch.int64)
    codes = _lut_8bit(values.device)[position]
    codes[is_zero] = 0
    return codes.view(-1)[:n].view(values.shape), absmax


def dequantize_blockwise_8bit(
    codes: Tensor, absmax: Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
) -> Tensor:
    """Undo `quantize_blockwise_8bit`: map[codes] · absmax[block], fp32, flat."""
    flat = codes.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    decoded = torch.index_select(_dynamic_map(codes.device), 0, flat.int())
    decoded[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        decoded[full:].mul_(absmax[-1])
    return decoded


def _pack_codes(scaled: Tensor, quant_type: QuantType) -> Tensor:
    """Nearest code index of each value in [-1, 1], two per byte (first in the high nibble)."""
    bounds, order = _rounding_bounds(quant_type, scaled.device)
    index = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        index = order[index]
    pairs = index.to(torch.uint8).view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_4bit(
    W: Tensor,
    quant_type: QuantType = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
) -> Quantized4bit:
    """Quantize a floating tensor blockwise to 4 bits.

    Formula per block: absmax = max|w|; q = argmin_c |w / absmax − code[c]|.

    Args:
        W: fp32, bf16 or fp16 tensor of any shape; it is read, never changed.
        quant_type: "nf4" (NormalFloat4) or "fp4".
        blocksize: values per absmax block.
        double_quant: also quantize the absmax vector to 8 bits (blocks of 256).

    Raises:
        ValueError: for an unsupported dtype, quant_type or blocksize, or an empty tensor.
    """
    check_quant_options(quant_type, blocksize)
    if W.dtype not in FLOAT_DTYPES:
        raise ValueError(f"Cannot quantize a {W.dtype} tensor; use one of {FLOAT_DTYPES}.")
    if W.numel() == 0:
        raise ValueError(f"Cannot quantize an empty tensor of shape {tuple(W.shape)}.")
    flat = W.detach().reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=W.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=W.device)
    step = max(blocksize, QUANTIZE_CHUNK // blocksize * blocksize)
    for start in range(0, full, step):
        stop = min(start + step, full)
        blocks = flat[start:stop].float().view(-1, blocksize)
        block_max = blocks.abs().amax(dim=1)
        absmax[start // blocksize : stop // blocksize] = block_max
        scaled = (blocks * (1.0 / block_max.clamp(min=1e-38))[:, None]).clamp_(-1.0, 1.0)
        packed[start // 2 : stop // 2] = _pack_codes(scaled.view(-1), quant_type)
    if full < n:  # a last, partial block: bitsandbytes divides and clamps its absmax
        rest = flat[full:].float()
        rest_max = rest.abs().max().clamp(min=1e-38)
        absmax[-1] = rest_max
        scaled = (rest / rest_max).clamp_(-1.0, 1.0)
        packed[full // 2 :] = _pack_codes(F.pad(scaled, (0, (n - full) % 2)), quant_type)
    if not double_quant:
        return Quantized4bit(packed, absmax, W.shape, W.dtype, quant_type, blocksize)
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise_8bit(absmax - offset)
    return Quantized4bit(
        packed, codes, W.shape, W.dtype, quant_type, blocksize, nested_absmax, offset
    )


def block_scales(q: Quantized4bit) -> Tensor:
    """The fp32 absmax of every block (decoded from 8 bits under double quantization)."""
    if q.nested_absmax is None or q.offset is None:
        return q.absmax
    return dequantize_blockwise_8bit(q.absmax, q.nested_absmax).add_(q.offset)


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype | None = None) -> Tensor:
    """The dense tensor code[q] · absmax, in `dtype` (default: the dtype it was quantized from).

    Products are formed in fp32 and then rounded to `dtype`, as bitsandbytes does.
    """
    n = q.numel
    scales = block_scales(q)
    full_blocks = n // q.blocksize
    packed = q.packed
    full_bytes = full_blocks * q.blocksize // 2
    table = _byte_table(q.quant_type, packed.device)
    decoded = torch.empty(packed.numel(), dtype=torch.int64, device=packed.device)
    if full_blocks:
        # Seen as a matrix with one block per row, decoded a cache-sized piece at a time.
        columns = q.blocksize // 2
        decoder = RowDecoder(
            full_blocks,
            max(1, DECODE_ELEMENTS // q.blocksize),
            columns,
            1,
            table,
            torch.float32,
            decoded[:full_bytes],
        )
        decoder.decode(
            packed[:full_bytes].view(full_blocks, columns), scales[:full_blocks, None, None]
        )
    values = decoded.view(torch.float32)
    if full_blocks < scales.numel():  # a last, partial block
        tail = torch.index_select(table, 0, packed[full_bytes:].int()).view(torch.float32)
        values[2 * full_bytes :] = tail * scales[-1]
    return values[:n].view(q.shape).to(dtype or q.dtype)


def _rows_per_piece(q: Quantized4bit, tokens: int, device: torch.device) -> int:
    """Weight rows dequantized and multiplied at a time: all off CPU; on CPU, see the tiling.

    With many tokens a piece outgrows the cache anyway and is decoded in one go: splitting
    it would only add parallel regions.
    """
    out_features, in_features = q.shape
    if device.type != "cpu":
        return out_features
    decode_elements = DECODE_ELEMENTS * torch.get_num_threads()
    decode_rows = max(1, min(out_features, decode_elements // in_features))
    matmul_elements = min(MATMUL_ELEMENTS_MAX, tokens * MATMUL_ELEMENTS_PER_TOKEN)
    pieces = max(1, matmul_elements // (decode_rows * in_features))
    return min(out_features, pieces * decode_rows)


def _is_row_aligned(q: Quantized4bit) -> bool:
    """True when each weight row is a whole number of blocks (the chunked matmul needs it)."""
    return len(q.shape) == 2 and q.shape[1] % q.blocksize == 0


def _row_pieces(q: Quantized4bit, a: Tensor) -> tuple[int, RowDecoder, list[Tensor], list[Tensor]]:
    """Rows per matmul, a decoder, and the packed codes and scales cut into those rows."""
    out_features, in_features = q.shape
    blocks_per_row = in_features // q.blocksize
    rows = _rows_per_piece(q, a.shape[0], a.device)
    table = _byte_table(q.quant_type, a.device)
    decoder = row_decoder(rows, in_features // 2, blocks_per_row, table, a.dtype)
    packed = q.packed.view(out_features, in_features // 2).split(rows)
    scales = block_scales(q).view(out_features, blocks_per_row, 1).split(rows)
    return rows, decoder, list(packed), list(scales)


def linear_4bit_forward(x: Tensor, q: Quantized4bit, bias: Tensor | None) -> Tensor:
    """x (M, in) @ W.T + bias -> (M, out), W dequantized a piece of rows at a time; no autograd."""
    if not _is_row_aligned(q):
        return F.linear(x, dequantize_4bit(q, x.dtype), bias)
    rows, decoder, packed, scales = _row_pieces(q, x)
    result = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
    outs = result.split(rows, dim=1)
    biases = [None] * len(outs) if bias is None else bias.split(rows)
    for out, piece_bias, piece_packed, piece_scales in zip(
        outs, biases, packed, scales, strict=True
    ):
        weight = decoder.decode(piece_packed, piece_scales)  # (rows, in)
        if piece_bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(piece_bias, x, weight.t(), out=out)
    return result


def linear_4bit_input_grad(grad: Tensor, q: Quantized4bit, into: Tensor | None = None) -> Tensor:
    """grad (M, out) @ W -> (M, in), summed over pieces of W's rows (added to `into` if given)."""
    if not _is_row_aligned(q):
        weight = dequantize_4bit(q, grad.dtype)
        return grad @ weight if into is None else into.addmm_(grad, weight)
    rows, decoder, packed, scales = _row_pieces(q, grad)
    result = into
    for part, piece_packed, piece_scales in zip(
        grad.split(rows, dim=1), packed, scales, strict=True
    ):
        weight = decoder.decode(piece_packed, piece_scales)  # (rows, in)
        if result is None:
            result = torch.mm(part, weight)
        else:
            result.addmm_(part, weight)
    assert result is not None
    return result


class _Linear4bitFunction(torch.autograd.Function):
    """y = x Wᵀ + b with a frozen 4-bit W: backward dequantizes W again, chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, q: Quantized4bit) -> Tensor:
        ctx.q = q
        ctx.has_bias = bias is not None
        return linear_4bit_forward(x, q, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = linear_4bit_input_grad(grad_output.contiguous(), ctx.q)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_output.sum(dim=0)
        return grad_x, grad_bias, None


def linear_4bit(x: Tensor, q: Quantized4bit, bias: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b with W = dequantize_4bit(q), computed in x's dtype.

    On CPU, W is dequantized a piece of output rows at a time into buffers reused from piece
    to piece, so at most one piece of W is ever in full precision (all of it only off CPU,
    for one matmul) and nothing is kept between calls. Differentiable in x and bias (W is
    frozen): backward dequantizes W again instead of saving it.

    Args:
        x: (..., in_features) fp32, bf16 or fp16.
        q: a quantized 2-D weight of shape (out_features, in_features).
        bias: (out_features,) in x's dtype, or None.
    """
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(
            f"linear_4bit needs x (..., {q.shape[-1]}) and a 2-D weight; got x of shape "
            f"{tuple(x.shape)} and a weight of shape {tuple(q.shape)}."
        )
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        result = x2d.new_empty(0, q.shape[0])
    elif torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        result = _Linear4bitFunction.apply(x2d, bias, q)
    else:
        result = linear_4bit_forward(x2d, q, bias)
    return result.view(*x.shape[:-1], q.shape[0])
