"""Writes at rising offsets, gathered into few large pwrites.

An image of 100,000 small files is 100,000 small writes (a block of data, a directory
block) at offsets that mostly follow each other. One system call each is most of the
time such a writer takes; gathered, they are a few hundred.
"""

from __future__ import annotations

from vmimg.image.fsutil import pwrite_all
from vmimg.testhook import pause_point

GATHER_MAX = 4 << 20  # bytes held before they are written
# A gap shorter than a block is filled with zeros: it lies in a block the writes on
# either side of it touch, so the image allocates no block it would not have anyway.
GAP_MAX = 4096
_ZEROS = memoryview(bytes(GAP_MAX))


class GatherWriter:
    """`put(offset, data)` in any order; consecutive ones (or ones a part-block apart)
    leave as one write. `flush()` before reading the output back or closing it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = 0  # output offset of buf[0]
        self.buf = bytearray()

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        buf = self.buf
        gap = offset - self.start - len(buf)
        if not buf or not 0 <= gap < GAP_MAX or len(buf) >= GATHER_MAX:
            self.flush()
            buf = self.buf
            self.start = offset
            gap = 0
        if gap:
            buf += _ZEROS[:gap]
        buf += data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """`data`, already gathered by the caller, written at once (after what is held):
        put would copy it into the buffer first."""
        self.flush()
        pause_point("output-write-midway")
        pwrite_all(self.fd, data, offset)

    def flush(self) -> None:
        if self.buf:
            pause_point("output-write-midway")
            pwrite_all(self.fd, self.buf, self.start)
            self.buf = bytearray()
