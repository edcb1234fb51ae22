"""A last-resort chart when matplotlib is absent: bars on axes, as a PNG, in pure Python.

No text (there is no font here): the Markdown report carries the numbers, this shows shape.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def rect(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.h, max(y0, y1))
        line = bytes(rgb) * (x1 - x0)
        for y in range(y0, y1):
            at = (y * self.w + x0) * 3
            self.px[at:at + len(line)] = line

    def hline(self, x0: int, x1: int, y: int, rgb: tuple[int, int, int], dash: int = 0) -> None:
        for x in range(x0, x1):
            if dash and (x // dash) % 2:
                continue
            self.rect(x, y, x + 1, y + 2, rgb)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3])
                       for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def bar_chart(path: Path, values: list[float], reference: float | None = None,
              target: float | None = None) -> Path:
    """Bars for ``values``; a dashed grey line at ``reference``, a red one at ``target``."""
    w, h, margin = 640, 400, 40
    canvas = Canvas(w, h)
    top = max([*values, reference or 0, 1.0]) * 1.1
    plot_h = h - 2 * margin

    def y_of(v: float) -> int:
        return int(h - margin - plot_h * v / top)

    canvas.rect(margin, margin, margin + 2, h - margin, (0, 0, 0))
    canvas.rect(margin, h - margin, w - margin, h - margin + 2, (0, 0, 0))
    slot = (w - 2 * margin) // max(1, len(values))
    for i, v in enumerate(values):
        x = margin + i * slot + slot // 4
        canvas.rect(x, y_of(v), x + slot // 2, h - margin, (31, 119, 180))
    if reference:
        canvas.hline(margin, w - margin, y_of(reference), (120, 120, 120), dash=8)
    if target:
        canvas.hline(margin, w - margin, y_of(target), (214, 39, 40), dash=4)
    path.write_bytes(canvas.png())
    return path
