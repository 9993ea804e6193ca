"""Layers: decompress each layer once into the cache, reading its entries on the way.

A layer blob (tar, tar+gzip or tar+zstd) is streamed once: its compressed
bytes are hashed against the descriptor's digest, decompressed (isal for
gzip, libzstd through our _zstdstream.c for zstd), hashed against the
config's diff_id, written as a plain tar into the cache, and its tar headers
parsed from the same chunks (tarparse.py) into entries (header fields plus
the offset of their bytes). From then on the layer is that tar: writers copy
file bytes straight out of it. Nothing is ever extracted. A conversion has the
tar made durable and renamed into the cache by a thread while it flattens the
entries (`background`, LayerFile.settle).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from isal import isal_zlib

from vmimg.digest import Hasher, hash_fd
from vmimg.errors import CacheError, DigestError, LayerError
from vmimg.image import _zstdstream, unsynced
from vmimg.image.cache import Cache, Flusher, SpaceGuard, commit
from vmimg.image.fsutil import format_size
from vmimg.image.oci import Descriptor, layer_compression
from vmimg.image.tarparse import MAX_TIME_NS as MAX_TIME_NS
from vmimg.image.tarparse import MIN_TIME_NS as MIN_TIME_NS
from vmimg.image.tarparse import NS_PER_S as NS_PER_S
from vmimg.image.tarparse import Entry as Entry
from vmimg.image.tarparse import Extent as Extent
from vmimg.image.tarparse import Source, SourceFailed, file_chunks, parse_layer, parse_source
from vmimg.testhook import pause_point

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A zstd skippable frame: 4 bytes 0x184D2A50..0x184D2A5F (little-endian), a 4-byte length, then
# that many bytes that decoders skip (RFC 8878 3.1.2; zstd -d skips them anywhere).
ZSTD_SKIPPABLE_MAGIC = b"\x2a\x4d\x18"  # bytes 1..3; byte 0 is 0x50..0x5f
MAGIC_LEN = 4  # zstd's (and more than gzip's 2)
GZIP_WBITS = 31  # zlib's "gzip wrapper" window bits
# isal's stubs type IsalError as an instance; it is the class zlib-style code raises.
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    cast(type[BaseException], isal_zlib.IsalError),
    _zstdstream.ZstdError,
)


@dataclass
class LayerFile:
    """A layer's uncompressed tar in the cache, and the name to blame in errors. Not frozen:
    flatten takes `entries` over (and lets each go as it is applied)."""

    tar_path: str
    name: str  # the layer's digest, for error messages
    # Its entries, when they were parsed as it was unpacked (else: from its index or tar)
    entries: list[Entry] | None = field(default=None, compare=False, repr=False)
    # A layer unpacked just now with `background`: its tar still being made durable and
    # renamed to `tar_path` by a thread of its own (see settle)
    pending: PendingCommit | None = field(default=None, compare=False, repr=False)

    def settle(self) -> None:
        """Wait until the tar is at `tar_path` (it is, unless still being committed); raise
        what its commit met. Nothing may read `tar_path` before."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.wait()


def settle_layers(layers: list[LayerFile]) -> None:
    """settle() every layer, each whatever the others met; then raise the first failure."""
    failure: BaseException | None = None
    for layer in layers:
        try:
            layer.settle()
        except BaseException as e:  # raised below, once all are settled
            failure = failure or e
    if failure is not None:
        raise failure


def settle_quietly(layers: list[LayerFile]) -> None:
    """settle_layers for a failure elsewhere, which is the one to report: what the layers'
    commits met is dropped (each is settled all the same)."""
    with contextlib.suppress(Exception):
        settle_layers(layers)


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


def _new_decompressor(kind: str) -> isal_zlib.Decompress | _zstdstream.Decompressor:
    """One gzip member (isal) or zstd frame (_zstdstream), zlib's way: at most `max_length`
    bytes out per call, the input not taken in `unconsumed_tail`."""
    if kind == "gzip":
        return isal_zlib.decompressobj(GZIP_WBITS)
    return _zstdstream.Decompressor()


def _starts_frame(data: bytes, kind: str) -> bool:
    """Whether `data` (maybe only the first bytes of it so far) can start a gzip member, or a
    zstd frame (skippable ones too)."""
    if kind == "gzip":
        return data[:2] == GZIP_MAGIC[: len(data)]
    if data[:4] == ZSTD_MAGIC[: len(data)]:
        return True
    return (data[0] & 0xF0) == 0x50 and data[1:4] == ZSTD_SKIPPABLE_MAGIC[: len(data) - 1]


def sniff_compression(head: bytes, declared: str) -> str:
    """Compression by magic bytes; the declared one only when the bytes say nothing."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if len(head) >= 4 and _starts_frame(head[:4], "zstd"):
        return "zstd"
    return "none" if len(head) >= 4 or declared == "none" else declared


def decompressed_chunks(read: Callable[[int], bytes], kind: str, what: str) -> Iterator[bytes]:
    """Decompress a stream of concatenated gzip members or zstd frames (skippable zstd
    frames are skipped wherever they are).

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
    started = False  # dec has been given input
    ended = False  # a member or frame has ended: what follows must start another
    data = b""  # input not yet given to the decompressor
    # The last call filled its CHUNK: the decompressor may hold more output without more input
    # (libzstd decodes a block of up to 128 KiB at a time; zlib may be inside a match).
    full = False
    try:
        while True:
            if not data and not full:
                data = read(CHUNK)
                if not data:
                    break
            if ended and not started:
                # judged by a whole magic number, however the reads cut it
                while len(data) < MAGIC_LEN and (more := read(CHUNK)):
                    data += more
                if not _starts_frame(data, kind):
                    raise LayerError(f"{what}: data after the end of the {kind} stream")
            started = True
            out = dec.decompress(data, CHUNK)
            data = dec.unconsumed_tail
            full = len(out) == CHUNK
            if out:
                yield out
            if dec.eof:
                data, full = dec.unused_data + data, False
                dec, started, ended = _new_decompressor(kind), False, True
    except DECOMPRESS_ERRORS as e:
        raise LayerError(f"{what}: corrupt {kind} data: {e}") from None
    if started and not dec.eof:
        raise LayerError(f"{what}: truncated {kind} stream")


class _BlobReader:
    """Wraps a blob stream: counts what is read, refuses to read past `limit`, and passes
    each chunk to `on_read` (WriteBehind hashes it, off the decompressing thread)."""

    def __init__(
        self,
        stream: BinaryIO,
        limit: int | None,
        what: str,
        on_read: Callable[[bytes], None] | None = None,
    ) -> None:
        self.stream = stream
        self.size = 0
        self.limit = limit
        self.what = what
        self.on_read = on_read
        self.head = b""

    def read(self, n: int) -> bytes:
        if self.head:
            data, self.head = self.head, b""
        else:
            data = self.stream.read(n)
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            raise DigestError(
                f"{self.what}: blob is larger than its descriptor's size {self.limit}"
            )
        if self.on_read is not None and data:
            self.on_read(data)
        return data

    def peek(self, n: int) -> bytes:
        while len(self.head) < n:
            more = self.stream.read(n - len(self.head))
            if not more:
                break
            self.head += more
        return self.head


# The hash and the cache write of a layer's chunks run behind its decompression and parsing
# (WriteBehind). Decompressing ahead of the parser in a thread of its own, the other way to
# split the work, measured slower on 2 cores (minbase, two layers unpacked at once: 1.41 s with
# it, 1.13 s without), since layers already unpack in parallel and the hand-offs take the GIL.
WRITE_BEHIND_CHUNKS = 4  # layer chunks and blob chunks, 1 MiB each at most


class WriteBehind:
    """A layer's decompressed chunks hashed (its diff_id) and written to the cache by a thread
    of their own, in order, a few chunks behind the decompression and the header parsing;
    and the blob's compressed chunks hashed (its digest) by the same thread. hashlib and
    file writes release the GIL, so on two cores they cost the decompressing thread nothing
    (Debian minbase to ext4, cold, medians of 6: 0.97 s before, 0.76 s; hashing the
    compressed blob here too took another 0.05 s off that thread's 0.3 s)."""

    def __init__(
        self,
        hasher: Hasher,
        out: BinaryIO,
        space: SpaceGuard,
        what: str,
        depth: int = WRITE_BEHIND_CHUNKS,
        blob_hasher: Hasher | None = None,
    ) -> None:
        # (chunk, True): a layer chunk to hash and write; (chunk, False): a blob chunk to hash
        self._queue: queue.Queue[tuple[bytes, bool] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(hasher, blob_hasher or Hasher(), out, space, what),
            name="layer-write",
            daemon=True,
        )
        self._thread.start()
        self._finished = False

    def _run(
        self, hasher: Hasher, blob_hasher: Hasher, out: BinaryIO, space: SpaceGuard, what: str
    ) -> None:
        # After an error it keeps taking chunks (dropping them), so that put never blocks.
        while (item := self._queue.get()) is not None:
            try:
                self._take(item, hasher, blob_hasher, out, space, what)
            finally:
                self._queue.task_done()

    def _take(
        self,
        item: tuple[bytes, bool],
        hasher: Hasher,
        blob_hasher: Hasher,
        out: BinaryIO,
        space: SpaceGuard,
        what: str,
    ) -> None:
        chunk, is_layer = item
        if self._error is not None:
            return
        if not is_layer:
            blob_hasher.update(chunk)
            return
        try:
            hasher.update(chunk)
            # here, not when the chunk is put: free space read off the file system
            # must already count every earlier chunk
            space.take(len(chunk), what)
            out.write(chunk)
            out.flush()  # in the file system, where the next statvfs counts it
            space.landed(len(chunk))
        except BaseException as e:  # raised in the caller's thread by put or finish
            self._error = e

    def put(self, chunk: bytes) -> None:
        """A chunk of the layer: hashed, then written to the cache."""
        if self._error is not None:
            raise self._error
        self._queue.put((chunk, True))

    def put_blob(self, chunk: bytes) -> None:
        """A chunk of the compressed blob: hashed only."""
        if self._error is not None:
            raise self._error
        self._queue.put((chunk, False))

    def drain(self) -> None:
        """Wait until every chunk put so far is hashed and written (the thread goes on)."""
        self._queue.join()

    def finish(self) -> None:
        """Wait until every chunk put is hashed and written; raise what the thread met."""
        if not self._finished:
            self._finished = True
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


def unpack_layer_to_cache(
    cache: Cache,
    desc: Descriptor,
    diff_id: str,
    open_blob: Callable[[], BinaryIO],
    on_progress: Callable[[int], None] | None = None,
    budget: UnpackBudget | None = None,
    space: SpaceGuard | None = None,
    background: threading.Semaphore | None = None,
) -> LayerFile:
    """Make sure the uncompressed tar of this layer is in the cache; return it, pinned in
    `cache` (so that `vmimg cache prune` leaves it while we read it), with its entries
    when it was unpacked now.

    `desc.digest` may be empty (docker-archive layers have none); then only
    the diff_id is checked. The layer's bytes count against `budget` (default: a
    budget of its own), whether unpacked now or found in the cache.

    With `background` (a semaphore of the commits that may be under way at once), a layer
    unpacked now is returned as soon as it is verified, its entries ready, while a thread of
    its own makes its tar durable and renames it into the cache (its `pending` commit): what
    flattens the entries need not wait for the disk. The caller must settle() it before
    anything reads `tar_path`. A layer is committed first when no slot is free (an image of
    500 layers would hold a thousand threads and files otherwise), or when its entries are
    None (its tar malformed: flatten reads the tar to report it).
    """
    what = f"layer {desc.digest or diff_id}"
    final = cache.layer_path(diff_id)
    budget = budget or UnpackBudget(cache.max_unpacked_size)
    space = space or SpaceGuard(cache.root)
    unpacked = False
    entries = None
    # not there, pruned while we looked, or found broken after a crash
    while not (cache.pin(final) and _usable_layer(cache, final, diff_id, what)):
        with contextlib.ExitStack() as held:
            held.enter_context(cache.lock(f"layer-{diff_id}"))
            if os.path.exists(final):
                continue
            try:
                entries, finish = _unpack(
                    cache, desc, diff_id, open_blob, on_progress, what, final, budget, space
                )
            except OSError as e:
                raise _cache_error(what, cache, e) from e
            unpacked = True
            pending = PendingCommit(finish, held.pop_all(), cache, final, what)
        if background is not None and entries is not None and background.acquire(False):
            pending.start(background.release)
            return LayerFile(final, desc.digest or diff_id, entries, pending)
        pending.run()
    if not unpacked:
        budget.charge(os.path.getsize(final), what)
    return LayerFile(final, desc.digest or diff_id, entries)


def _cache_error(what: str, cache: Cache, e: OSError) -> CacheError:
    # Sources turn their own read errors into SourceError: this is the cache's disk.
    return CacheError(f"{what}: cannot write to the cache {cache.root}: {e.strerror}")


def _usable_layer(cache: Cache, final: str, diff_id: str, what: str) -> bool:
    """Whether the pinned layer tar at `final` may be read. One committed unsynced in an
    earlier boot (image/unsynced.py) is hashed again: whole, it is made durable and
    trusted from then on; not whole (its bytes lost in a crash), it is discarded."""
    if unsynced.trusted(final):
        return True
    with cache.lock(f"layer-{diff_id}"):  # one process checks it; the others then trust it
        if unsynced.trusted(final):
            return True
        try:
            with open(final, "rb") as f:
                whole = hash_fd(f.fileno()).digest == diff_id
        except OSError:
            whole = False
        if not whole:
            cache.discard(final)
            return False
        with contextlib.suppress(OSError):  # not made durable now: checked again next boot
            unsynced.settle(final)
    return True


class PendingCommit:
    """The end of a layer's unpacking: its tar made durable and renamed into the cache
    (`finish`), then its lock released (`held`) and the layer pinned. Run in place, or by
    a thread of its own (start, then wait)."""

    def __init__(
        self,
        finish: Callable[[], None],
        held: contextlib.ExitStack,
        cache: Cache,
        final: str,
        what: str,
    ) -> None:
        self._finish = finish
        self._held = held
        self._cache = cache
        self._final = final
        self._what = what
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Commit now; raise what that met (the loop that called it pins the layer)."""
        try:
            with self._held:  # the layer's lock: released once it is in the cache, or not
                try:
                    self._finish()
                except OSError as e:
                    raise _cache_error(self._what, self._cache, e) from e
        finally:
            self._finish = _nothing  # what it held (the temporary file) is let go
        pause_point("layer-committed")

    def start(self, done: Callable[[], None]) -> None:
        """Commit in a thread of its own, which calls `done` when it ends."""
        self._thread = threading.Thread(
            target=self._run, args=(done,), name="layer-commit", daemon=True
        )
        try:
            self._thread.start()
        except BaseException:
            done()
            self.run()  # no thread to be had: here, then
            self._thread = None

    def _run(self, done: Callable[[], None]) -> None:
        try:
            self.run()
        except BaseException as e:  # raised in the caller's thread by wait
            self._error = e
        finally:
            done()

    def wait(self) -> None:
        """Wait for the thread's commit; raise what it met; pin the committed layer."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if not self._cache.pin(self._final):
            raise CacheError(f"{self._what}: removed from the cache {self._cache.root} in use")


def _nothing() -> None:
    pass


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
) -> tuple[list[Entry] | None, Callable[[], None]]:
    """Stream, verify and decompress one layer blob into a temporary file in the cache,
    parsing its entries from the same chunks; return them and what is left to do: `finish`
    stops the flushing, makes the tar durable and renames it to `final`, and lets its
    temporary file go (removed if not renamed away). The entries are None for a layer
    whose tar is malformed: it is kept all the same, and flatten reports what is wrong
    with it, where it reports every other fault of a layer's entries."""
    declared = layer_compression(desc.media_type)
    with contextlib.ExitStack() as kept:
        out, tmp = kept.enter_context(cache.temp_file(".tar", "layer-"))
        # Marked as this boot's, the tar is renamed into place without waiting for the disk
        # (image/unsynced.py). Where it cannot be marked, it goes out to disk as it is
        # written, by a thread of its own, so that the fsync before its rename has little
        # left to wait for. (Flushing in the write-behind thread every 16 MiB held up its
        # hashing: the decompressing thread waited on it, 33 ms of Debian minbase's 0.33 s.)
        synced = not unsynced.mark(out.fileno())
        flusher = kept.enter_context(Flusher(out.fileno(), needed=synced))
        with open_blob() as stream:
            entries = _stream_into(
                stream, out, desc, diff_id, declared, on_progress, what, budget, space
            )
        left = kept.pop_all()  # the temporary file and its flusher: finish's now

    def finish() -> None:
        with left:
            flusher.stop()
            out.flush()
            commit(tmp, final, synced)

    return entries, finish


def _stream_into(
    stream: BinaryIO,
    out: BinaryIO,
    desc: Descriptor,
    diff_id: str,
    declared: str,
    on_progress: Callable[[int], None] | None,
    what: str,
    budget: UnpackBudget,
    space: SpaceGuard,
) -> list[Entry] | None:
    """The blob `stream` decompressed into `out` and verified, its entries parsed on the way
    (None for a malformed tar)."""
    algo = desc.digest.split(":", 1)[0] if desc.digest else "sha256"
    reader = _BlobReader(stream, desc.size if desc.digest else None, what)
    kind = sniff_compression(reader.peek(4), declared)  # peeked bytes are hashed when read
    tar_hash = Hasher("sha256")
    blob_hash = Hasher(algo)
    behind = WriteBehind(tar_hash, out, space, what, blob_hasher=blob_hash)
    if desc.digest:  # without one (docker-archive layers) only the diff_id is checked
        reader.on_read = behind.put_blob

    def chunks() -> Generator[bytes, None, None]:
        reported = 0
        for chunk in decompressed_chunks(reader.read, kind, what):
            budget.charge(len(chunk), what)
            behind.put(chunk)
            if on_progress:  # the blob's bytes: what the layer's size in the manifest counts
                on_progress(reader.size - reported)
                reported = reader.size
            pause_point("layer-unpack-midway", before=behind.drain)
            yield chunk

    entries: list[Entry] | None
    produced = chunks()
    try:
        entries = parse_source(Source(produced), what)  # reads the stream to its end
    except SourceFailed as e:
        raise e.error from None
    except LayerError:
        entries = None
    finally:
        produced.close()
        behind.finish()  # every chunk hashed and written; what the thread met, raised
    if desc.digest:
        blob_hash.verify(desc.digest, desc.size, what)
    tar_hash.verify(diff_id, None, f"{what} (uncompressed)")
    return entries


# -- entries -------------------------------------------------------------------


def iter_entries(tar_path: str, what: str) -> Iterator[Entry]:
    """Every member of an uncompressed layer tar, in tar order.

    Anything malformed or impossible is a LayerError naming `what` (and the
    member, when there is one): nothing else escapes, whatever the bytes.
    """
    yield from parse_layer(file_chunks(tar_path, CHUNK), what)


# -- loading entries -----------------------------------------------------------------
#
# Entries are not kept beside the layer: parsing a cached layer tar (in the page cache) takes
# a fifth of the time unmarshalling an index of the same entries did (100,000 entries:
# 0.2 s against 1.2 s), and the cold path no longer writes one.


def load_entries(tar_path: str, what: str) -> list[Entry]:
    """The entries of a layer tar, parsed from it."""
    return list(iter_entries(tar_path, what))
