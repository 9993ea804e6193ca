"""`vmimg rootfs`: source -> layers -> Tree -> writer -> one output file.

The output appears at its destination only when complete: it is written to a
temporary name beside the destination and renamed at the end; on any error
the temporary file is removed. Finished conversions are kept in the cache,
keyed by everything that determines their bytes, so a repeat costs no conversion.

A cache hit hands the cached file out without copying its bytes where it can
(rootfs/handout.py). A conversion that will be kept is written as its cache entry first
(flushed as it is written, so making it durable costs little) and handed out the same way.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmimg import __version__
from vmimg.errors import VmimgError, WriterError
from vmimg.image import unsynced
from vmimg.image.cache import Cache, Flusher, commit
from vmimg.image.fetch import BYTES, PhaseStart, fetch_layers
from vmimg.image.fsutil import space_shortfall
from vmimg.image.image import Image
from vmimg.image.layers import settle_layers, settle_quietly
from vmimg.image.sources import SourceOptions, open_image
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.flatten import flatten
from vmimg.rootfs.handout import (
    check_output_space,
    entry_usable,
    hand_out,
    seal_entry,
)
from vmimg.rootfs.tree import Tree
from vmimg.rootfs.writers import (
    WRITER_VERSIONS,
    WriterOptions,
    get_format,
    options_doc,
    seeded,
    write_image,
)
from vmimg.testhook import pause_point

NS_PER_S = 1_000_000_000


def source_date_epoch_ns() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if not value:
        return None
    try:
        return int(value) * NS_PER_S
    except ValueError:
        raise VmimgError(f"SOURCE_DATE_EPOCH is not an integer: {value!r}") from None


@dataclass
class ConvertResult:
    output: str
    format: str
    image: str
    digest: str
    platform: str
    size: int
    cached: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)
    handed_out: str | None = None  # a cache hit: REFLINK, HARDLINK or COPY
    cache_entry: str | None = None  # the cached image this output came from or is kept as


def conversion_key(image: Image, fmt: str, options: WriterOptions, epoch_ns: int | None) -> str:
    doc = {
        "vmimg": __version__,
        "image": image.digest,
        "platform": str(image.platform),
        "format": fmt,
        "writer": WRITER_VERSIONS.get(fmt),
        "options": options_doc(options),
        "epoch": epoch_ns,
    }
    blob = json.dumps(doc, sort_keys=True, default=lambda b: b.hex()).encode()
    return hashlib.sha256(blob).hexdigest()


def output_size_floor(fmt: str, tree: Tree, options: WriterOptions) -> int:
    """The fewest bytes writing `tree` as `fmt` takes: its file data, once per inode. Zero
    when the writer compresses (no floor is known then)."""
    return 0 if compresses(options) else tree.content_bytes()


def compresses(options: WriterOptions) -> bool:
    """Does the writer compress file data (so no output size floor is known)?"""
    compressed = {getattr(options, "compression", "none"), getattr(options, "compress", "none")}
    return compressed != {"none"}


def check_destination(dest: str, need: int) -> str:
    """The directory `dest` goes to, once it is known to exist and to have room for `need`
    bytes; a one-line error naming what is wrong otherwise."""
    directory = os.path.dirname(os.path.abspath(dest)) or "."
    if not os.path.isdir(directory):
        raise VmimgError(f"output directory {directory} does not exist")
    check_output_space(dest, need)
    return directory


@contextlib.contextmanager
def atomic_output(dest: str, need: int = 0) -> Iterator[int]:
    """A file descriptor for a temporary file beside `dest`, renamed onto it on success.
    `need`: the bytes it will take at least (checked against the free space first)."""
    directory = check_destination(dest, need)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
    try:
        yield fd
        # No fsync: like cp and mkfs, the destination gets the page cache's guarantee.
        # (Cache entries are fsynced, or marked as this boot's: other builds trust them.)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o644)
        os.rename(tmp, dest)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def usable_entry(cache: Cache, entry_dir: str) -> bool:
    """True if the cache entry may be handed out; a changed one, or one committed unsynced
    in an earlier boot, is taken out of the cache (to be made again) instead."""
    if entry_usable(entry_dir):
        return True
    cache.discard(entry_dir)
    return False


FLATTEN_PHASE = "flattening layers"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: parsing and flattening make an object or more
    per entry and no cycles, so the collector's passes over a growing heap are pure cost
    (a sixth of flattening 100,000 entries). What is alive at the end (the tree) is frozen
    out of the collector's sight: its next pass would walk every node once more (50 ms for
    100,000 entries) to find nothing, as a tree holds no cycles; reference counts free it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.enable()


def build_tree(image: Image, cache: Cache, phases: PhaseStart | None = None) -> Tree:
    with gc_paused():
        # Layers unpacked now are made durable and renamed into the cache while they are
        # flattened (flatten reads only their entries); settled before anything reads them.
        # (Smallfiles' 107 MB layer: its fsync took 25-50 ms, now hidden behind flattening.)
        layers = fetch_layers(image, cache, phases, background=True)
        try:
            if phases is not None:
                phases(FLATTEN_PHASE, None, BYTES)  # no count: its time shows
            tree = flatten(layers)
        except BaseException:
            settle_quietly(layers)
            raise
        settle_layers(layers)
    epoch = source_date_epoch_ns()
    if epoch is not None:
        tree.clamp_mtimes(epoch)
    return tree


def content_bytes(tree: Tree) -> int:
    """The stored bytes of every file in the tree, each hardlinked file once: what a
    writer reads, the total its progress counts towards."""
    return tree.content_bytes()


def track_phase(reader: ContentReader, phases: PhaseStart | None, name: str, tree: Tree) -> None:
    """Count what `reader` reads from now on as the phase `name` of `phases`."""
    if phases is not None:
        reader.on_bytes = phases(name, content_bytes(tree), BYTES)


def writing_phase(fmt: str) -> str:
    return f"writing {fmt}"


def convert(
    source: str,
    fmt: str,
    dest: str,
    options: WriterOptions,
    cache: Cache,
    source_options: SourceOptions,
    use_cache: bool = True,
    phases: PhaseStart | None = None,
    transform: Callable[[Tree, Image], None] | None = None,
) -> ConvertResult:
    """Convert `source` to a `fmt` image at `dest`."""
    start = time.monotonic()
    with open_image(source, cache, source_options) as image:
        options = seeded(options, image.config_digest.encode())
        key = conversion_key(image, fmt, options, source_date_epoch_ns())
        cached_path = os.path.join(cache.output_dir(key), f"rootfs.{fmt}")
        warnings: list[str] = []
        hit = (
            use_cache
            and transform is None
            and cache.pin(cache.output_dir(key))  # kept by `cache prune` while we copy it
            and os.path.exists(cached_path)
            and usable_entry(cache, cache.output_dir(key))
        )
        tree = None
        if not hit:
            tree = build_tree(image, cache, phases)
            if transform is not None:
                transform(tree, image)
        handed_out = None
        try:
            if tree is None:
                handed_out = hand_out(cached_path, dest, get_format(fmt).read_only)
            else:
                # One pass over the tree for both: the floor is the bytes read, uncompressed.
                stored = tree.content_bytes()
                floor = 0 if compresses(options) else stored
                write = _Write(fmt, tree, options, stored, phases)
                written = None
                if use_cache and transform is None and _cache_has_room(cache, floor):
                    check_destination(dest, floor)  # before the work, as atomic_output does
                    written = _write_through_cache(cache, key, write, dest)
                if written is None:  # not kept, or the cache could not take it
                    with atomic_output(dest, floor) as fd:
                        written = write.to(fd)
                warnings = written
        except OSError as e:
            # A full disk, a quota, a read-only directory: the temporary file is gone.
            raise WriterError(f"cannot write {dest}: {e.strerror or e}") from None
        pause_point("output-renamed")
        return ConvertResult(
            output=dest,
            format=fmt,
            image=image.name,
            digest=image.digest,
            platform=str(image.platform),
            size=os.path.getsize(dest),
            cached=hit,
            seconds=time.monotonic() - start,
            warnings=warnings,
            handed_out=handed_out,
            cache_entry=(
                cached_path
                if use_cache and transform is None and os.path.isfile(cached_path)
                else None
            ),
        )


@dataclass
class _Write:
    """One image to write: the writer's inputs, and how its progress shows."""

    fmt: str
    tree: Tree
    options: WriterOptions
    stored: int  # the tree's file bytes: what the writing phase counts towards
    phases: PhaseStart | None

    def to(self, fd: int) -> list[str]:
        """Write the image into the empty file `fd`; returns the writer's warnings."""
        with ContentReader() as reader:
            if self.phases is not None:
                reader.on_bytes = self.phases(writing_phase(self.fmt), self.stored, BYTES)
            return write_image(self.fmt, self.tree, reader, fd, self.options)


def _cache_has_room(cache: Cache, need: int) -> bool:
    """Is there room to keep the image in the cache? (Else it goes straight to its
    destination: a kept copy is worth less than the disk everything else needs.)"""
    return space_shortfall(cache.tmp_dir, need) is None


def _write_through_cache(cache: Cache, key: str, write: _Write, dest: str) -> list[str] | None:
    """Write the image as a new cache entry, then hand it out at `dest` as a hit would
    (hardlink, reflink or copy); its warnings. The entry is committed unsynced, marked as
    this boot's (image/unsynced.py); where it cannot be marked it is flushed as it is
    written, so committing it durably costs little more than writing it. `dest`, like cp's
    output, is not fsynced. None if the cache's disk failed it (full, say): keeping a copy
    is optional, so the caller writes the image at `dest` instead."""
    name = f"rootfs.{write.fmt}"
    with cache.temp_dir("output-") as tmp:  # our lock on it guards it from prune until we end
        built = os.path.join(tmp, name)
        try:
            synced = not unsynced.mark(tmp)
            fd = os.open(built, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                with Flusher(fd, needed=synced):
                    warnings = write.to(fd)
            finally:
                os.close(fd)
            seal_entry(tmp)
        except OSError:
            return None
        pause_point("output-cache-store")
        with contextlib.suppress(OSError):  # another process stored it first: ours goes out
            commit(tmp, cache.output_dir(key), synced)
        if not os.path.exists(built):
            built = os.path.join(cache.output_dir(key), name)
        hand_out(built, dest, get_format(write.fmt).read_only)
    return warnings
