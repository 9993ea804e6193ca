"""A pure-Python reference for the C loops of the erofs writer,
vmimg/rootfs/writers/erofs/_erofsmeta.c: the same contracts, written plainly (these are the
writer's loops as they were in Python), as the oracle the C code is checked against
(tests/writers/test_erofsmeta.py)."""

from __future__ import annotations

import itertools

from vmimg.rootfs.writers.erofs import format as fmt


def first_fit(
    meta_sizes: list[int], block_size: int, slot_size: int, open_blocks: int
) -> tuple[list[int], int]:
    """Each inode's nid, first-fit into the last `open_blocks` blocks opened, or at the
    end; slot 0 unused. And the area's length."""
    blocks = [0]
    free = [block_size - slot_size]
    end = block_size
    nids = []
    for meta_size in meta_sizes:
        size = -(-meta_size // slot_size) * slot_size
        offset = -1
        if size <= block_size:
            fit = next(itertools.compress(itertools.count(), map(size.__le__, free)), None)
            if fit is not None:
                offset = (blocks[fit] + 1) * block_size - free[fit]
        if offset < 0:
            offset = end
            end += -(-size // block_size) * block_size
            if len(blocks) >= open_blocks:
                del blocks[0], free[0]
        nids.append(offset // slot_size)
        last_block, used = divmod(offset + size, block_size)
        if used == 0:
            if last_block - 1 in blocks:
                at = blocks.index(last_block - 1)
                del blocks[at], free[at]
        elif last_block in blocks:
            free[blocks.index(last_block)] = block_size - used
        else:
            blocks.append(last_block)
            free.append(block_size - used)
    return nids, end


def dir_blocks(
    names: list[bytes],
    targets: list[int],
    block_starts: list[int],
    nids: list[int],
    file_types: bytes,
    block_size: int,
) -> bytes:
    """The directory's blocks, each but the last padded: dirents, then names."""
    out = b""
    bounds = [*block_starts, len(names)]
    for block, (start, end) in enumerate(itertools.pairwise(bounds)):
        nameoff = fmt.DIRENT_SIZE * (end - start)
        raw = b""
        for target, name in zip(targets[start:end], names[start:end], strict=True):
            raw += fmt.Dirent(nids[target], nameoff, file_types[target]).pack()
            nameoff += len(name)
        raw += b"".join(names[start:end])
        assert len(raw) <= block_size
        last = block == len(block_starts) - 1
        out += raw if last else raw.ljust(block_size, b"\0")
    return out


def scatter(dest: bytearray, places: list[int], pieces: list[bytes]) -> None:
    """Each piece copied into `dest` at its place; nothing copied if any falls outside."""
    if len(places) != len(pieces):
        raise ValueError("one place per piece")
    for at, piece in zip(places, pieces, strict=True):
        if at < 0 or at + len(piece) > len(dest):
            raise IndexError("a piece falls outside the buffer")
    for at, piece in zip(places, pieces, strict=True):
        dest[at : at + len(piece)] = piece
