"""The zstd frame decompressor with an output limit per call (vmimg/image/_zstdstream.c).

The oracle is python-zstandard (its own libzstd): whatever the frames, the limit and the way
the input is cut, the decompressor must give the same bytes, never more than the limit per
call. Hostile frames (run-length bombs, windows past the limit, corrupt blocks, wrong
types) must give clean errors and bounded work.
"""

from __future__ import annotations

import random
import struct
import sys
import threading
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings

from tests.zstdframes import BLOCK_MAX, MAGIC, block, frame_header, rle_bomb, skippable, streams
from vmimg.image._zstdstream import WINDOW_LOG_MAX, Decompressor, ZstdError

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KIB = 1 << 10
MIB = 1 << 20

# -- driving the decompressor as layers.decompressed_chunks does ------------------------------


@dataclass
class Run:
    chunks: list[bytes]  # each call's output
    consumed: list[int]  # each call's input taken (given minus unconsumed_tail)
    frames: int  # frames that ended


def run(blob: bytes, max_length: int, feed: int) -> Run:
    """Decode concatenated frames, `feed` bytes of input at a time, at most `max_length`
    out per call; a new Decompressor after each frame, as decompressed_chunks does."""
    dec = Decompressor()
    result = Run([], [], 0)
    pos, data, full, started = 0, b"", False, False
    while True:
        if not data and not full:
            data, pos = blob[pos : pos + feed], pos + feed
            if not data:
                break
        started = True
        out = dec.decompress(data, max_length)
        assert len(out) <= max_length
        tail = dec.unconsumed_tail
        assert data.endswith(tail)
        if len(out) < max_length and not dec.eof:
            assert tail == b"", "output room left, yet input not taken"
        result.chunks.append(out)
        result.consumed.append(len(data) - len(tail))
        data, full = tail, len(out) == max_length
        if dec.eof:
            assert tail == b""
            data, full, started = dec.unused_data + data, False, False
            dec = Decompressor()
            result.frames += 1
    assert not started, "the input ended inside a frame"
    return result


def python_zstandard(blob: bytes) -> bytes:
    """The oracle: python-zstandard reading every frame."""
    return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()


# -- differential: the same output as python-zstandard ----------------------------------------


def max_lengths(size: int) -> st.SearchStrategy[int]:
    """Output limits, small ones only where they do not mean too many calls."""
    low = max(1, size // 20_000)
    edges = [n for n in (1, 4096, BLOCK_MAX - 1, BLOCK_MAX, BLOCK_MAX + 1, MIB) if n >= low]
    return st.one_of(st.sampled_from(edges), st.integers(low, 2 * MIB))


@SETTINGS
@given(stream=streams(), data=st.data())
def test_decodes_as_python_zstandard(stream: tuple[bytes, bytes, int], data: st.DataObject) -> None:
    blob, expected, count = stream
    max_length = data.draw(max_lengths(len(expected)), label="max_length")
    feed = data.draw(st.one_of(st.integers(1, 64), st.integers(1, len(blob) + 1)), label="feed")
    got = run(blob, max_length, feed)
    assert b"".join(got.chunks) == expected == python_zstandard(blob)
    assert got.frames == count


@SETTINGS
@given(stream=streams())
def test_one_call_takes_a_whole_frame_when_the_limit_allows(
    stream: tuple[bytes, bytes, int],
) -> None:
    """All input given at once and room for all output: one call per frame, the rest of the
    input in unused_data."""
    blob, expected, count = stream
    got = run(blob, len(expected) + 1, len(blob))
    assert len(got.chunks) == count and b"".join(got.chunks) == expected


def test_pending_output_comes_without_more_input() -> None:
    """No checksum, no content size: the last block is all the input left, and libzstd holds
    its output back when the limit is reached; a call with no input gives the rest."""
    data = random.Random(1).randbytes(100 * KIB) * 3
    blob = zstandard.ZstdCompressor(write_checksum=False, write_content_size=False).compress(data)
    dec = Decompressor()
    out = dec.decompress(blob, 1000)
    assert len(out) == 1000 and not dec.eof
    rest = []
    while not dec.eof:
        rest.append(dec.decompress(dec.unconsumed_tail, 50_000))
    assert out + b"".join(rest) == data and dec.unused_data == b""


def test_unused_data_is_what_follows_the_frame() -> None:
    frame = zstandard.ZstdCompressor().compress(b"hello")
    dec = Decompressor()
    assert dec.decompress(frame + b"next frame?", 100) == b"hello"
    assert dec.eof and dec.unused_data == b"next frame?" and dec.unconsumed_tail == b""
    with pytest.raises(EOFError):
        dec.decompress(b"more", 100)


def test_skippable_frames_are_frames_with_no_output() -> None:
    for variant in (0, 7, 15):
        dec = Decompressor()
        assert dec.decompress(skippable(b"metadata", variant) + b"after", 10) == b""
        assert dec.eof and dec.unused_data == b"after"
    # one byte at a time, as a slow source would give it
    dec = Decompressor()
    for byte in skippable(b"x" * 100):
        assert not dec.eof
        assert dec.decompress(bytes([byte]), 10) == b""
    assert dec.eof


def test_any_bytes_like_input() -> None:
    frame = zstandard.ZstdCompressor().compress(b"abc" * 100)
    for data in (bytearray(frame), memoryview(frame), memoryview(b"xx" + frame)[2:]):
        dec = Decompressor()
        assert dec.decompress(data, sys.maxsize) == b"abc" * 100 and dec.eof


# -- hostile input ---------------------------------------------------------------------------


def test_rle_bomb_comes_out_in_bounded_chunks() -> None:
    """1,024 RLE blocks (4 KiB of input) are 128 MiB of output: never more than max_length
    per call, and a call takes only the input its output needs (no decoding ahead)."""
    bomb = rle_bomb(1024, b"\xaa")
    for max_length, feed in ((MIB, len(bomb)), (100_000, 4096), (BLOCK_MAX, 7)):
        got = run(bomb, max_length, feed)
        assert sum(map(len, got.chunks)) == 1024 * BLOCK_MAX and got.frames == 1
        assert set(b"".join(got.chunks[:3])) == {0xAA}
        # each call: the blocks its output needs, plus the one libzstd may hold back
        blocks_per_call = max_length // BLOCK_MAX + 2
        assert max(got.consumed) <= 6 + 4 * blocks_per_call


def test_a_bomb_of_a_megabyte_stops_at_the_first_chunk() -> None:
    """262,144 RLE blocks claim 32 GiB; the first call returns its 1 MiB having read a few
    dozen blocks."""
    bomb = rle_bomb(MIB // 4)
    dec = Decompressor()
    out = dec.decompress(bomb, MIB)
    assert out == bytes(MIB) and not dec.eof
    assert len(bomb) - len(dec.unconsumed_tail) <= 6 + 4 * (MIB // BLOCK_MAX + 2)


def test_window_past_the_limit_is_refused_before_any_output() -> None:
    assert WINDOW_LOG_MAX == 27
    body = block(0, 3, b"abc", last=True)
    dec = Decompressor()
    assert dec.decompress(frame_header(WINDOW_LOG_MAX) + body, 10) == b"abc" and dec.eof
    for window_log in (WINDOW_LOG_MAX + 1, 31, 41):
        with pytest.raises(ZstdError, match="window is over 128 MiB"):
            Decompressor().decompress(frame_header(window_log) + body, 10)
    # level 22 streamed (no content size): the largest window of any level, the limit itself
    obj = zstandard.ZstdCompressor(level=22).compressobj()
    frame = obj.compress(b"abc" * 1000) + obj.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 1 << WINDOW_LOG_MAX
    assert run(frame, MIB, len(frame)).chunks == [b"abc" * 1000]
    # a real compressor's frames past it: --long=28 and up write such frames
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
    obj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = obj.compress(b"abc" * 1000) + obj.flush()
    with pytest.raises(ZstdError, match="Frame requires too much memory"):
        Decompressor().decompress(frame, MIB)


def test_corrupt_blocks_raise_zstd_errors() -> None:
    header = frame_header(17)
    with pytest.raises(ZstdError, match="corruption"):  # the reserved block type
        Decompressor().decompress(header + block(3, 10, bytes(10), last=True), MIB)
    with pytest.raises(ZstdError):  # a compressed block of noise
        Decompressor().decompress(header + block(2, 64, bytes(range(64)), last=True), MIB)
    with pytest.raises(ZstdError):  # an RLE block larger than the window allows
        Decompressor().decompress(frame_header(10) + block(1, 2 * KIB, b"x", last=True), MIB)
    data = random.Random(2).randbytes(50 * KIB) * 2
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    frame[-2] ^= 0xFF  # the checksum
    dec = Decompressor()
    with pytest.raises(ZstdError, match="checksum"):
        dec.decompress(bytes(frame), MIB)
    with pytest.raises(ZstdError, match="earlier error"):  # and it stays refused
        dec.decompress(b"", MIB)
    assert issubclass(ZstdError, ValueError)


def test_only_zstd_frames_are_decoded() -> None:
    """Garbage, and frames of zstd's legacy formats (which libzstd may be built to read),
    are refused at the first byte that cannot be a magic number's, however they arrive."""
    legacy = struct.pack("<I", 0xFD2FB527) + bytes(20)  # v0.7's magic number
    for data in (b"hello world", legacy, bytes(8), MAGIC[:3] + b"\0"):
        with pytest.raises(ZstdError, match="not a zstd frame"):
            Decompressor().decompress(data, MIB)
        dec = Decompressor()
        with pytest.raises(ZstdError, match="not a zstd frame"):
            for byte in data:
                dec.decompress(bytes([byte]), MIB)


def test_truncated_frames_just_wait_for_more() -> None:
    data = random.Random(3).randbytes(10 * KIB) * 20
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    for cut in (0, 1, 4, 5, 6, len(blob) // 2, len(blob) - 1):
        dec = Decompressor()
        out = dec.decompress(blob[:cut], MIB)
        assert not dec.eof and dec.unconsumed_tail == b"" and data.startswith(out)
        assert out + dec.decompress(blob[cut:], MIB) == data and dec.eof


def test_wrong_arguments_are_type_and_value_errors() -> None:
    dec = Decompressor()
    for data in ("text", None, 12, [1, 2]):
        with pytest.raises(TypeError):
            dec.decompress(data, 10)  # type: ignore[arg-type]
    for max_length in (None, "10", 1.5):
        with pytest.raises(TypeError):
            dec.decompress(b"", max_length)  # type: ignore[arg-type]
    for max_length in (0, -1, -(2**40)):
        with pytest.raises(ValueError, match="max_length"):
            dec.decompress(b"", max_length)
    with pytest.raises(OverflowError):
        dec.decompress(b"", 2**70)
    with pytest.raises(TypeError):
        dec.decompress(b"")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Decompressor(27)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        dec.eof = True  # type: ignore[misc]
    # after all that, it still decodes
    frame = zstandard.ZstdCompressor().compress(b"still fine")
    assert dec.decompress(frame, max_length=100) == b"still fine" and dec.eof


def test_the_gil_is_released_and_one_object_serves_one_thread_at_a_time() -> None:
    """While a thread decodes 128 MiB in one call, this one runs (the GIL is released) and
    its calls on the same object are refused, not a race on libzstd's context."""
    bomb = rle_bomb(1024)
    dec = Decompressor()
    result: list[bytes] = []
    worker = threading.Thread(target=lambda: result.append(dec.decompress(bomb, 1 << 27)))
    refused = 0
    worker.start()
    while worker.is_alive() and not refused:
        try:
            assert dec.decompress(b"", 1) == b""  # before the worker's call: nothing to give
        except RuntimeError as e:
            assert "two threads" in str(e)
            refused += 1
        except EOFError:  # after it
            break
    worker.join()
    assert refused == 1 and len(result[0]) == 1 << 27 and dec.eof
