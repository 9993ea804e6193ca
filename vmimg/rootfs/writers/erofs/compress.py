"""z_erofs compression of one file: fixed-input pclusters and their lcluster indexes.

mkfs.erofs fills each physical cluster with as much input as fits (LZ4's
destSize mode, which the Python lz4 binding does not offer). We do the
converse, which the on-disk format allows just as well: each extent is a
fixed run of up to CHUNK_LCLUSTERS logical clusters (64 KiB), compressed in
one go and stored in as many whole blocks as it needs ("big pcluster"), the
compressed bytes at the *end* of the pcluster (0padding: the kernel finds the
stream's start by skipping leading zeros). Every extent starts on a logical
cluster boundary, so every HEAD has clusterofs 0. A chunk that would not save
at least one block is stored as PLAIN lclusters, one block each.

Indexes are the full (non-compact) form, one 8-byte z_erofs_lcluster_index
per 4 KiB of file:
    HEAD1    blkaddr of the pcluster
    NONHEAD  first after a head: delta0 = D0_CBLKCNT | pcluster blocks
    NONHEAD  others: delta0 = distance back to the head
    every NONHEAD: delta1 = distance forward to the next head

Zeros. A compressed file has no holes in the format Linux 6.1 reads (only
chunk-based files do), so a chunk that is all zeros (a hole of a sparse file,
known without reading it, or zeros read from the layer) becomes an extent
whose pcluster is shared: one block per chunk length holds the LZ4 stream of
that many zeros, and every such chunk of the image points at it. Extents that
share a pcluster decode to the same bytes, which the kernel handles as it
handles deduplicated pclusters. The shared blocks are written after all file
data (`ZeroPclusters`), and the HEAD indexes that use them are patched then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lz4.block

from vmimg.errors import WriterError
from vmimg.rootfs.writers.erofs import format as fmt

CHUNK_LCLUSTERS = 16  # logical clusters of input per pcluster: 64 KiB
CHUNK_SIZE = CHUNK_LCLUSTERS << fmt.LCLUSTER_SIZE_BITS
MAX_PCLUSTER_BLOCKS = CHUNK_LCLUSTERS  # a pcluster never reaches this (it would not shrink)
LZ4HC_DEFAULT_LEVEL = 6  # mkfs.erofs uses 9; 6 costs the CPU mkfs spends, for 0.3% more bytes
LZ4HC_LEVELS = range(1, 13)
# A zero chunk's LZ4 stream (64 KiB of zeros: about 270 bytes) fits one block; a chunk of
# one lcluster would save nothing and, last in a file, could not say its block count.
ZERO_PCLUSTER_BLOCKS = 1
MIN_ZERO_LCLUSTERS = 2

Compress = Callable[[bytes], bytes]


def make_compressor(algorithm: str, level: int | None) -> Compress | None:
    """A function compressing one chunk to a raw LZ4 block, or None for "none"."""
    if algorithm == "none":
        return None
    if algorithm == "lz4":

        def fast(data: bytes) -> bytes:
            return bytes(lz4.block.compress(data, mode="default", store_size=False))

        return fast
    if algorithm == "lz4hc":
        hc_level = LZ4HC_DEFAULT_LEVEL if level is None else level
        if hc_level not in LZ4HC_LEVELS:
            raise WriterError(f"lz4hc level {hc_level} outside 1..12")

        def high(data: bytes) -> bytes:
            return bytes(
                lz4.block.compress(
                    data, mode="high_compression", compression=hc_level, store_size=False
                )
            )

        return high
    raise WriterError(f"unknown erofs compression {algorithm!r} (none, lz4, lz4hc)")


def blocks_for(nbytes: int) -> int:
    return -(-nbytes // fmt.BLOCK_SIZE)


@dataclass
class CompressedFile:
    """The pclusters of one file as they are produced, chunk after chunk.

    `add_chunk` returns the bytes to write at the file's current block
    cursor; the caller writes them and the index array grows to match.
    """

    size: int
    start_block: int
    blocks: int = 0  # blocks written so far (the inode's compressed_blocks)
    indexes: bytearray = field(default_factory=bytearray)
    # (offset in `indexes` of a HEAD, lclusters) of each zero chunk: patched later
    zero_heads: list[tuple[int, int]] = field(default_factory=list)

    def add_zero_chunk(self, nlc: int) -> None:
        """Index a chunk of `nlc` lclusters of zeros; its pcluster is shared."""
        assert nlc >= MIN_ZERO_LCLUSTERS
        self.zero_heads.append((len(self.indexes), nlc))
        self._index_pcluster(0, nlc, ZERO_PCLUSTER_BLOCKS)

    def _index_pcluster(self, blkaddr: int, nlc: int, pblocks: int) -> None:
        self.indexes += fmt.lcluster_head(fmt.LCLUSTER_TYPE_HEAD1, 0, blkaddr)
        for j in range(1, nlc):
            delta0 = fmt.LI_D0_CBLKCNT | pblocks if j == 1 else j
            self.indexes += fmt.lcluster_nonhead(delta0, nlc - j)

    def patch_zero_heads(self, blkaddr_of: dict[int, int]) -> None:
        """Point each zero chunk's HEAD at the shared pcluster for its length."""
        for offset, nlc in self.zero_heads:
            head = fmt.lcluster_head(fmt.LCLUSTER_TYPE_HEAD1, 0, blkaddr_of[nlc])
            self.indexes[offset : offset + len(head)] = head

    def add_chunk(self, raw_len: int, compressed: bytes | None, raw: bytes) -> bytes:
        """Encode one chunk: compressed (when it saves a block) or as plain blocks."""
        nlc = blocks_for(raw_len)
        blkaddr = self.start_block + self.blocks
        if compressed is not None and blocks_for(len(compressed)) < nlc:
            pblocks = blocks_for(len(compressed))
            self._index_pcluster(blkaddr, nlc, pblocks)
            self.blocks += pblocks
            # 0padding: the stream ends at the pcluster's end
            return bytes(pblocks * fmt.BLOCK_SIZE - len(compressed)) + compressed
        for j in range(nlc):
            self.indexes += fmt.lcluster_head(fmt.LCLUSTER_TYPE_PLAIN, 0, blkaddr + j)
        self.blocks += nlc
        return raw + bytes(-len(raw) % fmt.BLOCK_SIZE)

    def metadata_size(self, inode_and_xattr_size: int) -> int:
        """Bytes after the inode start: inode, xattrs, padding, map header, indexes."""
        return _align8(inode_and_xattr_size) + fmt.FULL_INDEX_OFFSET + len(self.indexes)

    def metadata(self, inode_and_xattr_size: int) -> bytes:
        """What follows the inode and its xattrs: padding, map header, indexes."""
        pad = _align8(inode_and_xattr_size) - inode_and_xattr_size
        header = fmt.MapHeader(advise=fmt.ADVISE_BIG_PCLUSTER_1).pack()
        gap = bytes(fmt.FULL_INDEX_OFFSET - fmt.MAP_HEADER_SIZE)
        return bytes(pad) + header + gap + bytes(self.indexes)


def zero_pcluster(compress: Compress, nlc: int) -> bytes:
    """The shared pcluster of a zero chunk of `nlc` lclusters: its stream at the end."""
    stream = compress(bytes(nlc << fmt.LCLUSTER_SIZE_BITS))
    assert len(stream) <= ZERO_PCLUSTER_BLOCKS * fmt.BLOCK_SIZE
    return bytes(ZERO_PCLUSTER_BLOCKS * fmt.BLOCK_SIZE - len(stream)) + stream


def _align8(n: int) -> int:
    return (n + 7) & ~7
