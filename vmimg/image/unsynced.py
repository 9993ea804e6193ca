"""Cache entries committed without waiting for the disk, trusted only in the boot that
wrote them.

An fsync before each rename into the cache made every cold conversion wait for the disk:
Debian minbase to erofs took about 0.85 s with it and 0.72 s without, on a disk that writes
380 MB/s. Until the machine stops, the page cache is the truth for everyone on it: a
process killed at any point loses nothing the kernel already has. Only a crash of the
machine (or a power cut) loses bytes that were not yet on the disk, and after it the
machine starts a new boot, with a new boot id.

So a layer or a conversion is committed unsynced. Before anything is written into its
temporary entry, the entry gets an extended attribute naming this boot (MARK), and the mark
is made durable at once: one fsync of an entry that is still empty. Then the entry is
written and renamed into place, and nothing waits for the disk. Whoever finds it later
reads the mark (`trusted`):
- no mark: the entry was committed durably, or has been made durable since: trust it;
- this boot's mark: a crash that could lose its bytes would start a new boot: trust it;
- any other mark: its bytes may never have reached the disk. A layer is hashed against
  its diff_id; if it is whole it is fsynced and its mark taken off (`settle`), otherwise it
  is unpacked again. A conversion is discarded and made again.

Where the boot cannot be told (no /proc), or the file system keeps no user xattrs, `mark`
says so, and the entry is fsynced before its rename as before.

The warm-hit fast path (cli/quick) reads marks before anything else is loaded: this module
imports the standard library's cheapest modules only.
"""

from __future__ import annotations

import errno
import os

MARK = "user.vmimg.unsynced"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
BOOT_ID_MAX = 64  # a boot id is 36 characters and a newline
# getxattr's answer when the entry has no mark, or its file system keeps no xattrs (so no
# mark could have been set on it: `mark` failed there and the entry was fsynced).
_NO_MARK = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)

_boot: list[bytes | None] = []  # read once per process: it cannot change while we run


def boot_id() -> bytes | None:
    """This boot's id (the kernel's, new at every boot), or None where there is none."""
    if not _boot:
        try:
            with open(BOOT_ID_PATH, "rb") as f:
                value = f.read(BOOT_ID_MAX).strip()
        except OSError:
            value = b""
        _boot.append(value or None)
    return _boot[0]


def mark(entry: int | str) -> bool:
    """Mark a new temporary entry (an fd or a path; a file or a directory, still empty) as
    written in this boot, durably. False if it cannot be marked: commit it durably then."""
    boot = boot_id()
    if boot is None:
        return False
    fd = entry if isinstance(entry, int) else os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.setxattr(fd, MARK, boot)
        os.fsync(fd)  # the mark is on the disk before anything can rename the entry
    except OSError:  # no user xattrs here (ENOTSUP, EPERM), or no room for one (ENOSPC)
        return False
    finally:
        if fd is not entry:
            os.close(fd)
    return True


def trusted(entry: str) -> bool:
    """Whether the cache entry at `entry` may be used as it is: it has no mark, or this
    boot's. False for another boot's mark, and for an entry that cannot be read."""
    try:
        value = os.getxattr(entry, MARK, follow_symlinks=False)
    except OSError as e:
        return e.errno in _NO_MARK
    return value == boot_id()


def settle(entry: str) -> None:
    """Make the file at `entry` durable, then take its mark off (an entry found whole after
    a crash, say). OSError if it cannot."""
    fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        try:
            os.removexattr(fd, MARK)
        except OSError as e:
            if e.errno not in _NO_MARK:
                raise
    finally:
        os.close(fd)
