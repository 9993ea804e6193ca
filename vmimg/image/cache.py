"""The content-addressed cache: blobs, uncompressed layers, finished conversions.

    $VMIMG_CACHE/                       (default $XDG_CACHE_HOME/vmimg)
      blobs/sha256/<hex>                manifests, configs, any blob, verified
      layers/sha256/<hex>.tar           uncompressed layer tars, named by diff_id
      outputs/<key>/...                 finished conversions
      tmp/                              work in progress (same file system: rename is atomic)
      locks/                            flock files

Every file appears under its final name only by an atomic rename after its
digest was checked, so a crash at any point leaves either nothing or a whole,
verified file. Concurrent processes coordinate with flock on a per-key lock
file, so the second one waits and then finds the work done.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from vmimg.digest import Hasher, split_digest
from vmimg.errors import CacheError, DigestError


def default_cache_dir() -> str:
    env = os.environ.get("VMIMG_CACHE")
    if env:
        return env
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "vmimg")


@dataclass
class Cache:
    root: str

    @classmethod
    def open(cls, root: str | None = None) -> Cache:
        cache = cls(os.path.abspath(root or default_cache_dir()))
        try:
            for sub in ("blobs/sha256", "blobs/sha512", "layers/sha256", "outputs", "tmp", "locks"):
                os.makedirs(os.path.join(cache.root, sub), exist_ok=True)
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
        return os.path.join(self.root, "outputs", key)

    # -- temporary files and locks ---------------------------------------------

    @contextlib.contextmanager
    def temp_file(self, suffix: str = "") -> Iterator[tuple[BinaryIO, str]]:
        """A temporary file in the cache; removed unless the caller renamed it away."""
        fd, path = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"), suffix=suffix)
        f = os.fdopen(fd, "w+b")
        try:
            yield f, path
        finally:
            try:
                f.close()  # can fail too (flushing onto a full disk)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    @contextlib.contextmanager
    def temp_dir(self) -> Iterator[str]:
        path = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive inter-process lock on `name` (held until the block ends)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        fd = os.open(os.path.join(self.root, "locks", safe), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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
        with self.temp_file() as (f, tmp):
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.rename(tmp, self.blob_path(digest))

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
