"""ext4 on-disk structures: layouts, constants, checksums and hashes, in one place.

Names follow the kernel's Documentation/filesystems/ext4 (ondisk/*.rst) and
fs/ext4/ext4.h, so a reader can look each field up there. Everything here is
pure packing: no layout decisions (those live in writer.py).

All ext4 structures are little-endian except the journal (jbd2), which is
big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmimg.rootfs.writers import _kernelhash

# --- Geometry -----------------------------------------------------------------

BLOCK_SIZE = 4096
LOG_BLOCK_SIZE = 2  # s_log_block_size: block size is 1024 << 2
SUPERBLOCK_OFFSET = 1024  # the primary superblock lives at byte 1024 of block 0
SUPERBLOCK_SIZE = 1024
BLOCKS_PER_GROUP = BLOCK_SIZE * 8  # one block bitmap block covers one group
INODE_SIZE = 256
MAX_INODES_PER_GROUP = BLOCK_SIZE * 8  # one inode bitmap block per group
INODES_PER_BLOCK = BLOCK_SIZE // INODE_SIZE
GOOD_OLD_INODE_SIZE = 128
EXTRA_ISIZE = 32  # i_extra_isize: covers the fields up to and including i_projid
DESC_SIZE = 64  # group descriptor size with the 64bit feature
FIRST_INO = 11  # first non-reserved inode
LOG_GROUPS_PER_FLEX = 4  # flex_bg grouping, as mke2fs; our metadata is packed anyway

# Reserved inode numbers.
ROOT_INO = 2
JOURNAL_INO = 8
LOST_FOUND_INO = 11

# --- Superblock constants -----------------------------------------------------

EXT4_SUPER_MAGIC = 0xEF53
STATE_CLEAN = 1
ERRORS_CONTINUE = 1
OS_LINUX = 0
REV_DYNAMIC = 1
MAX_MNT_COUNT_NONE = 0xFFFF  # -1: no forced check after N mounts
CHECKSUM_TYPE_CRC32C = 1
DEFAULT_MOUNT_OPTS = 0x0004 | 0x0008  # EXT4_DEFM_XATTR_USER | EXT4_DEFM_ACL, as mke2fs
FLAGS_UNSIGNED_HASH = 0x0002  # directory hashes treat name bytes as unsigned
JNL_BACKUP_BLOCKS = 1  # s_jnl_blocks holds a copy of the journal inode's i_block

COMPAT_HAS_JOURNAL = 0x0004
COMPAT_EXT_ATTR = 0x0008
COMPAT_DIR_INDEX = 0x0020
COMPAT_SPARSE_SUPER2 = 0x0200  # backups only in s_backup_bgs (we keep none)

INCOMPAT_FILETYPE = 0x0002
INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
INCOMPAT_FLEX_BG = 0x0200

RO_COMPAT_SPARSE_SUPER = 0x0001
RO_COMPAT_LARGE_FILE = 0x0002
RO_COMPAT_DIR_NLINK = 0x0020
RO_COMPAT_EXTRA_ISIZE = 0x0040
RO_COMPAT_METADATA_CSUM = 0x0400

# --- Group descriptor flags -----------------------------------------------------

BG_INODE_UNINIT = 0x0001  # inode table and bitmap not initialised (no inode used)
BG_INODE_ZEROED = 0x0004  # inode table is zeroed (ours are holes in a fresh file)

# --- Inode constants ------------------------------------------------------------

INODE_FLAG_INDEX = 0x00001000  # hashed-indexed directory
INODE_FLAG_EXTENTS = 0x00080000
N_BLOCKS_BYTES = 60  # i_block: 15 32-bit words
MAX_FAST_SYMLINK = N_BLOCKS_BYTES - 1  # fast symlink targets are < 60 bytes
LINK_MAX = 65000  # EXT4_LINK_MAX; directories beyond it get i_links_count 1 (dir_nlink)
SECTOR = 512  # i_blocks unit without the huge_file feature

# --- Extents ----------------------------------------------------------------------

EXTENT_MAGIC = 0xF30A
EXTENT_MAX_LEN = 32768  # longest initialised extent
EXTENT_ENTRY_SIZE = 12  # ext4_extent, ext4_extent_idx and ext4_extent_header are 12 bytes
EXTENTS_IN_INODE = (N_BLOCKS_BYTES - EXTENT_ENTRY_SIZE) // EXTENT_ENTRY_SIZE  # 4
EXTENT_TAIL_SIZE = 4
EXTENTS_PER_BLOCK = (BLOCK_SIZE - EXTENT_ENTRY_SIZE - EXTENT_TAIL_SIZE) // EXTENT_ENTRY_SIZE

# --- Directories --------------------------------------------------------------------

# A dirent's file_type: vmimg/rootfs/writers/dirent.py
DIRENT_HEADER = 8  # inode, rec_len, name_len, file_type
DIR_TAIL_SIZE = 12  # ext4_dir_entry_tail, holds the leaf block's checksum
DIR_TAIL_FT = 0xDE
NAME_MAX = 255

DX_HASH_HALF_MD4 = 1
DX_ROOT_INFO_LENGTH = 8
DX_ENTRY_SIZE = 8
DX_TAIL_SIZE = 8
DX_MAX_INDIRECT_LEVELS = 1  # without the largedir feature: a root plus one node level
# dx_root: "." (12) + ".." header (12) + dx_root_info (8), then count/limit and entries.
DX_ROOT_ENTRIES_OFFSET = 32
DX_ROOT_LIMIT = (BLOCK_SIZE - DX_ROOT_ENTRIES_OFFSET - DX_TAIL_SIZE) // DX_ENTRY_SIZE
# dx_node: one empty dirent header spanning the block, then count/limit and entries.
DX_NODE_ENTRIES_OFFSET = 8
DX_NODE_LIMIT = (BLOCK_SIZE - DX_NODE_ENTRIES_OFFSET - DX_TAIL_SIZE) // DX_ENTRY_SIZE

# --- Extended attributes ----------------------------------------------------------------

XATTR_MAGIC = 0xEA020000
XATTR_BLOCK_HEADER_SIZE = 32
XATTR_ENTRY_HEADER = 16  # name_len, name_index, value_offs, value_inum, value_size, hash
XATTR_PAD = 4
XATTR_IBODY_OFFSET = GOOD_OLD_INODE_SIZE + EXTRA_ISIZE  # in-inode xattr area starts here
XATTR_REFCOUNT_MAX = 1024  # the kernel stops sharing an xattr block beyond this

# Name prefixes and their e_name_index, longest first so "system.posix_acl_access"
# wins over "system.". The two ACL names have an empty suffix on disk.
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"system.posix_acl_default", 3),
    (b"system.posix_acl_access", 2),
    (b"security.", 6),
    (b"trusted.", 4),
    (b"system.", 7),
    (b"user.", 1),
)
XATTR_INDEX_ACL_ACCESS = 2
XATTR_INDEX_ACL_DEFAULT = 3

# POSIX ACLs: the VFS xattr form (version 2, 8-byte entries) is stored by ext4 in
# its own compact form (version 1, 4-byte entries for the *_OBJ, MASK and OTHER tags).
POSIX_ACL_XATTR_VERSION = 2
EXT4_ACL_VERSION = 1
ACL_USER = 0x02
ACL_GROUP = 0x08

# --- Journal (jbd2, big-endian) ---------------------------------------------------------

JBD2_MAGIC = 0xC03B3998
JBD2_SUPERBLOCK_V2 = 4
JBD2_MIN_JOURNAL_BLOCKS = 1024


# --- Checksums --------------------------------------------------------------------------


# crc32c_raw(seed, data): the kernel's crc32c, no inversion on input or output (C, _kernelhash.c)
crc32c_raw = _kernelhash.crc32c


def fs_checksum_seed(uuid: bytes) -> int:
    """s_csum_seed: every metadata checksum starts from crc32c(~0, uuid)."""
    return crc32c_raw(0xFFFFFFFF, uuid)


_INO_GENERATION = struct.Struct("<II")


def inode_checksum_seed(fs_seed: int, ino: int, generation: int) -> int:
    """Per-inode seed, also used for the inode's extent, directory blocks: crc32c of the
    inode number, then of the generation (one call over both)."""
    return crc32c_raw(fs_seed, _INO_GENERATION.pack(ino, generation))


# --- Generic little helper for fixed layouts --------------------------------------------


class Layout:
    """A named, ordered C struct layout: field names and struct format codes.

    `pack(**values)` fills unnamed fields with zeros; `offset(name)` gives a
    field's byte offset (for checksums that skip a field).
    """

    def __init__(self, endian: str, fields: tuple[tuple[str, str], ...], size: int) -> None:
        self.names = tuple(name for name, _ in fields)
        self._defaults = {name: (b"" if fmt.endswith("s") else 0) for name, fmt in fields}
        self._struct = struct.Struct(endian + "".join(fmt for _, fmt in fields))
        self.size = size
        if self._struct.size > size:
            raise AssertionError("layout longer than its declared size")
        self._offsets: dict[str, int] = {}
        pos = 0
        for name, fmt in fields:
            self._offsets[name] = pos
            pos += struct.calcsize(endian + fmt)

    def offset(self, name: str) -> int:
        return self._offsets[name]

    def pack(self, **values: object) -> bytearray:
        unknown = set(values) - set(self.names)
        if unknown:
            raise AssertionError(f"unknown fields {sorted(unknown)}")
        args = [values.get(name, self._defaults[name]) for name in self.names]
        out = bytearray(self.size)
        self._struct.pack_into(out, 0, *args)
        return out


# --- Superblock -----------------------------------------------------------------------------

SUPERBLOCK = Layout(
    "<",
    (
        ("s_inodes_count", "I"),
        ("s_blocks_count_lo", "I"),
        ("s_r_blocks_count_lo", "I"),
        ("s_free_blocks_count_lo", "I"),
        ("s_free_inodes_count", "I"),
        ("s_first_data_block", "I"),
        ("s_log_block_size", "I"),
        ("s_log_cluster_size", "I"),
        ("s_blocks_per_group", "I"),
        ("s_clusters_per_group", "I"),
        ("s_inodes_per_group", "I"),
        ("s_mtime", "I"),
        ("s_wtime", "I"),
        ("s_mnt_count", "H"),
        ("s_max_mnt_count", "H"),
        ("s_magic", "H"),
        ("s_state", "H"),
        ("s_errors", "H"),
        ("s_minor_rev_level", "H"),
        ("s_lastcheck", "I"),
        ("s_checkinterval", "I"),
        ("s_creator_os", "I"),
        ("s_rev_level", "I"),
        ("s_def_resuid", "H"),
        ("s_def_resgid", "H"),
        ("s_first_ino", "I"),
        ("s_inode_size", "H"),
        ("s_block_group_nr", "H"),
        ("s_feature_compat", "I"),
        ("s_feature_incompat", "I"),
        ("s_feature_ro_compat", "I"),
        ("s_uuid", "16s"),
        ("s_volume_name", "16s"),
        ("s_last_mounted", "64s"),
        ("s_algorithm_usage_bitmap", "I"),
        ("s_prealloc_blocks", "B"),
        ("s_prealloc_dir_blocks", "B"),
        ("s_reserved_gdt_blocks", "H"),
        ("s_journal_uuid", "16s"),
        ("s_journal_inum", "I"),
        ("s_journal_dev", "I"),
        ("s_last_orphan", "I"),
        ("s_hash_seed", "16s"),
        ("s_def_hash_version", "B"),
        ("s_jnl_backup_type", "B"),
        ("s_desc_size", "H"),
        ("s_default_mount_opts", "I"),
        ("s_first_meta_bg", "I"),
        ("s_mkfs_time", "I"),
        ("s_jnl_blocks", "68s"),  # 17 words: journal inode i_block, i_size_high, i_size
        ("s_blocks_count_hi", "I"),
        ("s_r_blocks_count_hi", "I"),
        ("s_free_blocks_count_hi", "I"),
        ("s_min_extra_isize", "H"),
        ("s_want_extra_isize", "H"),
        ("s_flags", "I"),
        ("s_raid_stride", "H"),
        ("s_mmp_interval", "H"),
        ("s_mmp_block", "Q"),
        ("s_raid_stripe_width", "I"),
        ("s_log_groups_per_flex", "B"),
        ("s_checksum_type", "B"),
        ("s_encryption_level", "B"),
        ("s_reserved_pad", "B"),
        ("s_kbytes_written", "Q"),
        ("s_snapshot_inum", "I"),
        ("s_snapshot_id", "I"),
        ("s_snapshot_r_blocks_count", "Q"),
        ("s_snapshot_list", "I"),
        ("s_error_count", "I"),
        ("s_first_error_time", "I"),
        ("s_first_error_ino", "I"),
        ("s_first_error_block", "Q"),
        ("s_first_error_func", "32s"),
        ("s_first_error_line", "I"),
        ("s_last_error_time", "I"),
        ("s_last_error_ino", "I"),
        ("s_last_error_line", "I"),
        ("s_last_error_block", "Q"),
        ("s_last_error_func", "32s"),
        ("s_mount_opts", "64s"),
        ("s_usr_quota_inum", "I"),
        ("s_grp_quota_inum", "I"),
        ("s_overhead_clusters", "I"),
        ("s_backup_bgs", "8s"),  # two group numbers; zeros with sparse_super2 = no backups
        ("s_encrypt_algos", "4s"),
        ("s_encrypt_pw_salt", "16s"),
        ("s_lpf_ino", "I"),
        ("s_prj_quota_inum", "I"),
        ("s_checksum_seed", "I"),
        ("s_wtime_hi", "B"),
        ("s_mtime_hi", "B"),
        ("s_mkfs_time_hi", "B"),
        ("s_lastcheck_hi", "B"),
        ("s_first_error_time_hi", "B"),
        ("s_last_error_time_hi", "B"),
        ("s_first_error_errcode", "B"),
        ("s_last_error_errcode", "B"),
        ("s_encoding", "H"),
        ("s_encoding_flags", "H"),
        ("s_orphan_file_inum", "I"),
        ("s_reserved", "376s"),
        ("s_checksum", "I"),
    ),
    SUPERBLOCK_SIZE,
)
assert SUPERBLOCK.offset("s_checksum") == 0x3FC


def seal_superblock(sb: bytearray) -> None:
    """Set s_checksum: crc32c(~0) over everything before it."""
    off = SUPERBLOCK.offset("s_checksum")
    struct.pack_into("<I", sb, off, crc32c_raw(0xFFFFFFFF, bytes(sb[:off])))


# --- Group descriptor ---------------------------------------------------------------------

GROUP_DESC = Layout(
    "<",
    (
        ("bg_block_bitmap_lo", "I"),
        ("bg_inode_bitmap_lo", "I"),
        ("bg_inode_table_lo", "I"),
        ("bg_free_blocks_count_lo", "H"),
        ("bg_free_inodes_count_lo", "H"),
        ("bg_used_dirs_count_lo", "H"),
        ("bg_flags", "H"),
        ("bg_exclude_bitmap_lo", "I"),
        ("bg_block_bitmap_csum_lo", "H"),
        ("bg_inode_bitmap_csum_lo", "H"),
        ("bg_itable_unused_lo", "H"),
        ("bg_checksum", "H"),
        ("bg_block_bitmap_hi", "I"),
        ("bg_inode_bitmap_hi", "I"),
        ("bg_inode_table_hi", "I"),
        ("bg_free_blocks_count_hi", "H"),
        ("bg_free_inodes_count_hi", "H"),
        ("bg_used_dirs_count_hi", "H"),
        ("bg_itable_unused_hi", "H"),
        ("bg_exclude_bitmap_hi", "I"),
        ("bg_block_bitmap_csum_hi", "H"),
        ("bg_inode_bitmap_csum_hi", "H"),
        ("bg_reserved", "I"),
    ),
    DESC_SIZE,
)


@dataclass(frozen=True)
class GroupDescriptor:
    """One block group's descriptor: where its bitmaps and inode table are."""

    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free_blocks: int
    free_inodes: int
    used_dirs: int
    flags: int
    itable_unused: int
    block_bitmap_csum: int
    inode_bitmap_csum: int

    def pack(self, group: int, fs_seed: int) -> bytearray:
        lo, hi = 0xFFFFFFFF, 32
        m16 = 0xFFFF
        out = GROUP_DESC.pack(
            bg_block_bitmap_lo=self.block_bitmap & lo,
            bg_inode_bitmap_lo=self.inode_bitmap & lo,
            bg_inode_table_lo=self.inode_table & lo,
            bg_free_blocks_count_lo=self.free_blocks & m16,
            bg_free_inodes_count_lo=self.free_inodes & m16,
            bg_used_dirs_count_lo=self.used_dirs & m16,
            bg_flags=self.flags,
            bg_block_bitmap_csum_lo=self.block_bitmap_csum & m16,
            bg_inode_bitmap_csum_lo=self.inode_bitmap_csum & m16,
            bg_itable_unused_lo=self.itable_unused & m16,
            bg_block_bitmap_hi=self.block_bitmap >> hi,
            bg_inode_bitmap_hi=self.inode_bitmap >> hi,
            bg_inode_table_hi=self.inode_table >> hi,
            bg_free_blocks_count_hi=self.free_blocks >> 16,
            bg_free_inodes_count_hi=self.free_inodes >> 16,
            bg_used_dirs_count_hi=self.used_dirs >> 16,
            bg_itable_unused_hi=self.itable_unused >> 16,
            bg_block_bitmap_csum_hi=self.block_bitmap_csum >> 16,
            bg_inode_bitmap_csum_hi=self.inode_bitmap_csum >> 16,
        )
        # The descriptor checksum covers the group number and the descriptor with
        # bg_checksum zeroed (it is zero here); only its low 16 bits are kept.
        crc = crc32c_raw(fs_seed, struct.pack("<I", group))
        crc = crc32c_raw(crc, out)
        struct.pack_into("<H", out, GROUP_DESC.offset("bg_checksum"), crc & m16)
        return out


def bitmap_checksum(fs_seed: int, bitmap: bytes | bytearray | memoryview) -> int:
    """Block and inode bitmap checksums: crc32c over the meaningful bytes."""
    return crc32c_raw(fs_seed, bitmap)


# --- Inode ------------------------------------------------------------------------------------

# struct ext4_inode up to i_projid (128 + EXTRA_ISIZE bytes).
INODE = Layout(
    "<",
    (
        ("i_mode", "H"),
        ("i_uid", "H"),
        ("i_size_lo", "I"),
        ("i_atime", "I"),
        ("i_ctime", "I"),
        ("i_mtime", "I"),
        ("i_dtime", "I"),
        ("i_gid", "H"),
        ("i_links_count", "H"),
        ("i_blocks_lo", "I"),
        ("i_flags", "I"),
        ("l_i_version", "I"),
        ("i_block", "60s"),
        ("i_generation", "I"),
        ("i_file_acl_lo", "I"),
        ("i_size_high", "I"),
        ("i_obso_faddr", "I"),
        ("l_i_blocks_high", "H"),
        ("l_i_file_acl_high", "H"),
        ("l_i_uid_high", "H"),
        ("l_i_gid_high", "H"),
        ("l_i_checksum_lo", "H"),
        ("l_i_reserved", "H"),
        ("i_extra_isize", "H"),
        ("i_checksum_hi", "H"),
        ("i_ctime_extra", "I"),
        ("i_mtime_extra", "I"),
        ("i_atime_extra", "I"),
        ("i_crtime", "I"),
        ("i_crtime_extra", "I"),
        ("i_version_hi", "I"),
        ("i_projid", "I"),
    ),
    INODE_SIZE,
)
assert INODE.offset("i_extra_isize") == GOOD_OLD_INODE_SIZE
assert INODE.offset("i_projid") + 4 == XATTR_IBODY_OFFSET
_INODE_STRUCT = struct.Struct("<" + "HHIIIIIHHIII60sIIIIHHHHHHHHIIIIIII")
_CSUM_LO = INODE.offset("l_i_checksum_lo")
_CSUM_HI = INODE.offset("i_checksum_hi")
_U16 = struct.Struct("<H")


def encode_time(ns: int) -> tuple[int, int]:
    """(seconds field, extra field) for a nanosecond timestamp.

    The extra field holds the nanoseconds in its upper 30 bits and two epoch
    bits that extend the signed 32-bit seconds to 34 bits (years 1901-2446).
    """
    sec, nsec = divmod(ns, 1_000_000_000)
    lo = sec & 0xFFFFFFFF
    signed_lo = lo - (1 << 32) if lo & 0x80000000 else lo
    epoch = ((sec - signed_lo) >> 32) & 3
    return lo, (nsec << 2) | epoch


@dataclass
class Inode:
    """The fields of an inode we write; everything else is zero."""

    mode: int
    uid: int
    gid: int
    size: int
    links: int
    blocks_512: int  # i_blocks in 512-byte sectors
    flags: int
    i_block: bytes  # 60 bytes: extent root, fast symlink target or device numbers
    mtime_ns: int
    file_acl: int = 0  # xattr block number
    xattr_ibody: bytes = b""  # in-inode xattr area (magic, entries, values), <= 96 bytes

    def pack_into(self, buf: bytearray, offset: int, ino: int, fs_seed: int) -> None:
        """Write the 256-byte inode at buf[offset:] with its checksum."""
        sec, extra = encode_time(self.mtime_ns)
        pack_inode_into(
            buf,
            offset,
            inode_checksum_seed(fs_seed, ino, 0),
            (self.mode, self.uid, self.gid, self.size, self.links, self.blocks_512, self.flags),
            self.i_block,
            sec,
            extra,
            self.file_acl,
            self.xattr_ibody,
        )


def pack_inode_into(
    buf: bytearray,
    offset: int,
    inode_seed: int,
    fields: tuple[int, int, int, int, int, int, int],
    i_block: bytes,
    sec: int,
    extra: int,
    file_acl: int,
    xattr_ibody: bytes,
) -> None:
    """Write one 256-byte inode at buf[offset:] (zeros there) with its checksum, from
    plain values rather than an `Inode` object. The writer's inode loop packs with the C
    extension's `_ext4meta.pack_inode`, which this is the reference for
    (tests/writers/test_ext4meta.py).

    fields: (mode, uid, gid, size, links, blocks_512, flags); `sec`, `extra`: the time as
    encode_time gives it (atime = ctime = mtime = crtime)."""
    mode, uid, gid, size, links, blocks_512, flags = fields
    _INODE_STRUCT.pack_into(
        buf,
        offset,
        mode,
        uid & 0xFFFF,
        size & 0xFFFFFFFF,
        sec,  # i_atime
        sec,  # i_ctime
        sec,  # i_mtime
        0,  # i_dtime
        gid & 0xFFFF,
        links,
        blocks_512 & 0xFFFFFFFF,
        flags,
        0,  # l_i_version
        i_block,
        0,  # i_generation
        file_acl & 0xFFFFFFFF,
        size >> 32,
        0,  # i_obso_faddr
        blocks_512 >> 32,
        file_acl >> 32,
        uid >> 16,
        gid >> 16,
        0,  # l_i_checksum_lo, set below
        0,
        EXTRA_ISIZE,
        0,  # i_checksum_hi, set below
        extra,  # i_ctime_extra
        extra,  # i_mtime_extra
        extra,  # i_atime_extra
        sec,  # i_crtime
        extra,  # i_crtime_extra
        0,
        0,
    )
    if xattr_ibody:
        start = offset + XATTR_IBODY_OFFSET
        buf[start : start + len(xattr_ibody)] = xattr_ibody
    crc = crc32c_raw(inode_seed, memoryview(buf)[offset : offset + INODE_SIZE])
    _U16.pack_into(buf, offset + _CSUM_LO, crc & 0xFFFF)
    _U16.pack_into(buf, offset + _CSUM_HI, crc >> 16)


# --- Extents ---------------------------------------------------------------------------------

# ext4_extent_header: eh_magic, eh_entries, eh_max, eh_depth, eh_generation
EXTENT_HEADER = struct.Struct("<HHHHI")
# ext4_extent: ee_block, ee_len, ee_start_hi, ee_start_lo
EXTENT = struct.Struct("<IHHI")
# ext4_extent_idx: ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
EXTENT_IDX = struct.Struct("<IIHH")


@dataclass(frozen=True)
class Extent:
    """A run of `length` blocks at logical block `logical`, physical block `physical`."""

    logical: int
    length: int
    physical: int

    def pack(self) -> bytes:
        return EXTENT.pack(
            self.logical, self.length, self.physical >> 32, self.physical & 0xFFFFFFFF
        )


@dataclass(frozen=True)
class ExtentIdx:
    """An index entry: the subtree at `leaf` covers logical blocks from `logical`."""

    logical: int
    leaf: int

    def pack(self) -> bytes:
        return EXTENT_IDX.pack(self.logical, self.leaf & 0xFFFFFFFF, self.leaf >> 32, 0)


# An extent root of one leaf extent, padded to i_block's 60 bytes: the common case, packed
# in one call.
_ONE_EXTENT_ROOT = struct.Struct("<HHHHIIHHI36x")


def one_extent_root(logical: int, length: int, physical: int) -> bytes:
    """i_block holding an extent tree of one extent (what extent_node packs, faster)."""
    return _ONE_EXTENT_ROOT.pack(
        EXTENT_MAGIC,
        1,
        EXTENTS_IN_INODE,
        0,
        0,
        logical,
        length,
        physical >> 32,
        physical & 0xFFFFFFFF,
    )


def extent_node(entries: list[bytes], depth: int, capacity: int) -> bytearray:
    """An extent tree node: header plus packed entries, sized for `capacity` entries."""
    out = bytearray(EXTENT_ENTRY_SIZE * (1 + capacity))
    EXTENT_HEADER.pack_into(out, 0, EXTENT_MAGIC, len(entries), capacity, depth, 0)
    out[EXTENT_ENTRY_SIZE : EXTENT_ENTRY_SIZE * (1 + len(entries))] = b"".join(entries)
    return out


def extent_block(entries: list[bytes], depth: int, inode_seed: int) -> bytearray:
    """A full extent tree block, with the ext4_extent_tail checksum after eh_max entries."""
    node = extent_node(entries, depth, EXTENTS_PER_BLOCK)
    block = bytearray(BLOCK_SIZE)
    block[: len(node)] = node
    struct.pack_into("<I", block, len(node), crc32c_raw(inode_seed, node))
    return block


# --- Directory entries --------------------------------------------------------------------------

DIRENT = struct.Struct("<IHBB")  # inode, rec_len, name_len, file_type


def dirent_size(name_len: int) -> int:
    """Bytes a linear directory entry needs: header plus name, padded to 4."""
    return (DIRENT_HEADER + name_len + 3) & ~3


@dataclass(frozen=True)
class DirEntry2:
    """ext4_dir_entry_2: one name in a directory block."""

    inode: int
    name: bytes
    file_type: int

    @property
    def size(self) -> int:
        return dirent_size(len(self.name))

    def pack_into(self, buf: bytearray, offset: int, rec_len: int) -> None:
        DIRENT.pack_into(buf, offset, self.inode, rec_len, len(self.name), self.file_type)
        start = offset + DIRENT_HEADER
        buf[start : start + len(self.name)] = self.name


def seal_dir_leaf(block: bytearray, inode_seed: int) -> None:
    """Write the ext4_dir_entry_tail (a fake empty dirent holding the checksum)."""
    tail = BLOCK_SIZE - DIR_TAIL_SIZE
    DIRENT.pack_into(block, tail, 0, DIR_TAIL_SIZE, 0, DIR_TAIL_FT)
    struct.pack_into("<I", block, tail + DIRENT_HEADER, crc32c_raw(inode_seed, block[:tail]))


# dx_root_info: reserved_zero, hash_version, info_length, indirect_levels, unused_flags
DX_ROOT_INFO = struct.Struct("<IBBBB")
DX_COUNT_LIMIT = struct.Struct("<HH")  # overlays the first dx_entry's hash
DX_ENTRY = struct.Struct("<II")  # hash, block


def seal_dx_node(block: bytearray, entries_offset: int, limit: int, inode_seed: int) -> None:
    """Write the dx_tail checksum after `limit` entries.

    The checksum covers the block up to the used entries, then the tail's
    reserved word (the checksum itself counts as zero).
    """
    count = struct.unpack_from("<H", block, entries_offset + 2)[0]
    used = entries_offset + count * DX_ENTRY_SIZE
    tail = entries_offset + limit * DX_ENTRY_SIZE
    crc = crc32c_raw(inode_seed, block[:used])
    crc = crc32c_raw(crc, block[tail : tail + 4])
    crc = crc32c_raw(crc, b"\0\0\0\0")
    struct.pack_into("<I", block, tail + 4, crc)


# dx_hash_half_md4(name, seed) -> (major, minor): the htree hash of a name, half-MD4 with
# name bytes unsigned (fs/ext4/hash.c); `seed` is s_hash_seed as four little-endian words,
# all zero meaning MD4's initial values. C (_kernelhash.c): one call per directory entry.
dx_hash_half_md4 = _kernelhash.half_md4

_M32 = 0xFFFFFFFF  # xattr hashes are 32-bit


# --- Extended attributes ------------------------------------------------------------------------

# ext4_xattr_entry: e_name_len, e_name_index, e_value_offs, e_value_inum, e_value_size, e_hash
XATTR_ENTRY = struct.Struct("<BBHIII")
# ext4_xattr_header: h_magic, h_refcount, h_blocks, h_hash, h_checksum, h_reserved[3]
XATTR_BLOCK_HEADER = struct.Struct("<IIIII12s")


@dataclass(frozen=True)
class XattrEntry:
    """One attribute: its prefix index, the name after the prefix, the value."""

    index: int
    name: bytes
    value: bytes

    @property
    def entry_size(self) -> int:
        return (XATTR_ENTRY_HEADER + len(self.name) + XATTR_PAD - 1) & ~(XATTR_PAD - 1)

    @property
    def value_size(self) -> int:
        return (len(self.value) + XATTR_PAD - 1) & ~(XATTR_PAD - 1)

    def sort_key(self) -> tuple[int, int, bytes]:
        # The kernel keeps block entries sorted this way and searches accordingly.
        return (self.index, len(self.name), self.name)

    def hash(self) -> int:
        """ext4_xattr_hash_entry over the name bytes then the padded value words."""
        h = 0
        for ch in self.name:
            h = ((h << 5) ^ (h >> 27) ^ ch) & _M32
        padded = self.value + b"\0" * (self.value_size - len(self.value))
        for (word,) in struct.iter_unpack("<I", padded):
            h = ((h << 16) ^ (h >> 16) ^ word) & _M32
        return h


def pack_xattrs(
    entries: list[XattrEntry], area: int, first_entry: int, value_base: int
) -> bytearray:
    """Entries from `first_entry` growing up, values from the end of `area` growing down.

    Value offsets count from `value_base`: in an inode the first entry (after
    the magic), in a block the start of the block.
    """
    out = bytearray(area)
    pos = first_entry
    value_end = area
    for e in entries:
        value_end -= e.value_size
        out[value_end : value_end + len(e.value)] = e.value
        offs = value_end - value_base
        XATTR_ENTRY.pack_into(out, pos, len(e.name), e.index, offs, 0, len(e.value), e.hash())
        out[pos + XATTR_ENTRY_HEADER : pos + XATTR_ENTRY_HEADER + len(e.name)] = e.name
        pos += e.entry_size
    return out


def xattrs_space(entries: list[XattrEntry]) -> int:
    """Bytes entries and values take, plus the 4-byte end-of-entries marker."""
    return sum(e.entry_size + e.value_size for e in entries) + 4


XATTR_IBODY_SPACE = INODE_SIZE - XATTR_IBODY_OFFSET  # 96 bytes, including the magic


def xattr_ibody(entries: list[XattrEntry]) -> bytes:
    """The in-inode xattr area: magic, entries, values (caller checks it fits)."""
    out = pack_xattrs(entries, XATTR_IBODY_SPACE, 4, 4)
    struct.pack_into("<I", out, 0, XATTR_MAGIC)
    return bytes(out)


def xattr_block_hash(entries: list[XattrEntry]) -> int:
    """ext4_xattr_rehash: the block hash combines the entry hashes."""
    h = 0
    for e in entries:
        h = ((h << 16) ^ (h >> 16) ^ e.hash()) & _M32
    return h


def xattr_block_body(entries: list[XattrEntry], refcount: int) -> bytearray:
    """An xattr block without its checksum (which depends on the block number)."""
    out = pack_xattrs(entries, BLOCK_SIZE, XATTR_BLOCK_HEADER_SIZE, 0)
    XATTR_BLOCK_HEADER.pack_into(
        out, 0, XATTR_MAGIC, refcount, 1, xattr_block_hash(entries), 0, b""
    )
    return out


def seal_xattr_block(block: bytearray, block_nr: int, fs_seed: int) -> None:
    """h_checksum: crc32c over the block number (le64) then the block."""
    struct.pack_into("<I", block, 16, 0)
    crc = crc32c_raw(crc32c_raw(fs_seed, struct.pack("<Q", block_nr)), block)
    struct.pack_into("<I", block, 16, crc)


# --- Journal superblock -------------------------------------------------------------------------

JOURNAL_SUPERBLOCK = Layout(
    ">",
    (
        ("h_magic", "I"),
        ("h_blocktype", "I"),
        ("h_sequence", "I"),
        ("s_blocksize", "I"),
        ("s_maxlen", "I"),
        ("s_first", "I"),
        ("s_sequence", "I"),
        ("s_start", "I"),
        ("s_errno", "i"),
        ("s_feature_compat", "I"),
        ("s_feature_incompat", "I"),
        ("s_feature_ro_compat", "I"),
        ("s_uuid", "16s"),
        ("s_nr_users", "I"),
        ("s_dynsuper", "I"),
        ("s_max_transaction", "I"),
        ("s_max_trans_data", "I"),
    ),
    BLOCK_SIZE,
)


@dataclass(frozen=True)
class JournalSuperblock:
    """A clean, empty jbd2 journal (v2 superblock, no checksum features)."""

    blocks: int
    uuid: bytes

    def pack(self) -> bytearray:
        return JOURNAL_SUPERBLOCK.pack(
            h_magic=JBD2_MAGIC,
            h_blocktype=JBD2_SUPERBLOCK_V2,
            s_blocksize=BLOCK_SIZE,
            s_maxlen=self.blocks,
            s_first=1,
            s_sequence=1,
            s_uuid=self.uuid,
            s_nr_users=1,
        )
