"""Plain Python references for the C loops of the ext4 writer
(vmimg/rootfs/writers/ext4/_ext4meta.c), checked against them by
tests/writers/test_ext4meta.py. pack_inode's reference is format.py's pack_inode_into,
which the writer still uses for the journal inode; this is dir_leaf's, the writer's own
leaf packing before it moved to C."""

from __future__ import annotations

import struct

from vmimg.rootfs.writers.ext4 import format as fmt

LEAF_SPACE = fmt.BLOCK_SIZE - fmt.DIR_TAIL_SIZE


def dir_leaf(inos: list[int], names: list[bytes], file_types: bytes, inode_seed: int) -> bytes:
    """One leaf block: the entries in order, the last reaching the tail; an empty leaf is
    one unused entry spanning the block."""
    entries = [fmt.DirEntry2(i, n, t) for i, n, t in zip(inos, names, file_types, strict=True)]
    if sum(e.size for e in entries) > LEAF_SPACE:
        raise ValueError("entries do not fit in a block")
    block = bytearray(fmt.BLOCK_SIZE)
    pos = 0
    last = 0
    for e in entries:
        e.pack_into(block, pos, e.size)
        last = pos
        pos += e.size
    if not entries:
        fmt.DIRENT.pack_into(block, 0, 0, LEAF_SPACE, 0, 0)
    else:
        struct.pack_into("<H", block, last + 4, LEAF_SPACE - last)
    fmt.seal_dir_leaf(block, inode_seed)
    return bytes(block)
