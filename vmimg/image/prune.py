"""`vmimg cache prune`: free the cache's disk without pulling anything from under a live
process. What a live vmimg holds a lock on stays: its temporary entries (exclusive locks)
and the finished entries it reads (shared locks, `Cache.pin`). Directories other
processes rename entries into (blobs/sha256, kernels/, ...) are emptied, never removed.
"""

from __future__ import annotations

import fcntl
import os

from vmimg.errors import CacheError
from vmimg.image.cache import AREAS, Cache, Freed, remove_unused
from vmimg.image.fsutil import HITS_AREA, OUTPUTS_AREA

# Directories that stay (emptied) besides every top-level one: others rename into them.
KEPT_DIRS = {"blobs/sha256", "blobs/sha512", "layers/sha256", "kernels/sources", "kernels/logs"}
KERNEL_LOGS = "kernels/logs"
KERNEL_LOG_SUFFIX = ".log"


def prune(cache: Cache, everything: bool = False) -> dict[str, Freed]:
    """Remove stale temporary entries, finished outputs and the hit records naming them
    (cli/quick); with `everything`, every
    entry of every area (blobs, layers, kernels and their sources, logs, unheld locks).
    Returns what was freed per top-level area."""
    try:
        return _prune(cache, everything)
    except OSError as e:
        raise CacheError(f"cannot prune {e.filename or cache.root}: {e.strerror}") from e


def _prune(cache: Cache, everything: bool) -> dict[str, Freed]:
    freed: dict[str, Freed] = {}
    with cache.lock("prune"):
        freed["tmp"] = cache.reclaim_temp(foreign=True)
        areas = sorted(os.listdir(cache.root)) if everything else [OUTPUTS_AREA, HITS_AREA]
        for area in areas:
            path = os.path.join(cache.root, area)
            if area in ("tmp", "locks") or not os.path.isdir(path):
                continue
            freed[area] = _empty(cache, area)
    if everything:
        freed["locks"] = _unheld_locks(cache)
    for sub in AREAS:
        os.makedirs(os.path.join(cache.root, sub), exist_ok=True)
    return freed


def _empty(cache: Cache, rel: str) -> Freed:
    """Remove what the directory `rel` of the cache holds, keeping the KEPT_DIRS."""
    freed = Freed()
    for name in sorted(os.listdir(os.path.join(cache.root, rel))):
        child = f"{rel}/{name}"
        path = os.path.join(cache.root, child)
        if child in KEPT_DIRS and os.path.isdir(path):
            freed += _empty(cache, child)
        elif rel == KERNEL_LOGS and _kernel_build_running(cache, name):
            freed.kept += 1  # the log of a build under way
        else:
            freed += remove_unused(path)
    return freed


def _kernel_build_running(cache: Cache, log_name: str) -> bool:
    """A kernel build writes kernels/logs/<key>.log while it holds the lock kernel-<key>."""
    if not log_name.endswith(KERNEL_LOG_SUFFIX):
        return False
    key = log_name[: -len(KERNEL_LOG_SUFFIX)]
    return _held(os.path.join(cache.root, "locks", f"kernel-{key}"))


def _held(lock_path: str) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _unheld_locks(cache: Cache) -> Freed:
    """Lock files nobody holds (Cache.lock notices a lock file removed under it)."""
    freed = Freed()
    locks = os.path.join(cache.root, "locks")
    for name in sorted(os.listdir(locks)):
        freed += remove_unused(os.path.join(locks, name))
    return freed
