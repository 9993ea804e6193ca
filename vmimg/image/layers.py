"""Layers: decompress each layer once into the cache, then read its entries.

A layer blob (tar, tar+gzip or tar+zstd) is streamed once: its compressed
bytes are hashed against the descriptor's digest, decompressed (isal for
gzip, zstandard for zstd), hashed against the config's diff_id, and written
as a plain tar into the cache. From then on the layer is that tar: entries
are indexed from it (header fields plus the offset of their bytes), and
writers copy file bytes straight out of it. Nothing is ever extracted.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, cast

import zstandard
from isal import isal_zlib

from vmimg.digest import Hasher
from vmimg.errors import CacheError, DigestError, LayerError
from vmimg.image.cache import Cache, SpaceGuard, commit, format_size
from vmimg.image.oci import Descriptor, layer_compression
from vmimg.testhook import pause_point

NS_PER_S = 1_000_000_000
# The widest time any output stores (erofs and tar keep signed 64-bit seconds): a layer's
# time outside it is clamped here, and each writer clamps further to its own format.
MIN_TIME_NS = -(1 << 63) * NS_PER_S
MAX_TIME_NS = ((1 << 63) - 1) * NS_PER_S + NS_PER_S - 1
CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAGIC = {"gzip": GZIP_MAGIC, "zstd": ZSTD_MAGIC}
GZIP_WBITS = 31  # zlib's "gzip wrapper" window bits
# zstd input fed per call: a run-length block of 128 KiB costs 4 bytes, so
# 1 KiB of input yields at most 32 MiB.
ZSTD_FEED = 1 << 10
PAX_XATTR_PREFIX = "SCHILY.xattr."
# isal's stubs type IsalError as an instance; it is the class zlib-style code raises.
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    cast(type[BaseException], isal_zlib.IsalError),
    zstandard.ZstdError,
)


@dataclass(frozen=True)
class Extent:
    """A run of a sparse file's data: `length` bytes at logical `offset`."""

    offset: int
    length: int


@dataclass(frozen=True)
class LayerFile:
    """A layer's uncompressed tar in the cache, and the name to blame in errors."""

    tar_path: str
    name: str  # the layer's digest, for error messages


class UnpackAborted(LayerError):
    """Another layer of the same image failed: this one stops too (never shown: fetch_layers
    reports the failure that caused it)."""


class UnpackBudget:
    """What one image's layers may expand to in all (Cache.max_unpacked_size), shared by the
    threads that unpack them. It bounds each layer too: a decompression bomb stops at the
    limit, and so does an image of many large layers. The layer that crosses the limit
    fails; the others stop at their next chunk (`abort` stops them for any other failure)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.error: LayerError | None = None
        self._aborted = False
        self._lock = threading.Lock()

    def charge(self, n: int, what: str) -> None:
        """Account for `n` more uncompressed bytes of `what`; LayerError past the limit."""
        with self._lock:
            if self._aborted:
                raise UnpackAborted(f"{what}: stopped")
            self.used += n
            if self.used > self.limit:
                self._aborted = True
                self.error = LayerError(
                    f"{what}: expands the image past --max-unpacked-size "
                    f"{format_size(self.limit)}; refusing it"
                )
                raise self.error

    def abort(self) -> None:
        with self._lock:
            self._aborted = True


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
    """Decompress a stream of concatenated gzip members or zstd frames.

    Every chunk yielded is bounded, however well the input compresses: a few
    KiB of gzip or zstd can claim gigabytes, and one call that returned them
    whole would run the process out of memory before --max-unpacked-size
    is ever checked.
    """
    if kind == "none":
        while data := read(CHUNK):
            yield data
        return
    dec = _new_decompressor(kind)
    started = False
    data, pos = b"", 0  # input not yet given to the decompressor: data[pos:]
    try:
        while True:
            if pos >= len(data):
                data, pos = read(CHUNK), 0
                if not data:
                    break
            started = True
            if kind == "gzip":
                out = dec.decompress(data[pos:] if pos else data, CHUNK)  # type: ignore[call-arg]
                data, pos = dec.unconsumed_tail, 0  # type: ignore[attr-defined]
            else:
                # zstd has no output limit per call: feed it slices small enough
                # that even run-length blocks cannot expand them past ~32 MiB.
                out = dec.decompress(memoryview(data)[pos : pos + ZSTD_FEED])  # type: ignore[arg-type]
                pos += ZSTD_FEED
            if out:
                yield out
            if dec.eof:
                data, pos = dec.unused_data + data[pos:], 0
                magic = _MAGIC[kind]
                if data[: len(magic)] != magic[: len(data)]:
                    raise LayerError(f"{what}: data after the end of the {kind} stream")
                dec = _new_decompressor(kind)
                started = False
    except DECOMPRESS_ERRORS as e:
        raise LayerError(f"{what}: corrupt {kind} data: {e}") from None
    if started and not dec.eof:
        raise LayerError(f"{what}: truncated {kind} stream")


class _HashingReader:
    """Wraps a blob stream: hashes what is read, refuses to read past `limit`."""

    def __init__(self, stream: BinaryIO, algorithm: str, limit: int | None, what: str) -> None:
        self.stream = stream
        self.hasher = Hasher(algorithm)
        self.limit = limit
        self.what = what
        self.head = b""

    def read(self, n: int) -> bytes:
        if self.head:
            data, self.head = self.head, b""
        else:
            data = self.stream.read(n)
        self.hasher.update(data)
        if self.limit is not None and self.hasher.size > self.limit:
            raise DigestError(
                f"{self.what}: blob is larger than its descriptor's size {self.limit}"
            )
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
    budget: UnpackBudget | None = None,
    space: SpaceGuard | None = None,
) -> str:
    """Make sure the uncompressed tar of this layer is in the cache; return its path,
    pinned in `cache` (so that `vmimg cache prune` leaves it while we read it).

    `desc.digest` may be empty (docker-archive layers have none); then only
    the diff_id is checked. The layer's bytes count against `budget` (default: a
    budget of its own), whether unpacked now or found in the cache.
    """
    what = f"layer {desc.digest or diff_id}"
    final = cache.layer_path(diff_id)
    budget = budget or UnpackBudget(cache.max_unpacked_size)
    space = space or SpaceGuard(cache.root)
    unpacked = False
    while not cache.pin(final):  # not there, or pruned while we looked
        with cache.lock(f"layer-{diff_id}"):
            if os.path.exists(final):
                continue
            try:
                _unpack(cache, desc, diff_id, open_blob, on_progress, what, final, budget, space)
            except OSError as e:
                # Sources turn their own read errors into SourceError: this is the cache's disk.
                raise CacheError(
                    f"{what}: cannot write to the cache {cache.root}: {e.strerror}"
                ) from e
            unpacked = True
        pause_point("layer-committed")
    if not unpacked:
        budget.charge(os.path.getsize(final), what)
    return final


def _unpack(
    cache: Cache,
    desc: Descriptor,
    diff_id: str,
    open_blob: Callable[[], BinaryIO],
    on_progress: Callable[[int], None] | None,
    what: str,
    final: str,
    budget: UnpackBudget,
    space: SpaceGuard,
) -> None:
    """Stream, verify and decompress one layer blob into the cache as `final`."""
    declared = layer_compression(desc.media_type)
    algo = desc.digest.split(":", 1)[0] if desc.digest else "sha256"
    with open_blob() as stream, cache.temp_file(".tar", "layer-") as (out, tmp):
        reader = _HashingReader(stream, algo, desc.size if desc.digest else None, what)
        kind = sniff_compression(reader.peek(4), declared)
        tar_hash = Hasher("sha256")
        reported = 0
        for chunk in decompressed_chunks(reader.read, kind, what):
            tar_hash.update(chunk)
            budget.charge(len(chunk), what)
            space.take(len(chunk), what)
            out.write(chunk)
            if on_progress:  # the blob's bytes: what the layer's size in the manifest counts
                on_progress(reader.hasher.size - reported)
                reported = reader.hasher.size
            pause_point("layer-unpack-midway")
        if desc.digest:
            reader.hasher.verify(desc.digest, desc.size, what)
        tar_hash.verify(diff_id, None, f"{what} (uncompressed)")
        out.flush()
        commit(tmp, final)


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


# Limits on what one tar member may claim. tarfile reads a PAX or GNU long-name
# header whole and collects a sparse map in a list, so an unchecked claim is a
# memory bomb; the values mirror what Linux itself can store.
MAX_META_HEADER_BYTES = 1 << 20  # PAX records or a GNU long name, per member
MAX_SPARSE_RUNS = 1 << 20  # data runs in one sparse file's map
GNU_SPARSE_RUNS_PER_BLOCK = 21  # old GNU sparse: runs per extension block
GNU_ISEXTENDED_OFFSET = 504  # old GNU sparse: "another block follows" flag
MAX_ID = (1 << 32) - 1  # uid_t and gid_t are 32 bits
XATTR_NAME_MAX = 255  # Linux limits (include/uapi/linux/limits.h)
XATTR_SIZE_MAX = 1 << 16
# Digits of whole seconds past which a PAX time is clamped without being parsed: more
# than MAX_TIME_NS has, few enough that int() never meets its digit limit.
TIME_DIGITS_MAX = 30
_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
# What tarfile lets escape on malformed headers besides TarError.
_MALFORMED = (ValueError, OverflowError, IndexError, KeyError, UnicodeError, EOFError)


class _OversizedHeader(tarfile.HeaderError):
    """A member's header data (PAX records, long name, sparse map) is too large."""


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile's member parser, refusing header data too large to hold in memory.

    The checks run before tarfile reads the data they bound.
    """

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > MAX_META_HEADER_BYTES:
            raise _OversizedHeader(
                f"extended header of {self.size} bytes (more than {MAX_META_HEADER_BYTES})"
            )
        return super()._proc_member(tf)  # type: ignore[misc,no-any-return]

    def _proc_sparse(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        assert tf.fileobj is not None
        start = tf.fileobj.tell()
        extended = bool(self._sparse_structs[1])  # type: ignore[attr-defined]
        blocks = 0
        while extended:
            blocks += 1
            if blocks * GNU_SPARSE_RUNS_PER_BLOCK > MAX_SPARSE_RUNS:
                raise _OversizedHeader(f"sparse map of more than {MAX_SPARSE_RUNS}")
            block = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                raise _OversizedHeader("truncated sparse map")
            extended = bool(block[GNU_ISEXTENDED_OFFSET])
        tf.fileobj.seek(start)
        return super()._proc_sparse(tf)  # type: ignore[misc,no-any-return]

    def _proc_gnusparse_10(
        self, next: tarfile.TarInfo, pax_headers: dict[str, str], tf: tarfile.TarFile
    ) -> None:
        assert tf.fileobj is not None
        start = tf.fileobj.tell()
        count = tf.fileobj.read(tarfile.BLOCKSIZE).split(b"\n", 1)[0].strip()
        tf.fileobj.seek(start)
        if count.isdigit() and int(count) > MAX_SPARSE_RUNS:
            raise _OversizedHeader(f"sparse map of {int(count)} runs")
        super()._proc_gnusparse_10(next, pax_headers, tf)  # type: ignore[misc]


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, clamped to what a Tree holds (each writer
    clamps it further to what its format stores): an odd time never fails an image."""
    text = info.pax_headers.get("mtime")
    mtime = _pax_time_ns(text) if text else int(info.mtime) * NS_PER_S
    return min(max(mtime, MIN_TIME_NS), MAX_TIME_NS)


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _pax_time_ns(text: str) -> int:
    """A PAX decimal time ("-1.5") parsed exactly: a float would lose the nanoseconds."""
    whole, _, frac = text.partition(".")
    negative = whole.startswith("-")
    digits = whole[1:] if negative else whole
    if not _is_digits(digits) or (frac and not _is_digits(frac)):
        raise LayerError(f"invalid PAX mtime {text[:64]!r}")
    sign = -1 if negative else 1
    if len(digits.lstrip("0")) > TIME_DIGITS_MAX:
        return sign * (MAX_TIME_NS + 1)  # far outside the range: the caller clamps it
    ns = int((frac + "000000000")[:9]) if frac else 0
    return sign * (int(digits) * NS_PER_S + ns)


def iter_entries(tar_path: str, what: str) -> Iterator[Entry]:
    """Every member of an uncompressed layer tar, in tar order.

    Anything malformed or impossible is a LayerError naming `what` (and the
    member, when there is one): nothing else escapes, whatever the bytes.
    """
    name = ""
    try:
        layer_size = os.path.getsize(tar_path)
        with tarfile.open(
            tar_path,
            "r:",
            encoding="utf-8",
            errors="surrogateescape",
            tarinfo=_CheckedTarInfo,
        ) as tf:
            while (info := tf.next()) is not None:
                tf.members.clear()  # type: ignore[attr-defined]  # else it keeps them all
                name = info.name
                entry = _entry_of(info)
                _check_stored_bytes(entry, layer_size)
                yield entry
            name = ""
            _check_end(tf, layer_size)
    except LayerError as e:
        raise LayerError(f"{what}: {_member(name)}{e}") from None
    except (tarfile.TarError, *_MALFORMED) as e:
        raise LayerError(f"{what}: invalid tar: {_member(name)}{e}") from None


def _member(name: str) -> str:
    return f"entry {name!r}: " if name else ""


def _check_stored_bytes(e: Entry, layer_size: int) -> None:
    stored = sum(x.length for x in e.sparse) if e.sparse is not None else e.size
    is_file = e.type in (
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.CONTTYPE,
        tarfile.GNUTYPE_SPARSE,
    )
    if is_file and e.offset + stored > layer_size:
        raise LayerError(f"claims {stored} bytes of data; the layer ends before that")


def _check_end(tf: tarfile.TarFile, layer_size: int) -> None:
    """tarfile stops quietly at a corrupt header after the first: refuse instead."""
    assert tf.fileobj is not None
    if tf.offset >= layer_size:
        return  # no end-of-archive blocks: tolerated, as GNU tar does
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if block.count(0) != len(block):
        raise LayerError(f"invalid tar header at offset {tf.offset}")


def _entry_of(info: tarfile.TarInfo) -> Entry:
    xattrs: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith(PAX_XATTR_PREFIX):
            xname, xvalue = _bytes(key[len(PAX_XATTR_PREFIX) :]), _bytes(value)
            if not xname or b"\0" in xname or len(xname) > XATTR_NAME_MAX:
                raise LayerError(f"invalid xattr name {xname[:64]!r}")
            if len(xvalue) > XATTR_SIZE_MAX:
                raise LayerError(
                    f"xattr {xname[:64]!r} of {len(xvalue)} bytes (Linux's limit is "
                    f"{XATTR_SIZE_MAX})"
                )
            xattrs[xname] = xvalue
    name, linkname = _bytes(info.name), _bytes(info.linkname)
    if b"\0" in name or b"\0" in linkname:
        raise LayerError("NUL byte in a name")
    if info.size < 0:
        raise LayerError(f"negative size {info.size}")
    if not (0 <= info.uid <= MAX_ID and 0 <= info.gid <= MAX_ID):
        raise LayerError(f"uid/gid {info.uid}:{info.gid} outside 0..{MAX_ID}")
    sparse = None
    if info.sparse is not None:
        # tarfile reports the logical size in .size; the stored bytes are the runs
        runs = cast(list[tuple[int, int]], info.sparse)  # typeshed says bytes; it is not
        sparse = _checked_runs(runs, info.size)
    return Entry(
        name=name,
        type=info.type,
        mode=info.mode,
        uid=info.uid,
        gid=info.gid,
        mtime_ns=_mtime_ns(info),
        size=info.size,
        linkname=linkname,
        devmajor=info.devmajor,
        devminor=info.devminor,
        offset=info.offset_data,
        xattrs=xattrs,
        sparse=sparse,
    )


def _checked_runs(runs: list[tuple[int, int]], size: int) -> tuple[Extent, ...]:
    """A sparse map's data runs: in order, not overlapping, inside the file."""
    out: list[Extent] = []
    end = 0
    for offset, length in runs:
        if length == 0:
            continue
        if offset < end or length < 0 or offset + length > size:
            raise LayerError(f"sparse map run ({offset}, {length}) overlaps or leaves the file")
        out.append(Extent(offset, length))
        end = offset + length
    return tuple(out)


# -- the entry index ---------------------------------------------------------------
#
# Parsing a layer's headers costs more than everything else a rebuild does, and a layer
# tar in the cache never changes: so its parsed entries are kept beside it, in marshal
# (plain data only: bytes, ints, tuples, dicts), and a second conversion of any image that
# shares the layer reads them back instead of parsing the tar again.

INDEX_SUFFIX = ".idx"
INDEX_FORMAT = 2  # 2: PAX times parsed strictly and clamped, not refused


def _entry_record(e: Entry) -> tuple[object, ...]:
    sparse = tuple((x.offset, x.length) for x in e.sparse) if e.sparse is not None else None
    return (e.name, e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.linkname,
            e.devmajor, e.devminor, e.offset, e.xattrs, sparse)  # fmt: skip


def _entry_of_record(r: tuple[Any, ...]) -> Entry:
    sparse = tuple(Extent(o, n) for o, n in r[12]) if r[12] is not None else None
    name, kind, mode, uid, gid, mtime_ns, size, linkname, major, minor, offset, xattrs = r[:12]
    return Entry(name, kind, mode, uid, gid, mtime_ns, size, linkname, major, minor, offset,
                 xattrs, sparse)  # fmt: skip


def load_entries(tar_path: str, what: str) -> list[Entry]:
    """The entries of a layer tar: from its index when there is one, else parsed (and
    the index written for next time, when the tar is in the cache's layers area)."""
    index_path = tar_path + INDEX_SUFFIX
    try:
        with open(index_path, "rb") as f:
            version, records = marshal.load(f)
        if version == INDEX_FORMAT:
            return [_entry_of_record(r) for r in records]
    except (OSError, EOFError, ValueError, TypeError):
        pass
    entries = list(iter_entries(tar_path, what))
    layers_dir = os.path.dirname(os.path.dirname(tar_path))
    if os.path.basename(layers_dir) == "layers":  # a layer in the cache: keep its index
        _write_index(index_path, entries, Cache(os.path.dirname(layers_dir)))
    return entries


def _write_index(index_path: str, entries: list[Entry], cache: Cache) -> None:
    # An index is an optimisation: a full disk must not fail the build.
    with contextlib.suppress(OSError), cache.temp_file(".idx", "index-") as (f, tmp):
        marshal.dump((INDEX_FORMAT, [_entry_record(e) for e in entries]), f)
        f.flush()
        pause_point("index-write")
        commit(tmp, index_path)
