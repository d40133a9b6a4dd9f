"""A dependency-free line chart written as a PNG, used when matplotlib is not installed.

It draws panels with axes and one polyline (with a dot per point) per series, and no text: the
colours are fixed (see ``docs/training.md``) and the numbers are in ``metrics.jsonl``. PNG
encoding: 8-bit RGB rows, each prefixed by filter byte 0, deflated into one IDAT chunk.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Color = tuple[int, int, int]
Point = tuple[float, float]
AXIS: Color = (90, 90, 90)
MARGIN = 16


class Canvas:
    """An RGB image on a white background with clipped pixel, line and dot drawing."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            offset = (y * self.width + x) * 3
            self.pixels[offset : offset + 3] = bytes(color)

    def line(self, start: tuple[int, int], end: tuple[int, int], color: Color) -> None:
        """Bresenham's line from ``start`` to ``end`` (pixel coordinates, y down)."""
        (x0, y0), (x1, y1) = start, end
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        step_x, step_y = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        error = dx + dy
        while True:
            self.set(x0, y0, color)
            if (x0, y0) == (x1, y1):
                return
            doubled = 2 * error
            if doubled >= dy:
                error, x0 = error + dy, x0 + step_x
            if doubled <= dx:
                error, y0 = error + dx, y0 + step_y

    def dot(self, x: int, y: int, color: Color) -> None:
        for offset_x in (-1, 0, 1):
            for offset_y in (-1, 0, 1):
                self.set(x + offset_x, y + offset_y, color)

    def to_png(self) -> bytes:
        row_bytes = self.width * 3
        raw = b"".join(
            b"\x00" + bytes(self.pixels[row * row_bytes : (row + 1) * row_bytes])
            for row in range(self.height)
        )
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b"")
        )


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def _span(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    return (low - 0.5, high + 0.5) if high == low else (low, high)


def draw_panel(
    canvas: Canvas, box: tuple[int, int, int, int], series: Sequence[tuple[Sequence[Point], Color]]
) -> None:
    """Draw axes in ``box`` (left, top, right, bottom) and each series scaled to fit."""
    left, top, right, bottom = box
    canvas.line((left, bottom), (right, bottom), AXIS)
    canvas.line((left, top), (left, bottom), AXIS)
    points = [point for values, _ in series for point in values]
    if not points:
        return
    (x_low, x_high), (y_low, y_high) = _span([p[0] for p in points]), _span([p[1] for p in points])

    def place(point: Point) -> tuple[int, int]:
        x = left + 4 + (point[0] - x_low) / (x_high - x_low) * (right - left - 8)
        y = bottom - 4 - (point[1] - y_low) / (y_high - y_low) * (bottom - top - 8)
        return round(x), round(y)

    for values, color in series:
        placed = [place(point) for point in values]
        for start, end in itertools.pairwise(placed):
            canvas.line(start, end, color)
        for x, y in placed:
            canvas.dot(x, y, color)


def write_chart(
    path: Path,
    panels: Sequence[Sequence[tuple[Sequence[Point], Color]]],
    panel_size: tuple[int, int] = (320, 240),
) -> Path:
    """Write the panels side by side as a PNG at ``path``."""
    width, height = panel_size
    canvas = Canvas(width * len(panels), height)
    for index, series in enumerate(panels):
        box = (index * width + MARGIN, MARGIN, (index + 1) * width - MARGIN, height - MARGIN)
        draw_panel(canvas, box, series)
    path.write_bytes(canvas.to_png())
    return path
