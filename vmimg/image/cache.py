"""The content-addressed cache: blobs, uncompressed layers, finished conversions.

    $VMIMG_CACHE/                       (default $XDG_CACHE_HOME/vmimg)
      blobs/sha256/<hex>                manifests, configs, any blob, verified
      layers/sha256/<hex>.tar           uncompressed layer tars, named by diff_id
      outputs/<key>/...                 finished conversions
      hits/<crc>.hit                    command lines answered by an output (cli/quick)
      kernels/                          guest kernels and their sources (guest/kernel.py)
      tmp/vmimg-<pid>-...               work in progress (same file system: rename is atomic)
      locks/                            flock files

Every entry appears under its final name only by an atomic rename after its digest was
checked and its bytes were fsynced (and the directory after the rename): a crash at any
point leaves either nothing or a whole, verified entry. Layers and finished conversions
skip the fsync: each carries a durable mark of the boot that wrote it, and one found from
an earlier boot is checked again before it is used (image/unsynced.py). Concurrent
processes coordinate with flock on a per-key lock file, so the second one waits and then
finds the work done.

Work in progress is an entry of tmp/ named with its writer's pid, on which the writer holds
an exclusive flock for as long as it exists. The kernel drops a lock when its process dies,
however it dies: an entry of tmp/ whose lock is free has no writer left, and `Cache.open`
reclaims it (a SIGKILLed unpack leaves gigabytes there). Entries not named so come from an
older vmimg, which locked nothing: only `prune` removes them. A process that reads a finished
entry (a layer tar, a cached output, a kernel) holds a shared flock on it (`pin`). `prune`
removes neither a locked temporary entry nor a pinned one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from vmimg.digest import Hasher, split_digest
from vmimg.errors import CacheError, DigestError
from vmimg.image.fsutil import (
    HITS_AREA,
    OPEN_ENTRY,
    OUTPUTS_AREA,
    default_cache_dir,
    format_size,
    free_space,
    fsync_dir,
    lock_shared,
    same_file,
)

AREAS = ("blobs/sha256", "blobs/sha512", "layers/sha256", OUTPUTS_AREA, HITS_AREA, "tmp", "locks")
# The sum of one image's uncompressed layers vmimg accepts (--max-unpacked-size).
DEFAULT_MAX_UNPACKED_SIZE = 32 << 30
TEMP_PREFIX = "vmimg-"  # tmp/vmimg-<pid>-...: entries that carry their writer's lock
_TEMP_NAME_RE = re.compile(r"^vmimg-\d+-")
# Held shared while a temporary entry is created and locked, exclusive while tmp/ is
# scanned for stale entries: so a scan never sees a new entry before its lock is taken.
CREATE_LOCK = ".tmp-create"
# Trees with more files than this are flushed with one syncfs(2) instead of an fsync each
# (an extracted kernel source has 80 000 files).
FSYNC_FILES_MAX = 256
# How often a Flusher flushes the file being written (an image is written in ~50-500 ms).
FLUSH_EVERY_S = 0.02
# A cache we may read but not write (read-only mount, another user's): nothing to reclaim.
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


# -- durability ------------------------------------------------------------------------


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs(path: str) -> None:
    """syncfs(2) on the file system holding `path` (Python's os module has no binding)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Make a file, or a directory and everything in it, durable."""
    if not os.path.isdir(path) or os.path.islink(path):
        _fsync_path(path)
        return
    dirs: list[str] = []
    files: list[str] = []
    for dirpath, _subdirs, names in os.walk(path):
        dirs.append(dirpath)
        files.extend(os.path.join(dirpath, n) for n in names)
        if len(files) > FSYNC_FILES_MAX:
            _syncfs(path)
            return
    for f in files:
        if not os.path.islink(f):
            _fsync_path(f)
    for d in reversed(dirs):
        fsync_dir(d)


class Flusher:
    """While a cache entry's file is being written, a thread flushes it to disk every
    FLUSH_EVERY_S seconds, so the disk writes as the writer computes and `commit`'s fsync
    finds little left (an 80 MiB image: its fsync took 40 ms at the end of the critical path).
    A context manager over the file's fd; leaving it waits for the thread, never for a flush
    of its own. Not `needed` (an entry committed unsynced), it does nothing."""

    def __init__(self, fd: int, every: float | None = None, needed: bool = True) -> None:
        self._fd = fd
        self._every = FLUSH_EVERY_S if every is None else every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="entry-flush", daemon=True)
        self._needed = needed

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                os.fdatasync(self._fd)
            except OSError:
                return  # commit's fsync will meet the same error and report it

    def __enter__(self) -> Flusher:
        if self._needed:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop flushing (waiting for a flush under way); again does nothing."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def commit(tmp: str, final: str, synced: bool = True) -> None:
    """Rename a finished temporary file or tree to `final`, durably: its bytes are on disk
    before the rename and the rename is before this returns. Not `synced`: only the rename,
    for an entry marked as this boot's (image/unsynced.py). OSError if `final` exists as a
    non-empty directory (someone else committed it first)."""
    if not synced:
        os.rename(tmp, final)
        return
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(final))


# -- free space --------------------------------------------------------------------------


class SpaceGuard:
    """Free space on one file system, for a stream of writes (shared by threads): statvfs is
    asked again only when its last answer no longer covers the next write. Bytes taken but
    not yet written (`landed` not yet called: another thread's write in progress) are not in
    statvfs's answer, so they are taken off it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._left = -1
        self._in_flight = 0
        self._lock = threading.Lock()

    def take(self, n: int, what: str) -> None:
        """Account for `n` bytes about to be written; CacheError if they would not fit."""
        with self._lock:
            if n > self._left:
                avail, keep = free_space(self.path)
                self._left = avail - keep - self._in_flight
                if n > self._left:
                    raise CacheError(
                        f"{what}: the cache file system at {self.path} is nearly full "
                        f"({format_size(avail)} free; vmimg leaves {format_size(keep)} unused)"
                    )
            self._left -= n
            self._in_flight += n

    def landed(self, n: int) -> None:
        """`n` bytes taken are written (in the file system's count of free space now)."""
        with self._lock:
            self._in_flight -= n


# -- locks, temporary entries, pins ----------------------------------------------------


@contextlib.contextmanager
def _lock_file(path: str, mode: int) -> Iterator[None]:
    """flock(`mode`) on the lock file at `path`, created if missing. `prune` may remove a
    lock file nobody holds: whoever then gets the lock on the removed inode tries again."""
    while True:
        # Read-only is enough for flock, and lets users who share a cache use each
        # other's lock files.
        fd = os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
            if same_file(fd, path):
                yield
                return
        finally:
            os.close(fd)


def _try_claim(path: str) -> int | None:
    """An fd holding an exclusive lock on the entry at `path`, or None if a live process
    holds a lock on it (or it is gone). The caller closes the fd."""
    try:
        fd = os.open(path, OPEN_ENTRY)
    except (FileNotFoundError, PermissionError):  # gone, or another user's to remove
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not same_file(fd, path):
        os.close(fd)
        return None
    return fd


@dataclass
class Freed:
    """What a clean-up removed, and what it left because live processes use it."""

    entries: int = 0
    bytes: int = 0
    kept: int = 0

    def __iadd__(self, other: Freed) -> Freed:
        self.entries += other.entries
        self.bytes += other.bytes
        self.kept += other.kept
        return self


def freed_by_removing(path: str) -> int:
    """What removing the file or tree at `path` frees: disk_usage without the files that
    have names elsewhere too (a bundle or an output hardlinked to a cache entry keeps its
    blocks). A file with several names inside the tree counts once."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_blocks * 512 if st.st_nlink <= 1 or not stat.S_ISREG(st.st_mode) else 0
    total = st.st_blocks * 512
    links: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [names seen, blocks]
    for dirpath, dirs, names in os.walk(path):
        for name in dirs + names:
            with contextlib.suppress(OSError):
                s = os.lstat(os.path.join(dirpath, name))
                if s.st_nlink > 1 and stat.S_ISREG(s.st_mode):
                    seen = links.setdefault((s.st_dev, s.st_ino), [0, s.st_blocks * 512])
                    seen[0] += 1
                    if seen[0] == s.st_nlink:  # its last name is in the tree
                        total += seen[1]
                else:
                    total += s.st_blocks * 512
    return total


def _remove(path: str) -> int:
    """Remove a file or tree; the bytes it freed."""
    size = freed_by_removing(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return size


def remove_unused(path: str) -> Freed:
    """Remove the file or tree at `path`, except what live processes hold a lock on
    (a locked directory is kept whole; an unlocked one loses its unlocked contents)."""
    freed = Freed()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return freed
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        freed.bytes += _remove(path)  # symlinks, sockets: nothing locks them
        freed.entries += 1
        return freed
    fd = _try_claim(path)
    if fd is None:
        freed.kept += 1
        return freed
    try:
        if stat.S_ISREG(st.st_mode):
            freed.bytes += _remove(path)
            freed.entries += 1
            return freed
        for name in sorted(os.listdir(path)):
            freed += remove_unused(os.path.join(path, name))
        try:
            os.rmdir(path)
        except OSError:  # not empty: something in it is in use
            return freed
        freed.entries = 1  # a directory gone whole is one entry, however many files it held
        return freed
    finally:
        os.close(fd)


def _close_all(*tables: dict[str, int]) -> None:
    for table in tables:
        for fd in table.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        table.clear()


@dataclass
class Cache:
    root: str
    # The most one image's layers may expand to (--max-unpacked-size).
    max_unpacked_size: int = DEFAULT_MAX_UNPACKED_SIZE
    # fds holding locks: shared ones on pinned entries, exclusive ones on temp directories
    # made with new_temp_dir. Closed when the Cache is collected.
    _pins: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _held: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        weakref.finalize(self, _close_all, self._pins, self._held)

    @classmethod
    def open(cls, root: str | None = None, max_unpacked_size: int | None = None) -> Cache:
        """The cache at `root` (default: default_cache_dir()), made if missing, with the
        temporary entries of dead processes reclaimed."""
        cache = cls(os.path.abspath(root or default_cache_dir()))
        if max_unpacked_size is not None:
            cache.max_unpacked_size = max_unpacked_size
        try:
            for sub in AREAS:
                os.makedirs(os.path.join(cache.root, sub), exist_ok=True)
            try:
                cache.reclaim_temp()
            except OSError as e:
                if e.errno not in _READ_ONLY_ERRNOS:
                    raise
        except OSError as e:
            raise CacheError(f"cannot use cache directory {cache.root}: {e.strerror}") from e
        return cache

    # -- paths ---------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        algo, hexd = split_digest(digest)
        return os.path.join(self.root, "blobs", algo, hexd)

    def layer_path(self, diff_id: str) -> str:
        algo, hexd = split_digest(diff_id)
        if algo != "sha256":
            raise DigestError(f"unsupported diff_id algorithm in {diff_id}")
        return os.path.join(self.root, "layers", "sha256", hexd + ".tar")

    def output_dir(self, key: str) -> str:
        return os.path.join(self.root, OUTPUTS_AREA, key)

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.root, "tmp")

    # -- temporary entries and locks ---------------------------------------------

    def _new_temp(self, prefix: str, suffix: str, directory: bool) -> tuple[str, int]:
        """Make an entry in tmp/ and lock it: (its path, the fd holding the lock)."""
        name = f"{TEMP_PREFIX}{os.getpid()}-{prefix}"
        with _lock_file(os.path.join(self.root, "locks", CREATE_LOCK), fcntl.LOCK_SH):
            if directory:
                path = tempfile.mkdtemp(dir=self.tmp_dir, prefix=name)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                fd, path = tempfile.mkstemp(dir=self.tmp_dir, prefix=name, suffix=suffix)
            fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh entry: nobody else can hold it
        return path, fd

    @contextlib.contextmanager
    def temp_file(self, suffix: str = "", prefix: str = "") -> Iterator[tuple[BinaryIO, str]]:
        """A locked temporary file in the cache; removed unless the caller renamed it away."""
        path, fd = self._new_temp(prefix, suffix, directory=False)
        f = os.fdopen(fd, "w+b")
        try:
            yield f, path
        finally:
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # before the close: the lock guards it until it is gone
            finally:
                f.close()  # can fail too (flushing onto a full disk)

    @contextlib.contextmanager
    def temp_dir(self, prefix: str = "") -> Iterator[str]:
        """A locked temporary directory; removed unless the caller renamed it away."""
        path = self.new_temp_dir(prefix)
        try:
            yield path
        finally:
            self.remove_temp(path)

    def new_temp_dir(self, prefix: str = "") -> str:
        """temp_dir for code that cannot keep a `with` block open: remove_temp ends it."""
        path, fd = self._new_temp(prefix, "", directory=True)
        self._held[path] = fd
        return path

    def unpin(self, path: str | os.PathLike[str]) -> None:
        fd = self._pins.pop(os.fspath(path), None)
        if fd is not None:
            os.close(fd)

    def discard(self, path: str) -> None:
        """Take the entry at `path` out of the cache at once (a rename into tmp/), then remove
        it; processes that pinned it keep what they opened."""
        with self.temp_dir("discarded-") as aside:
            with contextlib.suppress(FileNotFoundError):  # another process discarded it
                os.rename(path, os.path.join(aside, "entry"))
            self.unpin(path)

    def remove_temp(self, path: str | os.PathLike[str]) -> None:
        path = os.fspath(path)
        shutil.rmtree(path, ignore_errors=True)
        fd = self._held.pop(path, None)
        if fd is not None:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive inter-process lock on `name` (held until the block ends)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        with _lock_file(os.path.join(self.root, "locks", safe), fcntl.LOCK_EX):
            yield

    def pin(self, path: str | os.PathLike[str]) -> bool:
        """Hold a shared lock on the cache entry at `path` while this Cache lives, so that
        `prune` leaves it alone. False if it is not there (or was pruned as we looked)."""
        path = os.fspath(path)
        if path in self._pins:
            return True
        fd = lock_shared(path)
        if fd is None:
            return False
        if self._pins.setdefault(path, fd) != fd:
            os.close(fd)
        return True

    def reclaim_temp(self, foreign: bool = False) -> Freed:
        """Remove the entries of tmp/ whose writer is gone (nobody holds their lock). With
        `foreign`, also entries not named by this scheme (older vmimg versions' leftovers,
        which carry no lock)."""
        freed = Freed()
        claimed: list[tuple[str, int]] = []
        with _lock_file(os.path.join(self.root, "locks", CREATE_LOCK), fcntl.LOCK_EX):
            for name in sorted(os.listdir(self.tmp_dir)):
                path = os.path.join(self.tmp_dir, name)
                if not foreign and not _TEMP_NAME_RE.match(name):
                    continue
                if not (os.path.isfile(path) or os.path.isdir(path)) or os.path.islink(path):
                    freed += remove_unused(path)  # a symlink, a socket: nothing locks them
                elif (fd := _try_claim(path)) is None:
                    freed.kept += 1
                else:
                    claimed.append((path, fd))
        for path, fd in claimed:  # removed after the scan: creating entries waits for it
            try:
                freed.bytes += _remove(path)
                freed.entries += 1
            finally:
                os.close(fd)
        return freed

    # -- blobs -----------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def read_blob(self, digest: str) -> bytes | None:
        try:
            with open(self.blob_path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put_blob_bytes(self, digest: str, data: bytes, what: str) -> None:
        """Store `data` under `digest` after checking that it matches."""
        algo, _hexd = split_digest(digest)
        h = Hasher(algo)
        h.update(data)
        h.verify(digest, None, what)
        if self.has_blob(digest):
            return
        with self.temp_file(prefix="blob-") as (f, tmp):
            f.write(data)
            f.flush()
            commit(tmp, self.blob_path(digest))

    # -- sizes ---------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        """Bytes used per top-level area."""
        out: dict[str, int] = {}
        for area in ("blobs", "layers", "outputs", "kernels", "tmp"):
            total = 0
            for dirpath, _dirs, files in os.walk(os.path.join(self.root, area)):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dirpath, name)).st_size
            out[area] = total
        return out
