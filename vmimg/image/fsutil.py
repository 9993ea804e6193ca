"""File-system helpers that load nothing heavy: free space, disk usage, shared locks, and
where the cache is.

The cache, the writers and the warm-hit fast path (cli/quick) share them; the fast path
runs before anything else is imported, so this module imports the standard library's
cheapest modules only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

# Writes stop while a file system has less than this share of its size free, up to a cap:
# a full disk fails everything else on it too.
MIN_FREE_SHARE = 50
MIN_FREE_CAP = 1 << 30
# The cache's areas that the fast path reads (the whole layout: image/cache.py).
OUTPUTS_AREA = "outputs"
HITS_AREA = "hits"
_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))
# Opening a cache entry (file or directory) to lock it: never through a symlink, never
# blocking on a FIFO someone put there.
OPEN_ENTRY = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def default_cache_dir() -> str:
    """$VMIMG_CACHE, else $XDG_CACHE_HOME/vmimg (~/.cache/vmimg)."""
    env = os.environ.get("VMIMG_CACHE")
    if env:
        return env
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "vmimg")


def format_size(n: int) -> str:
    """'256 MiB', '4.9 MiB', '512 bytes': exact when the size is a whole number of units."""
    for unit, name in _UNITS:
        if n >= unit:
            return f"{n // unit} {name}" if n % unit == 0 else f"{n / unit:.1f} {name}"
    return f"{n} bytes"


def free_space(path: str) -> tuple[int, int]:
    """(bytes available on the file system of `path`, bytes vmimg leaves free on it)."""
    st = os.statvfs(path)
    keep = min(st.f_blocks * st.f_frsize // MIN_FREE_SHARE, MIN_FREE_CAP)
    return st.f_bavail * st.f_frsize, keep


def space_shortfall(path: str, need: int) -> str | None:
    """None if `need` bytes fit on the file system of `path` with its reserve to spare,
    else why not (for an error message)."""
    avail, keep = free_space(path)
    if need + keep <= avail:
        return None
    return (
        f"it needs at least {format_size(need)} and {path} has {format_size(avail)} free "
        f"(vmimg leaves {format_size(keep)} unused)"
    )


def disk_usage(path: str) -> int:
    """Bytes of disk the file or tree at `path` occupies (what removing it frees; holes
    take none)."""
    st = os.lstat(path)
    total = st.st_blocks * 512
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirs, names in os.walk(path):
            for name in dirs + names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """All of `data` at `offset` (pwrite may write less than it is given)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_file(fd: int, path: str) -> bool:
    """Is `path` still the file `fd` has open (not removed or replaced meanwhile)?"""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def lock_shared(path: str) -> int | None:
    """An fd holding a shared flock on the entry at `path` (`prune` takes an exclusive one
    before removing it), or None if it is not there or was removed as we locked it."""
    try:
        fd = os.open(path, OPEN_ENTRY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a prune is removing it
        present = same_file(fd, path)
    except BaseException:
        os.close(fd)
        raise
    if not present:
        os.close(fd)
        return None
    return fd
