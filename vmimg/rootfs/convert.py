"""`vmimg rootfs`: source -> layers -> Tree -> writer -> one output file.

The output appears at its destination only when complete: it is written to a
temporary name beside the destination and renamed at the end; on any error
the temporary file is removed. Finished conversions are kept in the cache,
keyed by everything that determines their bytes, so a repeat costs no conversion.

A cache hit hands the cached file out without copying its bytes where it can
(`share_file`): a reflink (copy-on-write clone) where the file system has them, else
a hardlink to the cache entry for a format nobody writes in place (erofs), else a
copy. Cache entries lose their write bits, so a hardlinked output is read-only too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmimg import __version__
from vmimg.errors import VmimgError, WriterError
from vmimg.image.cache import Cache, commit, disk_usage, space_shortfall
from vmimg.image.fetch import BYTES, PhaseStart, fetch_layers
from vmimg.image.image import Image
from vmimg.image.sources import SourceOptions, open_image
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.flatten import flatten
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
COPY_CHUNK = 64 << 20
READ_WRITE_CHUNK = 8 << 20  # where copy_file_range cannot: bytes read into memory at once
# How a cached file reached its destination (`share_file`; "handed_out" in results).
REFLINK = "reflink"  # a copy-on-write clone: its own inode, no bytes copied
HARDLINK = "hardlink"  # another name of the cache entry itself: read-only files only
COPY = "copy"
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int); Python's fcntl module lacks it
WRITE_BITS = 0o222
# copy_file_range(2) fails so between file systems (most kernels) and on some file systems.
COPY_RANGE_UNSUPPORTED = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


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


def check_output_space(dest: str, need: int, directory: str | None = None) -> None:
    """WriterError, before anything is written, if `need` bytes would fill the file
    system `dest` goes to (beyond the reserve vmimg leaves free); `directory`: where on it
    they go, if not beside `dest`."""
    problem = space_shortfall(directory or os.path.dirname(os.path.abspath(dest)) or ".", need)
    if problem is not None:
        raise WriterError(f"cannot write {dest}: {problem}")


@contextlib.contextmanager
def atomic_output(dest: str, need: int = 0) -> Iterator[int]:
    """A file descriptor for a temporary file beside `dest`, renamed onto it on success.
    `need`: the bytes it will take at least (checked against the free space first)."""
    directory = os.path.dirname(os.path.abspath(dest)) or "."
    if not os.path.isdir(directory):
        raise VmimgError(f"output directory {directory} does not exist")
    check_output_space(dest, need)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
    try:
        yield fd
        # No fsync: like cp and mkfs, the destination gets the page cache's guarantee.
        # (Cache entries are fsynced: other builds trust them.)
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


def copy_file(src: str, dst_fd: int) -> None:
    """Copy `src` into the empty file `dst_fd`, leaving its holes holes.

    Images are sparse (ext4 free space, a sparse file's holes): copying a hole
    byte by byte could write terabytes of zeros that were never there.
    """
    with open(src, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: only a hole is left
                    raise
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            _copy_range(src, fd, dst_fd, start, end)
            offset = end
        os.ftruncate(dst_fd, size)


def _copy_range(src: str, in_fd: int, out_fd: int, start: int, end: int) -> None:
    while start < end:
        try:
            n = os.copy_file_range(in_fd, out_fd, min(COPY_CHUNK, end - start), start, start)
        except OSError as e:
            if e.errno not in COPY_RANGE_UNSUPPORTED:
                raise
            n = _read_write(in_fd, out_fd, min(READ_WRITE_CHUNK, end - start), start)
        if n <= 0:
            raise WriterError(f"copy from {src} stopped early")
        start += n


def _read_write(in_fd: int, out_fd: int, count: int, offset: int) -> int:
    """copy_file_range by hand, for where the kernel refuses it (across file systems)."""
    data = os.pread(in_fd, count, offset)
    done = 0
    while done < len(data):
        done += os.pwrite(out_fd, data[done:], offset + done)
    return done


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make the file `dst_fd` a copy-on-write clone of `src_fd`, if the file system can
    (btrfs, XFS with reflink, bcachefs; not ext4 or tmpfs, nor across file systems)."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError:  # EOPNOTSUPP, EXDEV, EINVAL, ENOTTY: not here, copy instead
        return False
    return True


def seal(path: str) -> bool:
    """Take the write bits off the cache entry at `path` (a hardlink to it must not invite
    writes in place); False if they stay (another user's cache)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & WRITE_BITS:
        try:
            os.chmod(path, mode & ~WRITE_BITS)
        except OSError:
            return False
    return True


# Beside a cache entry's files: the size and mtime of each as sealed. Hardlinked outputs
# are other names of the entry's files, and root may write to them despite mode 0444; a write
# moves the mtime, so a damaged entry is noticed before it is handed out again.
SEAL_RECORD = ".sealed.json"


def _stamps(entry_dir: str) -> dict[str, list[int]]:
    stamps = {}
    for dirpath, _dirs, names in os.walk(entry_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, entry_dir)
            if rel != SEAL_RECORD:
                st = os.lstat(path)
                stamps[rel] = [st.st_size, st.st_mtime_ns]
    return stamps


def seal_entry(entry_dir: str) -> None:
    """Seal every file of a new cache entry (see `seal`) and record how each looks."""
    for dirpath, _dirs, names in os.walk(entry_dir):
        for name in names:
            seal(os.path.join(dirpath, name))
    with open(os.path.join(entry_dir, SEAL_RECORD), "w") as f:
        json.dump(_stamps(entry_dir), f, sort_keys=True)


def entry_untouched(entry_dir: str) -> bool:
    """True if every file of the cache entry is as `seal_entry` left it."""
    try:
        with open(os.path.join(entry_dir, SEAL_RECORD)) as f:
            recorded = json.load(f)
        return bool(recorded == _stamps(entry_dir))
    except (OSError, ValueError):
        return False


def share_file(src: str, dst: str, linkable: bool) -> str:
    """Create `dst` (it must not exist) with the bytes of `src`, sharing them where possible:
    REFLINK, else HARDLINK when `linkable` (nobody will write `dst` in place: `src` is
    sealed first), else COPY. Returns which one; on an error `dst` may be left behind."""
    with open(src, "rb") as s:
        fd = os.open(dst, _NEW_FILE, 0o644)
        try:
            if reflink(s.fileno(), fd):
                return REFLINK
        finally:
            os.close(fd)
    os.unlink(dst)
    if linkable and seal(src):
        try:
            os.link(src, dst)
        except OSError:  # EXDEV, EMLINK, EPERM (protected_hardlinks): copy instead
            pass
        else:
            return HARDLINK
    fd = os.open(dst, _NEW_FILE, 0o644)
    try:
        check_output_space(dst, disk_usage(src))
        copy_file(src, fd)
    finally:
        os.close(fd)
    return COPY


def usable_entry(cache: Cache, entry_dir: str) -> bool:
    """True if the cache entry may be handed out; a changed one is taken out of the cache
    (to be made again) instead."""
    if entry_untouched(entry_dir):
        return True
    cache.discard(entry_dir)
    return False


def hand_out(cached: str, dest: str, linkable: bool) -> str:
    """Put the cache entry `cached` at `dest` (replacing what is there, atomically) with
    `share_file`; returns how. A copy or clone gets mode 0644, a hardlink keeps the
    entry's read-only mode."""
    directory = os.path.dirname(os.path.abspath(dest)) or "."
    if not os.path.isdir(directory):
        raise VmimgError(f"output directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)  # share_file creates it again, as a clone, a link or a copy
    try:
        how = share_file(cached, tmp, linkable)
        if how != HARDLINK:
            os.chmod(tmp, 0o644)
        os.rename(tmp, dest)
    finally:
        # Left over on an error; or `dest` already was a link to the entry, and rename(2)
        # between two names of one file does nothing.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return how


FLATTEN_PHASE = "flattening layers"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: parsing and flattening make an object or more
    per entry and no cycles, so the collector's passes over a growing heap are pure cost
    (a sixth of flattening 100,000 entries)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_tree(image: Image, cache: Cache, phases: PhaseStart | None = None) -> Tree:
    with gc_paused():
        layers = fetch_layers(image, cache, phases)
        if phases is not None:
            phases(FLATTEN_PHASE, None, BYTES)  # no count: its time shows
        tree = flatten(layers)
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
                with atomic_output(dest, floor) as fd, ContentReader() as reader:
                    if phases is not None:
                        reader.on_bytes = phases(writing_phase(fmt), stored, BYTES)
                    warnings = write_image(fmt, tree, reader, fd, options)
        except OSError as e:
            # A full disk, a quota, a read-only directory: the temporary file is gone.
            raise WriterError(f"cannot write {dest}: {e.strerror or e}") from None
        pause_point("output-renamed")
        if use_cache and transform is None and not hit:
            with contextlib.suppress(OSError):  # keeping a copy is optional
                _store_output(cache, key, dest, f"rootfs.{fmt}", get_format(fmt).read_only)
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
        )


def _store_output(cache: Cache, key: str, src: str, name: str, linkable: bool) -> None:
    final_dir = cache.output_dir(key)
    if os.path.exists(os.path.join(final_dir, name)):
        return
    if space_shortfall(cache.tmp_dir, disk_usage(src)) is not None:
        return  # a copy is worth less than the disk space everything else needs
    with cache.temp_dir("output-") as tmp:
        entry = os.path.join(tmp, name)
        # The output itself becomes the entry when it can be shared (its write bits go).
        share_file(src, entry, linkable)
        seal_entry(tmp)
        pause_point("output-cache-store")
        with contextlib.suppress(OSError):  # another process stored it first
            commit(tmp, final_dir)
