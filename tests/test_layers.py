"""Decompressing layer blobs (vmimg/image/layers.py: sniff_compression, decompressed_chunks).

gzip members (isal) and zstd frames (_zstdstream) go through the same loop: whole reads in,
at most CHUNK out per call, a new decompressor after each member or frame. Whatever the
frames and however the source cuts its reads, the output must be the frames' content in
chunks of at most CHUNK; truncation, garbage after the end and corrupt data must be the
LayerErrors they were; skippable zstd frames are skipped wherever they are.
"""

from __future__ import annotations

import errno
import gzip
import io
import itertools
import os
import random
import threading
import time
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings

from tests import layerkit as L
from tests.zstdframes import block, frame_header, rle_bomb, skippable, streams
from vmimg.digest import digest_bytes
from vmimg.errors import CacheError, LayerError
from vmimg.image import cache as cache_module
from vmimg.image import layers as layers_module
from vmimg.image import unsynced
from vmimg.image.cache import Cache
from vmimg.image.layers import CHUNK, decompressed_chunks, sniff_compression, unpack_layer_to_cache
from vmimg.image.oci import Descriptor
from vmimg.image.ocilayout import LAYER_MEDIA_TYPES

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WHAT = "layer sha256:x"


def reader(blob: bytes, sizes: list[int] | None = None) -> Callable[[int], bytes]:
    """A source's read(n): at most n bytes, fewer when `sizes` says so (cycled), as a
    network stream may give them."""
    f = io.BytesIO(blob)
    cycle = itertools.cycle(sizes or [CHUNK])
    return lambda n: f.read(min(n, next(cycle)))


def decompress(blob: bytes, kind: str, sizes: list[int] | None = None) -> list[bytes]:
    chunks = list(decompressed_chunks(reader(blob, sizes), kind, WHAT))
    assert all(0 < len(c) <= CHUNK for c in chunks)
    return chunks


def zstd(data: bytes, **options: bool) -> bytes:
    return zstandard.ZstdCompressor(**options).compress(data)


# -- what comes out --------------------------------------------------------------------------


@SETTINGS
@given(stream=streams(), sizes=st.lists(st.integers(1, CHUNK), min_size=1, max_size=5))
def test_zstd_streams_decode_whole_however_read(
    stream: tuple[bytes, bytes, int], sizes: list[int]
) -> None:
    blob, expected, _count = stream
    if blob[:4] != zstd(b"")[:4]:  # a skippable frame first: sniffed as zstd all the same
        assert sniff_compression(blob[:4], "none") == "zstd"
    assert b"".join(decompress(blob, "zstd", sizes)) == expected


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_big_layers_come_in_full_chunks(kind: str) -> None:
    """3.5 MiB in each of three members or frames that compress well: full chunks but for
    the last of each member or frame."""
    rng = random.Random(5)
    parts = [rng.randbytes(CHUNK // 256) * (256 * 3 + 128) for _ in range(3)]
    compress = gzip.compress if kind == "gzip" else zstd
    chunks = decompress(b"".join(compress(p) for p in parts), kind)
    assert b"".join(chunks) == b"".join(parts)
    assert [len(c) for c in chunks] == [CHUNK, CHUNK, CHUNK, CHUNK // 2] * 3


def test_a_full_chunk_is_followed_by_the_output_held_back() -> None:
    """No checksum, no content size: the last read's input is all taken when the chunk is
    full, and the rest of the frame's output comes without more input."""
    data = random.Random(6).randbytes(CHUNK // 4) * 5
    blob = zstd(data, write_checksum=False, write_content_size=False)
    assert b"".join(decompress(blob, "zstd")) == data
    assert b"".join(decompress(blob, "zstd", [len(blob) - 3, 3])) == data


def test_skippable_frames_are_skipped_anywhere() -> None:
    """Before: a leading skippable frame made the blob "none" (a tar that failed its diff_id),
    one after a frame was "data after the end". zstd -d skips them; so does vmimg."""
    frame = zstd(b"content")
    for blob in (
        skippable(b"meta") + frame,
        frame + skippable(b"meta", 15) + frame,
        frame + skippable(b"") + skippable(b"x" * 3000, 9),
        skippable(b"x" * 100) + skippable(b"y") + frame,
    ):
        assert sniff_compression(blob[:4], "zstd") == "zstd"
        expected = b"content" * blob.count(frame)
        assert b"".join(decompress(blob, "zstd")) == expected
        assert b"".join(decompress(blob, "zstd", [1])) == expected  # magic cut at every byte
    assert decompress(skippable(b"only"), "zstd") == []


def test_sniffing() -> None:
    assert sniff_compression(gzip.compress(b"x")[:4], "zstd") == "gzip"
    assert sniff_compression(zstd(b"x")[:4], "gzip") == "zstd"
    for variant in (0, 15):
        assert sniff_compression(skippable(b"", variant)[:4], "none") == "zstd"
    assert sniff_compression(b"\x60\x2a\x4d\x18", "zstd") == "none"  # not a skippable magic
    assert sniff_compression(L.layer(L.file("f", b"x"))[:4], "gzip") == "none"
    assert sniff_compression(b"\x28\xb5", "zstd") == "zstd"  # too short to say: as declared


def test_an_empty_blob_is_an_empty_layer() -> None:
    assert decompress(b"", "zstd") == [] and decompress(b"", "gzip") == []


# -- what is refused -------------------------------------------------------------------------


def test_truncated_zstd_everywhere_but_between_frames() -> None:
    frames = [zstd(b"a" * 5000, write_checksum=True), zstd(random.Random(7).randbytes(9000))]
    blob = b"".join(frames)
    for cut in range(1, len(blob)):
        if cut == len(frames[0]):
            assert b"".join(decompress(blob[:cut], "zstd")) == b"a" * 5000
            continue
        with pytest.raises(LayerError, match=f"^{WHAT}: truncated zstd stream$"):
            decompress(blob[:cut], "zstd", [cut // 2 + 1])


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
@pytest.mark.parametrize(
    "after",
    [b"garbage", b"\0" * 10, b"\x25\xb5\x2f\xfd" + bytes(20), b"\x28\xb5\x2f\xfe" + bytes(9)],
)
def test_data_after_the_end(kind: str, after: bytes) -> None:
    """Anything after a member or frame but another one (a zstd legacy frame included),
    however the source cuts its reads (before, a byte at a time made it "corrupt data")."""
    compress = gzip.compress if kind == "gzip" else zstd
    blob = compress(b"payload") + after
    end = len(blob) - len(after)
    for sizes in (None, [1], [end + 1], [end + 2, 1], [end - 1, 1]):
        with pytest.raises(LayerError, match=f"^{WHAT}: data after the end of the {kind} stream$"):
            decompress(blob, kind, sizes)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_the_start_of_a_magic_number_then_nothing_is_truncation(kind: str) -> None:
    compress = gzip.compress if kind == "gzip" else zstd
    with pytest.raises(LayerError, match=f"^{WHAT}: truncated {kind} stream$"):
        decompress(compress(b"payload") + compress(b"")[:1], kind)


def test_corrupt_zstd() -> None:
    frame = bytearray(zstd(random.Random(8).randbytes(20_000) * 3, write_checksum=True))
    frame[-1] ^= 1
    bad_block = frame_header(17) + block(3, 5, bytes(5), last=True)
    for blob in (bytes(frame), bad_block, zstd(b"fine") + bad_block):
        with pytest.raises(LayerError, match=f"^{WHAT}: corrupt zstd data: "):
            decompress(blob, "zstd")


def test_a_window_past_128_mib_is_refused_clearly() -> None:
    blob = frame_header(28) + block(0, 1, b"x", last=True)
    with pytest.raises(
        LayerError,
        match=f"^{WHAT}: corrupt zstd data: Frame requires too much memory for decoding "
        r"\(the frame's window is over 128 MiB, the most vmimg accepts\)$",
    ):
        decompress(blob, "zstd")
    assert decompress(frame_header(27) + block(0, 1, b"x", last=True), "zstd") == [b"x"]


def test_a_bomb_is_read_a_chunk_at_a_time() -> None:
    """1 MiB of RLE blocks claims 32 GiB: each chunk is CHUNK bytes, and the first few need
    one read. (UnpackBudget stops the layer at --max-unpacked-size.)"""
    bomb = rle_bomb(CHUNK // 4)
    reads = []
    source = io.BytesIO(bomb)

    def read(n: int) -> bytes:
        reads.append(n)
        return source.read(n)

    first = list(itertools.islice(decompressed_chunks(read, "zstd", WHAT), 100))
    assert [len(c) for c in first] == [CHUNK] * 100 and len(reads) == 1


# -- through the cache -----------------------------------------------------------------------


def test_a_zstd_layer_with_skippable_frames_unpacks(cache: Cache) -> None:
    tar = L.layer(*(L.file(f"d/f{i}", bytes([i]) * 1000 * i) for i in range(40)))
    half = len(tar) // 2
    blob = skippable(b"made by hand") + zstd(tar[:half]) + skippable(b"") + zstd(tar[half:])
    desc = Descriptor(LAYER_MEDIA_TYPES["zstd"], digest_bytes(blob), len(blob))
    layer = unpack_layer_to_cache(cache, desc, digest_bytes(tar), lambda: io.BytesIO(blob))
    assert layer.entries is not None and len(layer.entries) == 40
    with open(layer.tar_path, "rb") as f:
        assert f.read() == tar


class _SlowBlob(io.BytesIO):
    """A blob that arrives slowly, a chunk at a time, as from a network."""

    def read(self, n: int | None = -1) -> bytes:
        time.sleep(0.002)
        return super().read(min(n if n is not None and n >= 0 else CHUNK, 64 << 10))


def test_a_layer_goes_out_to_disk_while_it_is_unpacked(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where it cannot be marked as this boot's (image/unsynced.py), its temporary file is
    flushed (the real fdatasync) before it is complete, so that the fsync before its rename
    finds little left to write."""
    monkeypatch.setattr(unsynced, "_boot", [None])  # no boot id: no mark
    monkeypatch.setattr(cache_module, "FLUSH_EVERY_S", 0.001)
    flushed: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        real(fd)
        flushed.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fdatasync", spy)
    tar = L.layer(*(L.file(f"f{i}", random.randbytes(64 << 10)) for i in range(64)))
    blob = gzip.compress(tar, compresslevel=1)
    desc = Descriptor(LAYER_MEDIA_TYPES["gzip"], digest_bytes(blob), len(blob))
    layer = unpack_layer_to_cache(cache, desc, digest_bytes(tar), lambda: _SlowBlob(blob))
    with open(layer.tar_path, "rb") as f:
        assert f.read() == tar
    assert any(0 < size < len(tar) for size in flushed), flushed


def _gzip_layer(count: int) -> tuple[bytes, bytes, Descriptor]:
    """A layer of `count` files: its tar, its gzip blob, the blob's descriptor."""
    tar = L.layer(*(L.file(f"f{i}", bytes([i]) * 3000) for i in range(count)))
    blob = gzip.compress(tar, compresslevel=1)
    return tar, blob, Descriptor(LAYER_MEDIA_TYPES["gzip"], digest_bytes(blob), len(blob))


def test_a_layer_committed_in_the_background_is_in_the_cache_once_settled(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its entries come back before its tar is durable and renamed (the commit waits here
    until the test lets it go); settle() waits for it and pins it."""
    tar, blob, desc = _gzip_layer(20)
    go = threading.Event()
    real_commit = layers_module.commit

    def held_commit(tmp: str, final: str, synced: bool = True) -> None:
        assert go.wait(30)
        real_commit(tmp, final, synced)

    monkeypatch.setattr(layers_module, "commit", held_commit)
    slots = threading.BoundedSemaphore(1)
    layer = unpack_layer_to_cache(
        cache, desc, digest_bytes(tar), lambda: io.BytesIO(blob), background=slots
    )
    assert layer.entries is not None and len(layer.entries) == 20
    assert not slots.acquire(False)  # taken by the commit under way
    assert not os.path.exists(layer.tar_path)  # not yet: its commit is held
    assert len(os.listdir(cache.tmp_dir)) == 1
    go.set()
    layer.settle()
    with open(layer.tar_path, "rb") as f:
        assert f.read() == tar
    assert os.listdir(cache.tmp_dir) == []
    assert os.path.abspath(layer.tar_path) in cache._pins  # kept from prune while in use
    with cache.lock(f"layer-{digest_bytes(tar)}"):  # released: this does not wait
        pass
    assert slots.acquire(False)  # given back when the commit ended


def test_a_layer_is_committed_in_place_without_a_free_slot_or_with_a_malformed_tar(
    cache: Cache,
) -> None:
    """Commits under way are bounded (500 layers would hold a thousand threads and files);
    and flatten reads a malformed layer's tar to report it, so it must be there."""
    tar, blob, desc = _gzip_layer(3)
    none_free = threading.BoundedSemaphore(1)
    assert none_free.acquire(False)
    layer = unpack_layer_to_cache(
        cache, desc, digest_bytes(tar), lambda: io.BytesIO(blob), background=none_free
    )
    assert layer.pending is None and os.path.exists(layer.tar_path)
    bad = b"x" * 512 + tar[512:]  # the first header's checksum fails
    blob = gzip.compress(bad)
    desc = Descriptor(LAYER_MEDIA_TYPES["gzip"], digest_bytes(blob), len(blob))
    layer = unpack_layer_to_cache(
        cache, desc, digest_bytes(bad), lambda: io.BytesIO(blob),
        background=threading.BoundedSemaphore(1),
    )  # fmt: skip
    assert layer.entries is None and layer.pending is None and os.path.exists(layer.tar_path)


def test_a_background_commit_that_fails_is_raised_when_settled(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar, blob, desc = _gzip_layer(5)

    def full(tmp: str, final: str, synced: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layers_module, "commit", full)
    slots = threading.BoundedSemaphore(1)
    layer = unpack_layer_to_cache(
        cache, desc, digest_bytes(tar), lambda: io.BytesIO(blob), background=slots
    )
    with pytest.raises(CacheError, match=r"cannot write to the cache .*: No space left"):
        layer.settle()
    assert not os.path.exists(layer.tar_path)
    assert os.listdir(cache.tmp_dir) == []  # the temporary tar is gone
    assert slots.acquire(False)
