"""Content digests, in one place: parsing `algo:hex`, hashing bytes, streams and files.

Every stage checks content against a digest (blobs, layers, bundle files, kernels), so
they all use these few helpers rather than calling hashlib each in its own way.
"""

from __future__ import annotations

import hashlib
import os
import re

from vmimg.errors import DigestError

_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")
_HEX_LEN = {"sha256": 64, "sha512": 128}
HASH_CHUNK = 4 << 20  # large reads: hashlib releases the GIL for them


def split_digest(digest: str) -> tuple[str, str]:
    """('sha256', hex) from 'sha256:hex'; DigestError if malformed."""
    m = _DIGEST_RE.match(digest)
    if not m or len(m.group(2)) != _HEX_LEN[m.group(1)]:
        raise DigestError(f"invalid digest {digest!r}")
    return m.group(1), m.group(2)


def is_sha256_hex(text: object) -> bool:
    """Whether `text` is a bare lower-case sha256 hex digest."""
    return isinstance(text, str) and len(text) == _HEX_LEN["sha256"] and _is_hex(text)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    """'algo:hex' of `data`."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


class Hasher:
    """Counts and hashes the bytes passed through it; checks them against a descriptor."""

    def __init__(self, algorithm: str = "sha256") -> None:
        self.algorithm = algorithm
        self._h = hashlib.new(algorithm)
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return f"{self.algorithm}:{self._h.hexdigest()}"

    @property
    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def verify(self, digest: str, size: int | None, what: str) -> None:
        if size is not None and self.size != size:
            raise DigestError(f"{what}: size {self.size} does not match the expected {size}")
        if self.digest != digest:
            raise DigestError(f"{what}: digest {self.digest} does not match the expected {digest}")


def hash_fd(fd: int, algorithm: str = "sha256") -> Hasher:
    """Hash an open file from its current offset to the end."""
    h = Hasher(algorithm)
    while chunk := os.read(fd, HASH_CHUNK):
        h.update(chunk)
    return h


def sha256_file(path: str | os.PathLike[str], follow_symlinks: bool = True) -> str:
    """The bare sha256 hex of a file's bytes. With follow_symlinks=False a symlink at
    `path` is an OSError (ELOOP) instead of being followed."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        return hash_fd(fd).hexdigest
    finally:
        os.close(fd)
