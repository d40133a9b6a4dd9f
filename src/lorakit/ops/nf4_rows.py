"""Decoding packed 4-bit weight rows into fp32 (or compute-dtype) rows, for the CPU matmul.

A 4-bit linear layer on CPU dequantizes its weight a piece of rows at a time in every forward
and backward call. Allocating the piece buffers in each call left glibc holding freed blocks
between layers (QLoRA training peaked far above its live tensors), so each thread keeps one
set of buffers per device, grown to the largest piece it has met, and the decoders viewing
them. Off CPU a call takes fresh buffers: the caching allocator reuses them already.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from itertools import repeat

import torch
from torch import Tensor

# Decoders kept per thread before the cache starts over (each is a handful of views).
MAX_CACHED_DECODERS = 64

Take = Callable[[str, int, torch.dtype], Tensor]


def _fresh(device: torch.device) -> Take:
    def take(purpose: str, numel: int, dtype: torch.dtype) -> Tensor:
        return torch.empty(numel, dtype=dtype, device=device)

    return take


class _Scratch(threading.local):
    """This thread's reusable buffers (by purpose, dtype and device) and decoders on them."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self.decoders: dict[tuple[object, ...], RowDecoder] = {}
        self.device = torch.device("cpu")

    def take(self, purpose: str, numel: int, dtype: torch.dtype) -> Tensor:
        """The first `numel` elements of this purpose's buffer, reallocated larger if needed."""
        key = (purpose, dtype, self.device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self.decoders.clear()  # they view the buffer being replaced
            self.buffers.pop(key, None)
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[key] = buffer
        return buffer[:numel]


_SCRATCH = _Scratch()


def row_decoder(
    rows: int, columns: int, blocks_per_row: int, table: Tensor, dtype: torch.dtype
) -> RowDecoder:
    """A decoder of up to `rows` rows of 2·`columns` values, on this thread's reused buffers.

    The rows it returns are overwritten by the next decode on this thread, so use them at once.
    """
    device = table.device
    if device.type != "cpu":
        return RowDecoder(rows, rows, columns, blocks_per_row, table, dtype)
    key = (rows, columns, blocks_per_row, table.data_ptr(), dtype, device)
    decoder = _SCRATCH.decoders.get(key)
    if decoder is None:
        if len(_SCRATCH.decoders) >= MAX_CACHED_DECODERS:
            _SCRATCH.decoders.clear()
        _SCRATCH.device = device
        decoder = RowDecoder(rows, rows, columns, blocks_per_row, table, dtype, scratch=_SCRATCH)
        _SCRATCH.decoders[key] = decoder
    return decoder


class RowDecoder:
    """Turns packed weight rows into fp32 (or compute-dtype) rows through reused buffers.

    A row of 2C values is C bytes: each byte is widened to an int32 index, gathers its pair of
    decoded values from the byte table straight into the weight buffer, and the pairs are
    scaled by their block's absmax. Up to `rows` rows are returned per call, decoded
    `decode_rows` at a time so that the index and value pieces stay in cache. Views are built
    once here, so each piece costs three tensor operations (four with a cast).
    """

    def __init__(
        self,
        rows: int,
        decode_rows: int,
        columns: int,
        blocks_per_row: int,
        table: Tensor,
        dtype: torch.dtype,
        decoded: Tensor | None = None,
        scratch: _Scratch | None = None,
    ) -> None:
        device = table.device
        self.table = table
        self.decode_rows = decode_rows
        take = scratch.take if scratch is not None else _fresh(device)
        self.index = take("index", decode_rows * columns, torch.int32).view(decode_rows, columns)
        if decoded is None:
            decoded = take("decoded", rows * columns, torch.int64)
        # int64 (rows, C) = the fp32 pairs (code[hi], code[lo]) of each byte = fp32 (rows, 2C)
        self.pairs = decoded.view(rows, columns)
        self.weight = decoded.view(torch.float32).view(rows, 2 * columns)
        values = self.weight.view(rows, blocks_per_row, -1)
        self.cast = None
        if dtype != torch.float32:
            self.cast = take("cast", rows * 2 * columns, dtype).view(rows, 2 * columns)
        casts: Iterable[Tensor | None] = repeat(None)
        if self.cast is not None:
            casts = self.cast.split(decode_rows)
        self.pieces = list(
            zip(
                self.pairs.split(decode_rows),
                values.split(decode_rows),
                self.weight.split(decode_rows),
                casts,
                strict=False,
            )
        )

    def decode(self, packed_rows: Tensor, scales: Tensor) -> Tensor:
        """(count, C) uint8 codes and (count, S, 1) fp32 scales -> (count, 2C) weight rows."""
        packed_pieces = packed_rows.split(self.decode_rows)
        scale_pieces = scales.split(self.decode_rows)
        for piece, packed, scale in zip(self.pieces, packed_pieces, scale_pieces, strict=False):
            pairs, values, weight, cast = piece
            count = packed.shape[0]
            index = self.index
            if count != self.decode_rows:  # the last, shorter piece
                index, pairs, values = index[:count], pairs[:count], values[:count]
                weight = weight[:count]
                cast = None if cast is None else cast[:count]
            index.copy_(packed)
            torch.index_select(self.table, 0, index.view(-1), out=pairs.view(-1))
            values.mul_(scale)
            if cast is not None:
                cast.copy_(weight)
        result = self.weight if self.cast is None else self.cast
        return result[: packed_rows.shape[0]]
