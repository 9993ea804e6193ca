"""Layers: decompress each layer once into the cache, then read its entries.

A layer blob (tar, tar+gzip or tar+zstd) is streamed once: its compressed
bytes are hashed against the descriptor's digest, decompressed (isal for
gzip, zstandard for zstd), hashed against the config's diff_id, and written
as a plain tar into the cache. From then on the layer is that tar: entries
are indexed from it (header fields plus the offset of their bytes), and
writers copy file bytes straight out of it. Nothing is ever extracted.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, cast

import zstandard
from isal import isal_zlib

from vmimg.cache import Cache, Hasher
from vmimg.errors import DigestError, LayerError
from vmimg.oci import Descriptor, layer_compression
from vmimg.tree import Extent

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_WBITS = 31  # zlib's "gzip wrapper" window bits
# A layer that expands past this is refused (a decompression bomb); override
# with VMIMG_MAX_LAYER_BYTES.
DEFAULT_MAX_LAYER_BYTES = 64 << 30
PAX_XATTR_PREFIX = "SCHILY.xattr."
# isal's stubs type IsalError as an instance; it is the class zlib-style code raises.
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    cast(type[BaseException], isal_zlib.IsalError),
    zstandard.ZstdError,
)


def max_layer_bytes() -> int:
    return int(os.environ.get("VMIMG_MAX_LAYER_BYTES", DEFAULT_MAX_LAYER_BYTES))


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


def _new_decompressor(kind: str) -> _Decompressor:
    if kind == "gzip":
        d: _Decompressor = isal_zlib.decompressobj(GZIP_WBITS)
        return d
    z: _Decompressor = zstandard.ZstdDecompressor().decompressobj()
    return z


def sniff_compression(head: bytes, declared: str) -> str:
    """Compression by magic bytes; the declared one only when the bytes say nothing."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none" if len(head) >= 4 or declared == "none" else declared


def decompressed_chunks(read: Callable[[int], bytes], kind: str, what: str) -> Iterator[bytes]:
    """Decompress a stream of concatenated gzip members or zstd frames."""
    if kind == "none":
        while data := read(CHUNK):
            yield data
        return
    dec = _new_decompressor(kind)
    started = False
    try:
        while data := read(CHUNK):
            while data:
                started = True
                out = dec.decompress(data)
                if out:
                    yield out
                if dec.eof:
                    data = dec.unused_data
                    dec = _new_decompressor(kind)
                    started = False
                else:
                    data = b""
    except DECOMPRESS_ERRORS as e:
        raise LayerError(f"{what}: corrupt {kind} data: {e}") from None
    if started and not dec.eof:
        raise LayerError(f"{what}: truncated {kind} stream")


class _HashingReader:
    """Wraps a blob stream: hashes what is read, refuses to read past `limit`."""

    def __init__(self, stream: BinaryIO, algorithm: str, limit: int | None) -> None:
        self.stream = stream
        self.hasher = Hasher(algorithm)
        self.limit = limit
        self.head = b""

    def read(self, n: int) -> bytes:
        if self.head:
            data, self.head = self.head, b""
        else:
            data = self.stream.read(n)
        self.hasher.update(data)
        if self.limit is not None and self.hasher.size > self.limit:
            raise DigestError(f"blob is larger than its descriptor's size {self.limit}")
        return data

    def peek(self, n: int) -> bytes:
        while len(self.head) < n:
            more = self.stream.read(n - len(self.head))
            if not more:
                break
            self.head += more
        return self.head


def unpack_layer_to_cache(
    cache: Cache,
    desc: Descriptor,
    diff_id: str,
    open_blob: Callable[[], BinaryIO],
    on_progress: Callable[[int], None] | None = None,
) -> str:
    """Make sure the uncompressed tar of this layer is in the cache; return its path.

    `desc.digest` may be empty (docker-archive layers have none); then only
    the diff_id is checked.
    """
    what = f"layer {desc.digest or diff_id}"
    final = cache.layer_path(diff_id)
    if os.path.exists(final):
        return final
    with cache.lock(f"layer-{diff_id}"):
        if os.path.exists(final):
            return final
        declared = layer_compression(desc.media_type)
        limit = max_layer_bytes()
        algo = desc.digest.split(":", 1)[0] if desc.digest else "sha256"
        with open_blob() as stream, cache.temp_file(".tar") as (out, tmp):
            reader = _HashingReader(stream, algo, desc.size if desc.digest else None)
            kind = sniff_compression(reader.peek(4), declared)
            tar_hash = Hasher("sha256")
            for chunk in decompressed_chunks(reader.read, kind, what):
                tar_hash.update(chunk)
                if tar_hash.size > limit:
                    raise LayerError(
                        f"{what}: expands past {limit} bytes (VMIMG_MAX_LAYER_BYTES); refusing it"
                    )
                out.write(chunk)
                if on_progress:
                    on_progress(len(chunk))
            if desc.digest:
                reader.hasher.verify(desc.digest, desc.size, what)
            tar_hash.verify(diff_id, None, f"{what} (uncompressed)")
            out.flush()
            os.rename(tmp, final)
        if desc.digest and desc.digest != diff_id:
            cache.record_layer_link(desc.digest, diff_id)
    return final


# -- entries -------------------------------------------------------------------


@dataclass
class Entry:
    """One tar member, decoded: what the flattener needs, nothing more."""

    name: bytes
    type: bytes  # tarfile type flag
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    linkname: bytes
    devmajor: int
    devminor: int
    offset: int  # where the member's bytes start in the layer tar
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    sparse: tuple[Extent, ...] | None = None


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    if text:
        # Parse the decimal string exactly: a float would lose the nanoseconds.
        whole, _, frac = text.partition(".")
        try:
            secs = int(whole)
            ns = int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            raise LayerError(f"invalid PAX mtime {text!r}") from None
        sign = -1 if whole.startswith("-") else 1
        return secs * 1_000_000_000 + sign * ns
    return int(info.mtime) * 1_000_000_000


def iter_entries(tar_path: str, what: str) -> Iterator[Entry]:
    """Every member of an uncompressed layer tar, in tar order."""
    try:
        with tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
            for info in tf:
                yield _entry_of(info)
    except tarfile.TarError as e:
        raise LayerError(f"{what}: invalid tar: {e}") from None


def _entry_of(info: tarfile.TarInfo) -> Entry:
    xattrs: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith(PAX_XATTR_PREFIX):
            xattrs[_bytes(key[len(PAX_XATTR_PREFIX) :])] = _bytes(value)
    sparse = None
    if info.sparse is not None:
        # tarfile reports the logical size in .size; the stored bytes are the runs
        runs = cast(list[tuple[int, int]], info.sparse)  # typeshed says bytes; it is not
        sparse = tuple(Extent(o, n) for o, n in runs if n)
    return Entry(
        name=_bytes(info.name),
        type=info.type,
        mode=info.mode,
        uid=info.uid,
        gid=info.gid,
        mtime_ns=_mtime_ns(info),
        size=info.size,
        linkname=_bytes(info.linkname),
        devmajor=info.devmajor,
        devminor=info.devminor,
        offset=info.offset_data,
        xattrs=xattrs,
        sparse=sparse,
    )
