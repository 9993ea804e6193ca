"""zstd frames made by hand (RFC 8878, section 3.1): run-length bombs, windows of any size,
skippable frames; and hypothesis strategies for streams of real frames (python-zstandard's,
every level and option). Used by tests/test_zstdstream.py and tests/test_layers.py."""

from __future__ import annotations

import random
import struct

import hypothesis.strategies as st
import zstandard

KIB = 1 << 10
BLOCK_MAX = 128 * KIB  # zstd's largest block: what one 4-byte RLE block can claim
MAGIC = struct.pack("<I", 0xFD2FB528)


def frame_header(window_log: int) -> bytes:
    """A frame header with no content size, no checksum, no dictionary, not single-segment:
    just the window descriptor (exponent window_log - 10, mantissa 0)."""
    return MAGIC + bytes([0, (window_log - 10) << 3])


def block(kind: int, size: int, body: bytes, last: bool = False) -> bytes:
    """A block header (3 bytes, little-endian: last, type, size) and its body. Types: 0 raw,
    1 RLE (body: the one byte; size: how many times), 2 compressed, 3 reserved."""
    return (int(last) | kind << 1 | size << 3).to_bytes(3, "little") + body


def rle_bomb(blocks: int, byte: bytes = b"\0") -> bytes:
    """`blocks` RLE blocks of 128 KiB each, 4 bytes apiece: 32,768 times their size."""
    rle = block(1, BLOCK_MAX, byte)
    return frame_header(17) + rle * (blocks - 1) + block(1, BLOCK_MAX, byte, last=True)


def skippable(payload: bytes, variant: int = 0) -> bytes:
    """A skippable frame (magic 0x184D2A50 + variant, 0..15): decoders skip its payload."""
    return struct.pack("<II", 0x184D2A50 + variant, len(payload)) + payload


# -- real frames ------------------------------------------------------------------------------


@st.composite
def contents(draw: st.DrawFn) -> bytes:
    """Bytes zstd compresses in every way: noise, runs, repeats near and far."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    parts: list[bytes] = []
    for kind, size in draw(
        st.lists(st.tuples(st.sampled_from("nrpb"), st.integers(0, 200 * KIB)), max_size=4)
    ):
        if kind == "n":
            parts.append(rng.randbytes(size))
        elif kind == "r":
            parts.append(bytes([rng.randrange(256)]) * size)
        elif kind == "p":
            parts.append((rng.randbytes(rng.randrange(1, 300)) * (size // 2 + 1))[:size])
        elif parts:  # a far repeat of something already there
            parts.append(parts[rng.randrange(len(parts))][:size])
    return b"".join(parts)


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """One frame (or a skippable one): (its bytes, what it decodes to)."""
    if draw(st.integers(0, 9)) == 0:
        return skippable(draw(st.binary(max_size=300)), draw(st.integers(0, 15))), b""
    data = draw(contents())
    c = zstandard.ZstdCompressor(
        level=draw(
            st.sampled_from([-50, -5, -1, 1, 3, 6, 12, 19])
        ),  # 22: test_zstdstream's window test
        write_checksum=draw(st.booleans()),
        write_content_size=draw(st.booleans()),
    )
    if draw(st.booleans()):  # streamed: no content size, maybe several flushes
        obj = c.compressobj()
        cut = draw(st.integers(0, len(data)))
        blob = obj.compress(data[:cut]) + obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        blob += obj.compress(data[cut:]) + obj.flush()
    else:
        blob = c.compress(data)
    return blob, data


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """Concatenated frames: (bytes, what they decode to, how many frames)."""
    parts = draw(st.lists(frames(), min_size=1, max_size=4))
    return b"".join(p[0] for p in parts), b"".join(p[1] for p in parts), len(parts)
