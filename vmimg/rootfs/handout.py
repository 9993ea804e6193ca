"""Cache entries handed out as output files: sealing an entry, checking it is untouched,
and putting it at a destination by reflink, hardlink or copy.

A cache hit hands the cached file out without copying its bytes where it can
(`share_file`): a reflink (copy-on-write clone) where the file system has them, else
a hardlink to the cache entry for a format nobody writes in place (erofs), else a
copy. Cache entries lose their write bits, so a hardlinked output is read-only too.

The warm-hit fast path (cli/quick) runs this before anything else is loaded: it imports
the standard library's cheapest modules and vmimg's foundation only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from vmimg import netstrings
from vmimg.errors import VmimgError, WriterError
from vmimg.image import unsynced
from vmimg.image.fsutil import disk_usage, pwrite_all, space_shortfall

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
TEMP_NAME_BYTES = 8  # random bytes in a temporary output's name (hex in the name)


def check_output_space(dest: str, need: int, directory: str | None = None) -> None:
    """WriterError, before anything is written, if `need` bytes would fill the file
    system `dest` goes to (beyond the reserve vmimg leaves free); `directory`: where on it
    they go, if not beside `dest`."""
    problem = space_shortfall(directory or os.path.dirname(os.path.abspath(dest)) or ".", need)
    if problem is not None:
        raise WriterError(f"cannot write {dest}: {problem}")


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
    pwrite_all(out_fd, data, offset)
    return len(data)


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
# moves the mtime, so a damaged entry is noticed before it is handed out again. Its fields
# (netstrings): SEAL_MAGIC, then each file's path in the entry and "SIZE MTIME_NS", by path.
SEAL_RECORD = ".sealed"
SEAL_MAGIC = "vmimg-seal 2"


def _stamps(entry_dir: str) -> list[str]:
    """The entry's seal record, as its fields: how every file of it looks now."""
    stamps = []
    for dirpath, _dirs, names in os.walk(entry_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, entry_dir)
            if rel != SEAL_RECORD:
                st = os.lstat(path)
                stamps.append((rel, f"{st.st_size} {st.st_mtime_ns}"))
    return [SEAL_MAGIC, *(field for stamp in sorted(stamps) for field in stamp)]


def seal_entry(entry_dir: str) -> None:
    """Seal every file of a new cache entry (see `seal`) and record how each looks."""
    for dirpath, _dirs, names in os.walk(entry_dir):
        for name in names:
            seal(os.path.join(dirpath, name))
    netstrings.write_file(os.path.join(entry_dir, SEAL_RECORD), _stamps(entry_dir))


def entry_untouched(entry_dir: str) -> bool:
    """True if every file of the cache entry is as `seal_entry` left it."""
    try:
        return netstrings.read_file(os.path.join(entry_dir, SEAL_RECORD)) == _stamps(entry_dir)
    except OSError:
        return False


def entry_usable(entry_dir: str) -> bool:
    """True if the cache entry may be handed out: untouched since it was sealed, and not
    committed unsynced in an earlier boot (image/unsynced.py)."""
    return entry_untouched(entry_dir) and unsynced.trusted(entry_dir)


def share_file(src: str, dst: str, linkable: bool, shown: str | None = None) -> str:
    """Create `dst` (it must not exist) with the bytes of `src`, sharing them where possible:
    REFLINK, else HARDLINK when `linkable` (nobody will write `dst` in place: `src` is
    sealed first), else COPY. Returns which one; on an error `dst` may be left behind.
    `shown`: the name errors give `dst` (a temporary name means nothing to the user)."""
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
        check_output_space(shown or dst, disk_usage(src), os.path.dirname(dst) or ".")
        copy_file(src, fd)
    finally:
        os.close(fd)
    return COPY


def hand_out(cached: str, dest: str, linkable: bool) -> str:
    """Put the cache entry `cached` at `dest` (replacing what is there, atomically) with
    `share_file`; returns how. A copy or clone gets mode 0644, a hardlink keeps the
    entry's read-only mode."""
    directory = os.path.dirname(os.path.abspath(dest)) or "."
    if not os.path.isdir(directory):
        raise VmimgError(f"output directory {directory} does not exist")
    # share_file makes it with O_EXCL: a clash of names fails, it never overwrites.
    tmp = os.path.join(
        directory, f".{os.path.basename(dest)}.{os.urandom(TEMP_NAME_BYTES).hex()}.tmp"
    )
    try:
        how = share_file(cached, tmp, linkable, shown=dest)
        if how != HARDLINK:
            os.chmod(tmp, 0o644)
        os.rename(tmp, dest)
    finally:
        # Left over on an error; or `dest` already was a link to the entry, and rename(2)
        # between two names of one file does nothing.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return how
