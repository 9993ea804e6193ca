"""dm-verity hash trees for finished root file system images, computed in Python.

The tree is what `veritysetup format --no-superblock` writes for format version 1,
sha256, 4 KiB data and hash blocks and a 32-byte salt (docs/bundle.md, "dm-verity"):

    hash(x)       sha256(salt || x)                 (format 1 prepends the salt)
    level 0       hash(data block i), for every data block, 32 bytes each, in order,
                  zero-padded to whole 4 KiB hash blocks (128 digests per block)
    level k+1     hash(hash block j of level k), likewise, until a level is one block
    root hash     hash(the one block of the top level); hash(data block 0) when the
                  image is a single block and there are no levels
    on disk       the levels top first (the top level's block at the hash offset),
                  each level's blocks in order; no superblock, no padding between

A hash tree is appended to the image (hash offset = data size) or written to a file
of its own (hash offset 0). Memory stays bounded: one level is hashed at a time,
reading its input in chunks and writing digests to their final place as they come;
each level above the first is read back from where it was written. Blocks are hashed
on a few threads (hashlib releases the GIL for each 4 KiB block); the output does not
depend on how many.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path

from vmimg.errors import VerityError
from vmimg.image.fsutil import pwrite_all

FORMAT_VERSION = 1
ALGORITHM = "sha256"
DIGEST_SIZE = hashlib.sha256().digest_size
BLOCK_SIZE = 4096  # data and hash blocks alike: the page size of both guest arches
SALT_SIZE = 32  # veritysetup's default; the caller derives it from the build key
SECTOR_SIZE = 512  # device-mapper tables count 512-byte sectors
# Format 1 pads each digest to a power of two; sha256's 32 bytes need no padding.
HASHES_PER_BLOCK = BLOCK_SIZE // DIGEST_SIZE
# Blocks read per system call: 4 MiB (preadv takes at most IOV_MAX = 1024 buffers).
CHUNK_BLOCKS = 1024
# Blocks one hashing task takes, and the unit of the zero-run shortcut: 1 MiB.
PART_BLOCKS = 256
# sha256 releases the GIL while it hashes a block (over 2 KiB), so threads scale.
MAX_WORKERS = 4
# How dm-init names and numbers the device: a fixed minor makes it /dev/dm-0 for sure.
DM_NAME = "vroot"
DM_MINOR = 0
DM_ROOT_DEVICE = "/dev/dm-0"
# Characters that would end a field of dm-mod.create= (comma, semicolon), a table
# argument (white space) or the quoted parameter (double quote).
_DM_UNSAFE = re.compile(r'[\s,;"]')


class OnCorruption(enum.Enum):
    """What the kernel does when a block does not match its hash."""

    EIO = ""  # the read fails with EIO and the block is logged: the agent can report it
    RESTART = "restart_on_corruption"
    PANIC = "panic_on_corruption"
    IGNORE = "ignore_corruption"  # log only: for diagnosis, never for protection


@dataclass(frozen=True)
class VerityTree:
    """Where a hash tree is and what it hashes to: everything the kernel's table needs."""

    root_hash: str  # hex
    salt: str  # hex
    data_blocks: int
    hash_offset: int  # bytes from the start of the hash file to the top level's block
    hash_blocks: int  # blocks of the tree, all levels
    algorithm: str = ALGORITHM
    data_block_size: int = BLOCK_SIZE
    hash_block_size: int = BLOCK_SIZE
    version: int = FORMAT_VERSION

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    @property
    def hash_size(self) -> int:
        return self.hash_blocks * self.hash_block_size

    def table(
        self,
        data_device: str,
        hash_device: str | None = None,
        on_corruption: OnCorruption = OnCorruption.EIO,
    ) -> str:
        """The device-mapper table line of the verity target (dmsetup's format).

        `hash_device` defaults to `data_device`: the tree appended to the image.
        """
        hash_dev = hash_device or data_device
        for device in (data_device, hash_dev):
            _check_dm_word(device, "device")
        sectors = self.data_size // SECTOR_SIZE
        fields = [
            "0", str(sectors), "verity", str(self.version), data_device, hash_dev,
            str(self.data_block_size), str(self.hash_block_size), str(self.data_blocks),
            str(self.hash_offset // self.hash_block_size), self.algorithm,
            self.root_hash, self.salt,
        ]  # fmt: skip
        if on_corruption.value:
            fields += ["1", on_corruption.value]
        return " ".join(fields)

    def dm_create_param(
        self,
        device: str = "/dev/vda",
        hash_device: str | None = None,
        on_corruption: OnCorruption = OnCorruption.EIO,
        name: str = DM_NAME,
    ) -> str:
        """`dm-mod.create="<name>,,<minor>,ro,<table>"`: dm-init maps `device` read-only as
        /dev/dm-0 before the root is mounted (no initramfs needed)."""
        _check_dm_word(name, "device-mapper name")
        table = self.table(device, hash_device, on_corruption)
        return f'dm-mod.create="{name},,{DM_MINOR},ro,{table}"'

    def kernel_args(
        self,
        device: str = "/dev/vda",
        hash_device: str | None = None,
        on_corruption: OnCorruption = OnCorruption.EIO,
    ) -> list[str]:
        """Kernel parameters that make the verified device the root. The caller adds
        `ro` and `rootfstype=`: a verity device cannot be written."""
        return [
            self.dm_create_param(device, hash_device, on_corruption),
            f"root={DM_ROOT_DEVICE}",
        ]


def _check_dm_word(value: str, what: str) -> None:
    if not value or _DM_UNSAFE.search(value):
        raise VerityError(
            f"{what} {value!r} cannot go into dm-mod.create= "
            "(empty, or has white space, a comma, semicolon or quote)"
        )


# -- the tree ----------------------------------------------------------------------


def level_blocks(data_blocks: int) -> list[int]:
    """Hash blocks of each level, level 0 (hashes of data blocks) first, the top level
    (one block) last; none for a single data block. The kernel's own count."""
    sizes = []
    n = data_blocks
    while n > 1:
        n = -(-n // HASHES_PER_BLOCK)
        sizes.append(n)
    return sizes


def append_hash_tree(
    image: str | os.PathLike[str], salt: bytes, *, workers: int | None = None
) -> VerityTree:
    """Append the image's hash tree to the image itself; hash offset = data size.

    On failure the file is cut back to its data. Appending twice hashes the first
    tree as data: call it once, on a finished image. `workers`: hashing threads
    (default: one per CPU, at most MAX_WORKERS).
    """
    path = Path(image)
    _check_salt(salt)
    threads = _workers(workers)
    fd = _open(path, os.O_RDWR)
    try:
        data_blocks = _data_blocks(fd, path)
        data_size = data_blocks * BLOCK_SIZE
        try:
            return _build(fd, data_blocks, fd, data_size, salt, path, threads)
        except BaseException:
            os.ftruncate(fd, data_size)
            raise
    finally:
        os.close(fd)


def write_hash_tree(
    image: str | os.PathLike[str],
    hash_file: str | os.PathLike[str],
    salt: bytes,
    *,
    workers: int | None = None,
) -> VerityTree:
    """Write the image's hash tree to `hash_file` (created or truncated); hash offset 0."""
    path = Path(image)
    _check_salt(salt)
    threads = _workers(workers)
    fd = _open(path, os.O_RDONLY)
    try:
        data_blocks = _data_blocks(fd, path)
        hash_path = Path(hash_file)
        out = _open(hash_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            return _build(fd, data_blocks, out, 0, salt, path, threads)
        except BaseException:
            hash_path.unlink(missing_ok=True)
            raise
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _workers(workers: int | None) -> int:
    if workers is None:
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise VerityError(f"hashing needs at least one worker thread, not {workers!r}")
    return workers


def _open(path: Path, flags: int, mode: int = 0o644) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        raise VerityError(f"cannot open {path}: {e.strerror}") from e


def _data_blocks(fd: int, path: Path) -> int:
    size = os.fstat(fd).st_size
    if size == 0:
        raise VerityError(f"{path} is empty: there is nothing to protect")
    if size % BLOCK_SIZE:
        raise VerityError(
            f"{path} is {size} bytes, not a multiple of the {BLOCK_SIZE}-byte verity block"
        )
    return size // BLOCK_SIZE


def _check_salt(salt: object) -> None:
    if not isinstance(salt, bytes):
        raise VerityError(f"the verity salt must be {SALT_SIZE} bytes, not {type(salt).__name__}")
    if len(salt) != SALT_SIZE:
        raise VerityError(f"the verity salt must be {SALT_SIZE} bytes, not {len(salt)}")


def _build(
    data_fd: int,
    data_blocks: int,
    hash_fd: int,
    hash_offset: int,
    salt: bytes,
    path: Path,
    workers: int,
) -> VerityTree:
    sizes = level_blocks(data_blocks)
    try:
        with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
            hasher = _BlockHasher(salt, path, pool)
            root = _hash_tree(hasher, data_fd, data_blocks, hash_fd, hash_offset, sizes)
    except OSError as e:
        raise VerityError(f"cannot hash {path}: {e.strerror or e}") from e
    return VerityTree(
        root_hash=root.hex(),
        salt=salt.hex(),
        data_blocks=data_blocks,
        hash_offset=hash_offset,
        hash_blocks=sum(sizes),
    )


def _hash_tree(
    hasher: _BlockHasher,
    data_fd: int,
    data_blocks: int,
    hash_fd: int,
    hash_offset: int,
    sizes: list[int],
) -> bytes:
    """Write every level, bottom up; returns the root digest."""
    # Level k starts after every level above it (the top level comes first on disk).
    starts = [hash_offset + BLOCK_SIZE * sum(sizes[k + 1 :]) for k in range(len(sizes))]
    os.ftruncate(hash_fd, hash_offset + BLOCK_SIZE * sum(sizes))
    src_fd, src_start, src_blocks = data_fd, 0, data_blocks
    for start, blocks in zip(starts, sizes, strict=True):
        hasher.hash_level(src_fd, src_start, src_blocks, hash_fd, start)
        src_fd, src_start, src_blocks = hash_fd, start, blocks
    # The top level is one block (or, with no levels, data block 0): its hash is the root.
    return hasher.digests(src_fd, src_start, 1)


class _BlockHasher:
    """Hashes runs of blocks with no Python code per block.

    Each chunk is read with one preadv straight into slots that follow a copy of the
    salt, so every record `salt || block` is contiguous in one buffer, and `map` runs
    sha256 over the records in C. Parts of a chunk go to a thread pool: hashlib drops
    the GIL while it hashes each block.
    """

    def __init__(self, salt: bytes, path: Path, pool: ThreadPoolExecutor | None) -> None:
        self._path = path  # for messages
        self._pool = pool
        self._record = len(salt) + BLOCK_SIZE
        self._buffer = bytearray(salt + bytes(BLOCK_SIZE)) * CHUNK_BLOCKS
        view = memoryview(self._buffer)
        rec = self._record
        self._records = [view[i * rec : (i + 1) * rec] for i in range(CHUNK_BLOCKS)]
        self._slots = [r[len(salt) :] for r in self._records]
        # What a part of the buffer holds when its blocks are all zero.
        self._zero_part = bytes(self._buffer[: PART_BLOCKS * rec])
        self._zero_digest = hashlib.sha256(self._zero_part[:rec]).digest()

    def digests(self, fd: int, start: int, blocks: int) -> bytes:
        """The digests of `blocks` blocks of `fd` from byte `start`, concatenated."""
        out: list[bytes] = []
        done = 0
        while done < blocks:
            n = min(CHUNK_BLOCKS, blocks - done)
            offset = start + done * BLOCK_SIZE
            got = os.preadv(fd, self._slots[:n], offset)
            if got != n * BLOCK_SIZE:
                raise VerityError(
                    f"{self._path} shrank while being hashed (at byte {offset + got})"
                )
            firsts = range(0, n, PART_BLOCKS)
            counts = [min(PART_BLOCKS, n - first) for first in firsts]
            if self._pool is not None and len(counts) > 1:
                out.extend(self._pool.map(self._part, firsts, counts))
            else:
                out.extend(map(self._part, firsts, counts))
            done += n
        return b"".join(out)

    def _part(self, first: int, count: int) -> bytes:
        """The digests of `count` records of the buffer from record `first`."""
        size = count * self._record
        zeros = self._zero_part if count == PART_BLOCKS else self._zero_part[:size]
        if self._buffer.startswith(zeros, first * self._record):
            # A run of zero blocks (an ext4 image's free space): one memcmp, no hashing.
            return self._zero_digest * count
        return b"".join(map(_DIGEST, map(hashlib.sha256, self._records[first : first + count])))

    def hash_level(
        self, src_fd: int, src_start: int, src_blocks: int, dst_fd: int, dst_start: int
    ) -> None:
        """Hash every source block and write the digests from `dst_start`, chunk by chunk;
        the level's last block is zero-padded (ftruncate left it zero)."""
        done = 0
        written = dst_start
        while done < src_blocks:
            n = min(CHUNK_BLOCKS, src_blocks - done)
            digests = self.digests(src_fd, src_start + done * BLOCK_SIZE, n)
            pwrite_all(dst_fd, digests, written)
            written += len(digests)
            done += n


_DIGEST = methodcaller("digest")


def check_root_hash(image: str | os.PathLike[str], tree: VerityTree) -> None:
    """Check, in O(1), that the tree stored in `image` hashes to `tree.root_hash`: the
    top level's block (or, for a one-block image, the data block) hashed with the salt.
    The kernel checks every level below it as it reads. VerityError if it does not."""
    salt = bytes.fromhex(tree.salt)
    offset = tree.hash_offset if tree.hash_blocks else 0
    path = Path(image)
    fd = _open(path, os.O_RDONLY)
    try:
        block = os.pread(fd, BLOCK_SIZE, offset)
    finally:
        os.close(fd)
    if len(block) != BLOCK_SIZE:
        raise VerityError(f"{path}: the verity tree is cut short")
    if hashlib.sha256(salt + block).hexdigest() != tree.root_hash:
        raise VerityError(f"{path}: rootfs integrity: the verity tree does not match the root hash")
