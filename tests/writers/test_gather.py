"""GatherWriter: writes at rising offsets leave as few large writes, with the same bytes,
and a gap of a whole block or more stays a hole (an image allocates no block it would not
have had with one write per piece)."""

from __future__ import annotations

import os
from pathlib import Path

from vmimg.rootfs.writers.gather import GATHER_MAX, GatherWriter

BLOCK = 4096


def test_pieces_land_where_put_and_whole_block_gaps_stay_holes(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 64 * BLOCK)
        out = GatherWriter(fd)
        pieces = {
            0: b"a" * 30,  # then a gap to the next block: filled, same block
            BLOCK: b"b" * 5000,  # spans two blocks
            3 * BLOCK: b"c",  # directly after the block "b" ends in
            8 * BLOCK: b"d" * 10,  # four whole blocks later: a new write, a hole between
            7 * BLOCK: b"e" * 10,  # backwards: a new write too
        }
        for offset, data in pieces.items():
            out.put(offset, data)
        out.flush()
        data = os.pread(fd, 64 * BLOCK, 0)
        expected = bytearray(64 * BLOCK)
        for offset, piece in pieces.items():
            expected[offset : offset + len(piece)] = piece
        assert data == bytes(expected)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4 * BLOCK  # blocks 0-3 written, 4-6 not
        assert os.lseek(fd, 4 * BLOCK, os.SEEK_DATA) == 7 * BLOCK
    finally:
        os.close(fd)


def test_a_full_buffer_is_written_and_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        out = GatherWriter(fd)
        chunk = b"x" * BLOCK
        count = GATHER_MAX // BLOCK + 3
        for i in range(count):
            out.put(i * BLOCK, chunk)
            assert len(out.buf) <= GATHER_MAX
        out.flush()
        assert os.path.getsize(path) == count * BLOCK
        assert os.pread(fd, count * BLOCK, 0) == chunk * count
    finally:
        os.close(fd)


def test_write_goes_out_at_once_after_what_is_held(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        out = GatherWriter(fd)
        out.put(0, b"a" * 10)
        out.write(BLOCK, bytearray(b"b" * 20))
        assert not out.buf  # held bytes went first
        out.put(0, b"c")  # later puts may overwrite, as writes in that order do
        out.flush()
        data = os.pread(fd, 2 * BLOCK, 0)
        assert data == b"c" + b"a" * 9 + bytes(BLOCK - 10) + b"b" * 20
    finally:
        os.close(fd)
