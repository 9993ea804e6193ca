"""EROFS on-disk structures: every struct layout and constant in one place.

Names follow the kernel's Documentation/filesystems/erofs.rst and
fs/erofs/erofs_fs.h (Linux 6.1, the guest kernel these images are mounted by).
All integers are little endian. Each structure is a NamedTuple (immutable, named
fields; a sixth of a frozen dataclass's import cost, as `vmimg rootfs` pays it on every
run) with a `pack()` that returns exactly its on-disk bytes; the layout logic lives in
writer.py and never builds bytes by hand.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# --- geometry -------------------------------------------------------------

BLOCK_SIZE_BITS = 12
BLOCK_SIZE = 1 << BLOCK_SIZE_BITS  # 4 KiB: the only block size a 4 KiB-page kernel reads
SUPER_OFFSET = 1024  # the superblock sits 1 KiB into block 0 (room for boot sectors)
SUPER_MAGIC_V1 = 0xE0F5E1E2
INODE_SLOT_SIZE = 32  # nid = (byte offset from meta_blkaddr) / 32
NAME_LEN_MAX = 255  # EROFS_NAME_LEN
ROOT_NID_MAX = 0xFFFF  # root_nid is a 16-bit superblock field
BLOCKS_MAX = 0xFFFFFFFF  # block addresses are 32-bit
DEV_MAJOR_MAX = 0xFFF  # what new_encode_dev() can hold in 32 bits
DEV_MINOR_MAX = 0xFFFFF

# --- superblock features ----------------------------------------------------

FEATURE_COMPAT_SB_CHKSUM = 0x00000001  # crc32c of the superblock block
FEATURE_COMPAT_MTIME = 0x00000002  # inode times are mtimes (build_time for compact ones)

FEATURE_INCOMPAT_ZERO_PADDING = 0x00000001  # compressed data is aligned to pcluster end
FEATURE_INCOMPAT_COMPR_CFGS = 0x00000002  # per-algorithm configs follow the superblock
FEATURE_INCOMPAT_BIG_PCLUSTER = 0x00000002  # same bit: pclusters may span several blocks

# --- inode i_format -----------------------------------------------------------

INODE_LAYOUT_COMPACT = 0  # 32-byte inode
INODE_LAYOUT_EXTENDED = 1  # 64-byte inode
I_VERSION_BIT = 0
I_DATALAYOUT_BIT = 1

# datalayout values
INODE_FLAT_PLAIN = 0  # data in contiguous blocks from raw_blkaddr
INODE_COMPRESSED_FULL = 1  # z_erofs, one 8-byte lcluster index per logical cluster
INODE_FLAT_INLINE = 2  # full blocks from raw_blkaddr, the tail right after the inode
INODE_COMPRESSED_COMPACT = 3
INODE_CHUNK_BASED = 4

COMPACT_INODE_SIZE = 32
EXTENDED_INODE_SIZE = 64

# limits of a compact inode: beyond them an inode must be extended
COMPACT_ID_MAX = 0xFFFF  # i_uid, i_gid are 16 bits
COMPACT_NLINK_MAX = 0xFFFF
COMPACT_SIZE_MAX = 0xFFFFFFFF
EXTENDED_ID_MAX = 0xFFFFFFFF  # i_uid, i_gid of an extended inode are 32 bits

# --- directories ------------------------------------------------------------

DIRENT_SIZE = 12

# A dirent's file_type: the generic FT_* values of vmimg/rootfs/writers/dirent.py

# --- xattrs -----------------------------------------------------------------

XATTR_IBODY_HEADER_SIZE = 12
XATTR_ENTRY_SIZE = 4  # header of one entry; name and value follow, padded to 4
XATTR_ALIGN = 4
XATTR_NAME_LEN_MAX = 0xFF  # e_name_len is 8 bits
XATTR_VALUE_SIZE_MAX = 0xFFFF  # e_value_size is 16 bits
XATTR_SHARED_COUNT_MAX = 0xFF  # h_shared_count is 8 bits
XATTR_ICOUNT_MAX = 0xFFFF  # i_xattr_icount is 16 bits

XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6

# Full-name matches first (the ACL names carry no suffix), then prefixes.
# Only names Linux 6.1 has a handler for are representable.
XATTR_EXACT_NAMES = {
    b"system.posix_acl_access": XATTR_INDEX_POSIX_ACL_ACCESS,
    b"system.posix_acl_default": XATTR_INDEX_POSIX_ACL_DEFAULT,
}
XATTR_PREFIXES = (
    (b"user.", XATTR_INDEX_USER),
    (b"trusted.", XATTR_INDEX_TRUSTED),
    (b"security.", XATTR_INDEX_SECURITY),
)

# --- compression (z_erofs) ------------------------------------------------------

COMPRESSION_LZ4 = 0  # h_algorithmtype / available_compr_algs bit
LZ4_MAX_DISTANCE = 65535  # the lz4 library's window: what our streams may reference
LCLUSTER_SIZE_BITS = BLOCK_SIZE_BITS  # h_clusterbits = 0: 4 KiB logical clusters
PCLUSTER_MAX_SIZE = 1024 * 1024  # Z_EROFS_PCLUSTER_MAX_SIZE

LCLUSTER_TYPE_PLAIN = 0  # an uncompressed block
LCLUSTER_TYPE_HEAD1 = 1  # first lcluster of a compressed extent (algorithm head 1)
LCLUSTER_TYPE_NONHEAD = 2  # a following lcluster of the same extent
LI_D0_CBLKCNT = 1 << 11  # delta[0] flag: low bits are the pcluster's block count

ADVISE_BIG_PCLUSTER_1 = 0x0002  # head-1 pclusters may span several blocks

MAP_HEADER_SIZE = 8
# Full (non-compact) indexes start 8 bytes after the map header
# (Z_EROFS_FULL_INDEX_ALIGN): 16 bytes from the 8-aligned end of the xattrs.
FULL_INDEX_OFFSET = MAP_HEADER_SIZE + 8
LCLUSTER_INDEX_SIZE = 8

# ---------------------------------------------------------------------------


_SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHB5xQ24x")
_LZ4_CFGS = struct.Struct("<HHH10x")  # length prefix (14) + z_erofs_lz4_cfgs
# i_reserved and i_reserved2 are pad bytes: zeros, and no arguments to pass per inode
_INODE_COMPACT = struct.Struct("<HHHHI4xIIHH4x")
_INODE_EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
_DIRENT = struct.Struct("<QHBB")
_XATTR_IBODY_HEADER = struct.Struct("<IB7x")
_XATTR_ENTRY = struct.Struct("<BBH")
_MAP_HEADER = struct.Struct("<HHHBB")
_LCLUSTER_HEAD = struct.Struct("<HHI")
_LCLUSTER_NONHEAD = struct.Struct("<HHHH")

DIRENT = _DIRENT  # for packing a directory block's dirents in place
# For packing compact inodes in place, the writer's per-inode path: pack_into(buf, offset,
# i_format, xattr_icount, mode, nlink, size, i_u, ino, uid, gid), as InodeCompact.pack().
INODE_COMPACT = _INODE_COMPACT
SUPERBLOCK_SIZE = _SUPERBLOCK.size
LZ4_CFGS_SIZE = _LZ4_CFGS.size
SUPERBLOCK_CHECKSUM_OFFSET = 4  # within the superblock


class Superblock(NamedTuple):
    """struct erofs_super_block (128 bytes at SUPER_OFFSET)."""

    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: bytes
    volume_name: bytes
    feature_compat: int
    feature_incompat: int
    # with COMPR_CFGS this is available_compr_algs, otherwise lz4_max_distance
    u1: int = 0
    checksum: int = 0

    def pack(self) -> bytes:
        return _SUPERBLOCK.pack(
            SUPER_MAGIC_V1,
            self.checksum,
            self.feature_compat,
            BLOCK_SIZE_BITS,
            0,  # sb_extslots
            self.root_nid,
            self.inos,
            self.build_time,
            self.build_time_nsec,
            self.blocks,
            self.meta_blkaddr,
            self.xattr_blkaddr,
            self.uuid,
            self.volume_name,
            self.feature_incompat,
            self.u1,
            0,  # extra_devices
            0,  # devt_slotoff
            0,  # dirblkbits: must be 0 for Linux 6.1
            0,  # packed_nid
        )


class Lz4Config(NamedTuple):
    """struct z_erofs_lz4_cfgs with its 16-bit length prefix, right after the superblock."""

    max_distance: int
    max_pclusterblks: int

    def pack(self) -> bytes:
        return _LZ4_CFGS.pack(LZ4_CFGS_SIZE - 2, self.max_distance, self.max_pclusterblks)


def i_format(version: int, datalayout: int) -> int:
    return (version << I_VERSION_BIT) | (datalayout << I_DATALAYOUT_BIT)


class InodeCompact(NamedTuple):
    """struct erofs_inode_compact (32 bytes); its mtime is the superblock's build time."""

    datalayout: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int  # raw_blkaddr, compressed_blocks or rdev
    ino: int
    uid: int
    gid: int

    def pack(self) -> bytes:
        return _INODE_COMPACT.pack(
            i_format(INODE_LAYOUT_COMPACT, self.datalayout),
            self.xattr_icount,
            self.mode,
            self.nlink,
            self.size,
            self.i_u,
            self.ino,
            self.uid,
            self.gid,
        )


class InodeExtended(NamedTuple):
    """struct erofs_inode_extended (64 bytes)."""

    datalayout: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int

    def pack(self) -> bytes:
        return _INODE_EXTENDED.pack(
            i_format(INODE_LAYOUT_EXTENDED, self.datalayout),
            self.xattr_icount,
            self.mode,
            0,
            self.size,
            self.i_u,
            self.ino,
            self.uid,
            self.gid,
            self.mtime,
            self.mtime_nsec,
            self.nlink,
        )


def pack_extended_into(
    buf: bytearray,
    offset: int,
    common: tuple[int, int, int, int, int, int],
    rest: tuple[int, int, int, int, int],
) -> None:
    """What InodeExtended(...).pack() gives, packed in place.

    common: (datalayout, xattr_icount, mode, nlink, size, i_u);
    rest: (ino, uid, gid, mtime, mtime_nsec)."""
    datalayout, icount, mode, nlink, size, i_u = common
    ino, uid, gid, mtime, mtime_nsec = rest
    _INODE_EXTENDED.pack_into(
        buf,
        offset,
        i_format(INODE_LAYOUT_EXTENDED, datalayout),
        icount,
        mode,
        0,
        size,
        i_u,
        ino,
        uid,
        gid,
        mtime,
        mtime_nsec,
        nlink,
    )


class Dirent(NamedTuple):
    """struct erofs_dirent (12 bytes); names follow all dirents of a block."""

    nid: int
    nameoff: int
    file_type: int

    def pack(self) -> bytes:
        return _DIRENT.pack(self.nid, self.nameoff, self.file_type, 0)


class XattrIbodyHeader(NamedTuple):
    """struct erofs_xattr_ibody_header, followed by the shared xattr ids."""

    shared_ids: tuple[int, ...]

    def pack(self) -> bytes:
        ids = struct.pack(f"<{len(self.shared_ids)}I", *self.shared_ids)
        return _XATTR_IBODY_HEADER.pack(0, len(self.shared_ids)) + ids


class XattrEntry(NamedTuple):
    """struct erofs_xattr_entry + name suffix + value, padded to 4 bytes.

    The same form is used inline after an inode and in the shared xattr area.
    """

    name_index: int
    name: bytes  # the part after the prefix the index stands for
    value: bytes

    def pack(self) -> bytes:
        raw = _XATTR_ENTRY.pack(len(self.name), self.name_index, len(self.value))
        raw += self.name + self.value
        return raw + bytes(-len(raw) % XATTR_ALIGN)


def xattr_icount(ibody_size: int) -> int:
    """i_xattr_icount for an xattr ibody of `ibody_size` bytes (0: no xattrs)."""
    if ibody_size == 0:
        return 0
    return (ibody_size - XATTR_IBODY_HEADER_SIZE) // 4 + 1


class MapHeader(NamedTuple):
    """struct z_erofs_map_header (8 bytes), 8-aligned after a compressed inode's xattrs."""

    advise: int
    algorithmtype: int = COMPRESSION_LZ4
    clusterbits: int = LCLUSTER_SIZE_BITS - BLOCK_SIZE_BITS

    def pack(self) -> bytes:
        return _MAP_HEADER.pack(0, 0, self.advise, self.algorithmtype, self.clusterbits)


def lcluster_head(lcluster_type: int, clusterofs: int, blkaddr: int) -> bytes:
    """struct z_erofs_lcluster_index of a PLAIN or HEAD lcluster."""
    return _LCLUSTER_HEAD.pack(lcluster_type, clusterofs, blkaddr)


def lcluster_nonhead(delta0: int, delta1: int) -> bytes:
    """struct z_erofs_lcluster_index of a NONHEAD lcluster.

    delta0: distance back to the HEAD (or LI_D0_CBLKCNT | block count for the
    first NONHEAD of a big pcluster); delta1: distance to the next HEAD.
    """
    return _LCLUSTER_NONHEAD.pack(LCLUSTER_TYPE_NONHEAD, 0, delta0, delta1)


def encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev(): how i_u.rdev stores a device number."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
