"""Lay a `Tree` out as an EROFS image (the layout Linux 6.1 mounts).

Image layout, in blocks of 4 KiB:

    block 0        superblock at 1024 (+ lz4 config when anything is compressed)
    data area      regular file data, then directory blocks
    meta area      inodes (meta_blkaddr; nid = byte offset / 32), each followed by
                   its xattrs and either its inline tail or its compression indexes
    xattr area     shared xattrs (xattr_blkaddr), when any value is shared

Data comes first because only after compressing a file do we know whether it
stays compressed (its inode then carries an index array instead of an inline
tail), and inode sizes decide nids. So file data is written in one pass, in
tree order, straight to its final place; then directories (whose blocks hold
nids) and the inodes are laid out and written from memory. Memory holds only
metadata: inodes, dirents, compression indexes, a bounded window of chunks in
flight.

Inode order puts the children of a directory next to each other, then
descends into subdirectories (as mkfs.erofs does), so a `ls -l` touches few
metadata blocks. Inodes are packed first-fit into a window of open metadata
blocks; an inode with its xattrs and inline data never straddles a block
unless it is bigger than one (the kernel requires inline data not to cross a
block boundary).
"""

from __future__ import annotations

import collections
import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from vmimg.errors import WriterError
from vmimg.image.fsutil import pwrite_all
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import (
    SYMLINK_MODE,
    Content,
    Node,
    NodeType,
    Tree,
    without_cycle_collection,
)
from vmimg.rootfs.writers._kernelhash import crc32c
from vmimg.rootfs.writers.dirent import FILE_TYPES as _FILE_TYPE
from vmimg.rootfs.writers.erofs import format as fmt
from vmimg.rootfs.writers.erofs._erofsmeta import (
    collect,
    decide_versions,
    dir_blocks,
    first_fit,
    gather_tails,
    meta_sizes,
    pack_inodes,
    place_plain,
    plan_dirents,
    scatter,
    survey,
)
from vmimg.rootfs.writers.erofs.compress import (
    CHUNK_SIZE,
    MAX_PCLUSTER_BLOCKS,
    MIN_ZERO_LCLUSTERS,
    Compress,
    CompressedFile,
    blocks_for,
    make_compressor,
    zero_pcluster,
)
from vmimg.rootfs.writers.options import ErofsOptions as ErofsOptions  # also importable from here

BLOCK = fmt.BLOCK_SIZE
VOLUME_NAME_MAX = 15  # 16 bytes on disk, NUL-terminated
META_OPEN_BLOCKS = 32  # metadata blocks kept open for first-fit packing
# Inodes whose meta-area bytes are rendered together (_write_meta_area): a window of a few
# hundred KiB for small files; as many tails are read at once (ContentReader.read_many).
META_GROUP = 4096
HASH_READ = 1 << 20  # bytes of the written meta area read back at once to hash it
COMPRESS_WORKERS = max(1, min(4, os.cpu_count() or 1))  # lz4 releases the GIL
CHUNKS_IN_FLIGHT = 4 * COMPRESS_WORKERS
ZERO_CHUNK = 1 << 20
# A compressed file costs an 8-byte index per 4 KiB, holes included: past this size
# (64 MiB of indexes, held in memory until the meta area is written) a file is stored
# plain, where holes cost nothing. A sparse file can claim a terabyte.
MAX_COMPRESSED_FILE_SIZE = 32 << 30


_NO_LIST: list[Any] = []  # a file's names, targets, block_starts: shared, never changed


@dataclass(eq=False, slots=True, init=False)
class _Inode:
    """One inode being laid out: the node plus everything decided about it."""

    node: Node
    name: bytes  # the name of its first path (b"/" for the root) ...
    up: _Inode | None  # ... and the directory holding it: its path, for errors only
    ino: int
    nlink: int
    extended: bool
    xattr_ibody: bytes
    head_size: int  # inode plus xattr ibody, once the version is decided
    datalayout: int
    size: int
    i_u: int  # raw_blkaddr, compressed_blocks or rdev
    inline_len: int  # tail bytes stored right after the inode and its xattrs
    compressed: CompressedFile | None
    # directories only: the entry names in order, "." and ".." included; the index (in
    # the inode list) of the inode each names; the first entry of each directory block
    names: list[bytes]
    targets: list[int]
    block_starts: list[int]

    def __init__(self, node: Node, name: bytes, up: _Inode | None, ino: int) -> None:
        # Written out, not generated: one is made per entry, and a generated __init__
        # calls a factory for each list field.
        self.node, self.name, self.up, self.ino = node, name, up, ino
        self.nlink = 1
        self.extended = False
        self.xattr_ibody = b""
        self.head_size = 0
        self.datalayout = fmt.INODE_FLAT_PLAIN
        self.size = self.i_u = self.inline_len = 0
        self.compressed = None
        self.names = self.targets = self.block_starts = _NO_LIST

    @property
    def path(self) -> bytes:
        """The first path naming this inode, built on demand (never held: see _collect_inodes)."""
        names = []
        inode: _Inode | None = self
        while inode is not None and inode.up is not None:
            names.append(inode.name)
            inode = inode.up
        return b"/" + b"/".join(reversed(names))

    @property
    def meta_size(self) -> int:
        """Bytes this inode takes in the meta area."""
        if self.compressed is not None:
            return self.compressed.metadata_size(self.head_size)
        return self.head_size + self.inline_len

    def fits_inline(self, tail: int) -> bool:
        return tail > 0 and self.head_size + tail <= BLOCK


@without_cycle_collection
def write_erofs(tree: Tree, reader: ContentReader, out_fd: int, options: ErofsOptions) -> list[str]:
    """Write `tree` as an EROFS image to the fresh, empty file `out_fd`. Returns warnings
    (none so far; every writer has this shape)."""
    compress = make_compressor(options.compress, options.compress_level)
    volume_name = _volume_name(options.label)
    inodes, directories = _collect_inodes(tree)
    mtime_counts, file_types, with_xattrs = _survey(inodes)
    build_time_ns = _most_common_mtime(mtime_counts)
    shared_table = _assign_xattrs(inodes, with_xattrs)
    _plan_directories(directories)
    _decide_inode_versions(inodes, build_time_ns)

    data = _DataArea(out_fd, reader, first_block=1)
    _place_data(data, inodes, directories, compress)

    meta_blkaddr = data.next_block
    sizes, compressed = _meta_sizes(inodes)
    nids, meta_length = _assign_nids(sizes)
    xattr_blkaddr = meta_blkaddr + meta_length // BLOCK
    total_blocks = xattr_blkaddr + blocks_for(len(shared_table))
    if total_blocks > fmt.BLOCKS_MAX:
        raise WriterError("the tree needs an erofs image over 16 TiB (32-bit block numbers)")
    meta = _MetaArea(out_fd, meta_blkaddr * BLOCK, meta_length, nids, sizes)
    meta_digest = _write_meta_area(meta, inodes, directories, data, file_types)
    root_nid = nids[0]
    del nids, sizes, meta
    if shared_table:
        os.pwrite(out_fd, shared_table, xattr_blkaddr * BLOCK)

    digest = hashlib.sha256(b"vmimg-erofs\0" + options.seed)
    digest.update(meta_digest)
    digest.update(hashlib.sha256(shared_table).digest())
    sb = fmt.Superblock(
        root_nid=root_nid,
        inos=len(inodes),
        build_time=build_time_ns // 1_000_000_000,
        build_time_nsec=build_time_ns % 1_000_000_000,
        blocks=total_blocks,
        meta_blkaddr=meta_blkaddr,
        xattr_blkaddr=xattr_blkaddr if shared_table else 0,
        uuid=uuid.UUID(bytes=digest.digest()[:16], version=4).bytes,
        volume_name=volume_name,
        feature_compat=fmt.FEATURE_COMPAT_SB_CHKSUM | fmt.FEATURE_COMPAT_MTIME,
        feature_incompat=_COMPRESSION_FEATURES if compressed else 0,
        u1=1 << fmt.COMPRESSION_LZ4 if compressed else 0,  # available_compr_algs
    )
    os.pwrite(out_fd, _superblock_block(sb, compressed), 0)
    os.ftruncate(out_fd, total_blocks * BLOCK)
    return []


# big pclusters need the lz4 config (max_pclusterblks) that COMPR_CFGS places
# after the superblock; 0padding lets the kernel find where a stream starts
_COMPRESSION_FEATURES = (
    fmt.FEATURE_INCOMPAT_ZERO_PADDING
    | fmt.FEATURE_INCOMPAT_COMPR_CFGS
    | fmt.FEATURE_INCOMPAT_BIG_PCLUSTER
)


def _place_data(
    data: _DataArea, inodes: list[_Inode], directories: list[_Inode], compress: Compress | None
) -> None:
    """Write all file data, then reserve the directories' blocks."""
    if compress is None:
        data.place_all_plain(inodes)
    else:
        data.place_compressed([i for i in inodes if i.node.type in _DATA_TYPES], compress)
    for directory in directories:
        data.place_directory(directory)


def _slots(cls: type, *names: str) -> tuple[Any, ...]:
    """The slot descriptors of `cls` with these names: how the C loops read and write them."""
    return tuple(getattr(cls, name) for name in names)


_DATA_TYPES = frozenset((NodeType.FILE, NodeType.SYMLINK))  # what has data blocks
# place_plain's arguments after next_block: the block size; the slots it reads and writes
# (of _Inode, then Node's type); the types with data; the plain and inline layouts.
_PLAIN_ARGS = (
    BLOCK,
    _slots(_Inode, "node", "size", "head_size", "datalayout", "inline_len", "i_u"),
    _slots(Node, "type"),
    (NodeType.FILE, NodeType.SYMLINK),
    (fmt.INODE_FLAT_PLAIN, fmt.INODE_FLAT_INLINE),
)


@dataclass
class _MetaArea:
    """Where the meta area goes in the image, and where each inode goes in it."""

    fd: int
    at: int  # its offset in the image
    length: int
    nids: list[int]  # each inode's, in inode order
    sizes: list[int]  # the bytes each inode takes there (_Inode.meta_size)
    written: int = 0  # the area's bytes below this may hold earlier windows' inodes

    def window(self, start: int, end: int) -> tuple[int, bytearray]:
        """The blocks that inodes start..end-1 touch, as written so far: (offset, bytes).
        Only where earlier windows reached is read back (a few open blocks, mostly)."""
        slot = fmt.INODE_SLOT_SIZE
        nids = self.nids[start:end]
        low = min(nids) * slot // BLOCK * BLOCK
        # An upper bound of where the group's last byte is, not the exact end: the bytes
        # between are rewritten as they are (read back, or zeros). The exact one, a product
        # and a sum per inode, took 22 ms for 100,000 small files.
        high = min(self.length, max(nids) * slot + max(self.sizes[start:end]))
        window = bytearray(blocks_for(high - low) * BLOCK)
        if self.written > low:
            earlier = os.pread(self.fd, min(len(window), self.written - low), self.at + low)
            window[: len(earlier)] = earlier
        self.written = max(self.written, low + len(window))
        return low, window


def _write_meta_area(
    meta: _MetaArea,
    inodes: list[_Inode],
    directories: list[_Inode],
    data: _DataArea,
    file_types: bytes,
) -> bytes:
    """Render every inode into the meta area, and after each its inline tail or compression
    indexes (writing the directory blocks, which need the nids, on the way); return the
    area's sha256 digest. `file_types`: each inode's dirent file type (_survey).

    The area is rendered META_GROUP inodes at a time into a window of the blocks they
    touch, read back from the image first: first-fit leaves a few blocks open for later
    inodes, so a block may hold several groups' inodes. Rendering the whole area in memory
    made it part of the peak (11.5 MiB for 100,000 small files; 46 MiB for 400,000)."""
    os.ftruncate(meta.fd, meta.at + meta.length)  # the area reads as zeros until written
    slot = fmt.INODE_SLOT_SIZE
    pending = iter(directories)  # in inode order, as the groups go
    directory = next(pending, None)
    for start in range(0, len(inodes), META_GROUP):
        end = start + META_GROUP
        low, window = meta.window(start, end)
        group_nids = meta.nids[start:end]
        _write_inodes(window, inodes[start:end], group_nids, low)
        while directory is not None and directory.ino <= end:  # ino: its index + 1
            tail = data.write_directory(directory, meta.nids, file_types)
            if tail:
                place = meta.nids[directory.ino - 1] * slot + directory.head_size - low
                window[place : place + len(tail)] = tail
            directory = next(pending, None)
        _write_tails(window, inodes[start:end], group_nids, data.reader, low)
        pwrite_all(meta.fd, window, meta.at + low)
    return _digest_of_range(meta.fd, meta.at, meta.length)


def _digest_of_range(fd: int, at: int, length: int) -> bytes:
    """sha256 of `length` bytes at `at` of the file (just written: read from the page cache)."""
    digest = hashlib.sha256()
    end = at + length
    while at < end:
        chunk = os.pread(fd, min(HASH_READ, end - at), at)
        if not chunk:
            raise WriterError("the image's meta area ends early")
        digest.update(chunk)
        at += len(chunk)
    return digest.digest()


# --- inodes -------------------------------------------------------------------


def _collect_inodes(tree: Tree) -> tuple[list[_Inode], list[_Inode]]:
    """One _Inode per distinct node: the root, then each directory's children
    together, then the subdirectories in name order, depth first; and the directories
    among them, in the same order. Link counts are counted on the way: names for a file;
    ".", ".." and each subdirectory's ".." for a directory. The walk is C's
    (_erofsmeta.collect; its Python twin is in tests/erofsmeta_ref.py): in Python it was a
    third of the writer's time for 100,000 small files."""
    root = _Inode(tree.root, b"/", None, ino=1)
    defaults = tuple(getattr(root, name) for name in _COLLECT_FIELDS[_COLLECT_DEFAULTS_FROM:])
    fields = tuple(getattr(_Inode, name) for name in _COLLECT_FIELDS)
    inodes, directories = collect(
        root, fields, defaults, NodeType.DIR, fmt.NAME_LEN_MAX, _check_name
    )
    return inodes, directories


# _Inode's slots as collect() takes them: those it fills first, then the ones a new
# inode takes from a fresh _Inode (names and targets are filled for directories only).
_COLLECT_FILLED = ("node", "name", "up", "ino", "nlink", "names", "targets")
_COLLECT_FIELDS = _COLLECT_FILLED + tuple(f for f in _Inode.__slots__ if f not in _COLLECT_FILLED)
_COLLECT_DEFAULTS_FROM = _COLLECT_FIELDS.index("names")


def _check_name(name: bytes, parent: _Inode) -> None:
    if not 0 < len(name) <= fmt.NAME_LEN_MAX or b"/" in name or b"\0" in name:
        raise WriterError(f"erofs cannot store the name {name!r} in {os.fsdecode(parent.path)!r}")


def _survey(inodes: list[_Inode]) -> tuple[dict[int, int], bytes, list[int]]:
    """One pass over every inode for what the writer needs of all of them: how many have
    each mtime (those before 1970 not counted; _most_common_mtime picks the build time),
    each one's dirent file type, and the places of those whose xattrs _assign_xattrs must
    look at (all but those with an empty dict). The loop is C's (_erofsmeta.survey; its
    Python twin is in tests/erofsmeta_ref.py): it stops at any inode it leaves to
    _survey_one (an mtime that is no plain int, anything unusual), to go on after it. The
    three Python passes it replaces were a sixth of the writer's time for 100,000 small
    files (55 ms; 4 ms now).

    A node type with no file type (none in a Tree) raises KeyError here, before any data is
    written, where the meta area's writing raised it before."""
    counts: dict[int, int] = {}  # as collections.Counter counts: the first key given stays
    file_types = bytearray(len(inodes))
    with_xattrs: list[int] = []
    at, count = 0, len(inodes)
    while (at := survey(inodes, at, _SURVEY_SHAPES, counts, file_types, with_xattrs)) < count:
        _survey_one(inodes[at], at, counts, file_types, with_xattrs)
        at += 1
    return counts, bytes(file_types), with_xattrs


def _survey_one(
    inode: _Inode, at: int, counts: dict[int, int], file_types: bytearray, with_xattrs: list[int]
) -> None:
    """One inode as _survey surveys it: what survey leaves to Python. Its xattrs are left to
    _assign_xattrs to look at, whatever they are (it raises any error they bring, in order)."""
    node = inode.node
    mtime_ns = node.mtime_ns
    if mtime_ns >= 0:
        counts[mtime_ns] = counts.get(mtime_ns, 0) + 1
    file_types[at] = _FILE_TYPE[node.type]
    with_xattrs.append(at)


# survey's shapes: the slots it reads (of _Inode, then Node), each type's dirent file type.
_SURVEY_SHAPES = (
    _slots(_Inode, "node"),
    _slots(Node, "type", "mtime_ns", "xattrs"),
    tuple(_FILE_TYPE.items()),
)


def _most_common_mtime(counts: dict[int, int]) -> int:
    """The build time: compact inodes carry no mtime and read this one instead,
    so the most common mtime (of `counts`, _survey's) lets the most inodes stay compact."""
    if not counts:
        return 0  # the superblock's build time is unsigned
    best = max(counts.values())
    return min(t for t, n in counts.items() if n == best)


def _decide_inode_versions(inodes: list[_Inode], build_time_ns: int) -> None:
    """Size, compact or extended, and head size of every inode; device numbers.

    A directory's size is already planned (_plan_dirents). The loop is C's
    (_erofsmeta.decide_versions; its Python twin is in tests/erofsmeta_ref.py): it hands
    each inode it does not decide (a device, an owner out of range, anything unusual) to
    _decide_version, and goes on after it. In Python it was a fifth of the writer's time
    for 100,000 small files."""
    at, count = 0, len(inodes)
    while (at := decide_versions(inodes, at, build_time_ns, *_VERSION_ARGS)) < count:
        _decide_version(inodes[at], build_time_ns)
        at += 1


def _decide_version(inode: _Inode, build_time_ns: int) -> None:
    """One inode's size, compact or extended, head size; its device number."""
    node = inode.node
    node_type = node.type
    if node_type is NodeType.FILE:  # Node.size, without the call
        assert node.content is not None
        inode.size = node.content.size
    elif node_type is not NodeType.DIR:
        inode.size = node.size
        if node_type in _DEVICE_TYPES:
            _place_device(inode)
    uid, gid = node.uid, node.gid
    if not (0 <= uid <= fmt.EXTENDED_ID_MAX and 0 <= gid <= fmt.EXTENDED_ID_MAX):
        raise WriterError(f"owner {uid}:{gid} of {os.fsdecode(inode.path)!r} too large")
    inode.extended = is_extended = (
        uid > fmt.COMPACT_ID_MAX
        or gid > fmt.COMPACT_ID_MAX
        or inode.nlink > fmt.COMPACT_NLINK_MAX
        or inode.size > fmt.COMPACT_SIZE_MAX
        or node.mtime_ns != build_time_ns
    )
    inode_size = fmt.EXTENDED_INODE_SIZE if is_extended else fmt.COMPACT_INODE_SIZE
    inode.head_size = inode_size + len(inode.xattr_ibody)


_DEVICE_TYPES = frozenset((NodeType.CHAR, NodeType.BLOCK))
_SIZELESS_TYPES = tuple(
    t for t in NodeType if t not in {*_DATA_TYPES, *_DEVICE_TYPES, NodeType.DIR}
)


def _place_device(inode: _Inode) -> None:
    """A device's number goes where a file's block address would."""
    major, minor = inode.node.rdev
    if not (0 <= major <= fmt.DEV_MAJOR_MAX and 0 <= minor <= fmt.DEV_MINOR_MAX):
        raise WriterError(f"device number {major}:{minor} of {os.fsdecode(inode.path)!r}")
    inode.i_u = fmt.encode_dev(major, minor)


# decide_versions's arguments after build_time_ns: the slots it reads and writes (of _Inode,
# Node, Content); the types it sizes itself (file, directory, symlink, then those of size
# 0 that need nothing more: not devices); the limits of a compact inode.
_VERSION_ARGS = (
    _slots(_Inode, "node", "nlink", "xattr_ibody", "size", "extended", "head_size"),
    _slots(Node, "type", "uid", "gid", "mtime_ns", "content", "target"),
    _slots(Content, "size"),
    (NodeType.FILE, NodeType.DIR, NodeType.SYMLINK, *_SIZELESS_TYPES),
    (
        fmt.EXTENDED_ID_MAX,
        fmt.COMPACT_ID_MAX,
        fmt.COMPACT_NLINK_MAX,
        fmt.COMPACT_SIZE_MAX,
        fmt.COMPACT_INODE_SIZE,
        fmt.EXTENDED_INODE_SIZE,
    ),
)


# --- xattrs -------------------------------------------------------------------

_XattrKey = tuple[int, bytes, bytes]  # (name index, name suffix, value)


def _xattr_key(inode: _Inode, name: bytes, value: bytes) -> _XattrKey:
    def shown() -> str:
        return f"xattr {name!r} of {os.fsdecode(inode.path)!r}"

    if len(value) > fmt.XATTR_VALUE_SIZE_MAX:
        raise WriterError(f"{shown()}: value larger than {fmt.XATTR_VALUE_SIZE_MAX} bytes")
    index = fmt.XATTR_EXACT_NAMES.get(name)
    if index is not None:
        return (index, b"", value)
    for prefix, index in fmt.XATTR_PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix) :]
            if len(suffix) > fmt.XATTR_NAME_LEN_MAX:
                raise WriterError(f"{shown()}: name too long")
            return (index, suffix, value)
    raise WriterError(f"{shown()}: erofs stores only user., trusted., security. and ACL xattrs")


def _assign_xattrs(inodes: list[_Inode], with_xattrs: list[int]) -> bytes:
    """Fill each inode's xattr ibody; return the shared xattr table. Only the inodes at
    `with_xattrs` (_survey's, in order) can have any: the others' are empty dicts.

    An xattr (name and value) that two or more inodes carry is stored once in
    the shared area and referenced by its id (offset / 4 from xattr_blkaddr).
    """
    candidates = [inodes[at] for at in with_xattrs]
    keys = {
        id(i): [_xattr_key(i, n, v) for n, v in i.node.xattrs.items()]
        for i in candidates
        if i.node.xattrs
    }
    usage = collections.Counter(k for ks in keys.values() for k in ks)
    table = bytearray()
    shared_id: dict[_XattrKey, int] = {}
    for key in sorted(k for k, n in usage.items() if n > 1):
        shared_id[key] = len(table) // fmt.XATTR_ALIGN
        table += fmt.XattrEntry(*key).pack()
    for inode in candidates:
        if id(inode) not in keys:
            continue
        own = sorted(keys[id(inode)])
        if not own:
            continue
        ids = [shared_id[k] for k in own if k in shared_id][: fmt.XATTR_SHARED_COUNT_MAX]
        taken = set(ids)
        body = fmt.XattrIbodyHeader(tuple(ids)).pack()
        body += b"".join(
            fmt.XattrEntry(*k).pack() for k in own if shared_id.get(k, -1) not in taken
        )
        if fmt.xattr_icount(len(body)) > fmt.XATTR_ICOUNT_MAX:
            raise WriterError(f"xattrs of {os.fsdecode(inode.path)!r} too large for erofs")
        inode.xattr_ibody = body
    return bytes(table)


# --- directories ----------------------------------------------------------------


def _plan_directories(directories: list[_Inode]) -> None:
    """_plan_dirents for every directory. The loop is C's (_erofsmeta.plan_dirents; its
    Python twin is in tests/erofsmeta_ref.py): it stops at any directory it leaves to
    _plan_dirents (a name that is no plain bytes, anything unusual), to go on after it. The
    Python loop took 16 ms for the 10,000 directories of 100,000 small files; this takes 3."""
    at, count = 0, len(directories)
    while (at := plan_dirents(directories, at, _PLAN_SLOTS, fmt.DIRENT_SIZE, BLOCK)) < count:
        _plan_dirents(directories[at])
        at += 1


def _plan_dirents(inode: _Inode) -> None:
    """Split the sorted entries into blocks (dirents first, then their names) and so
    size the directory: full blocks, then what the last one uses."""
    names = inode.names
    dirent = fmt.DIRENT_SIZE
    used = dirent * len(names) + sum(map(len, names))
    starts = [0]
    if used > BLOCK:  # most directories fit in one block: no walk over their names
        used = 0
        for i, name in enumerate(names):
            need = dirent + len(name)
            if used + need > BLOCK:
                starts.append(i)
                used = 0
            used += need
    inode.block_starts = starts
    inode.size = (len(starts) - 1) * BLOCK + used


_PLAN_SLOTS = _slots(_Inode, "names", "block_starts", "size")  # what plan_dirents reads, sets


# --- the data area --------------------------------------------------------------


@dataclass
class _Chunk:
    """One compression job of a file, in flight."""

    inode: _Inode
    first: bool
    last: bool
    raw: bytes
    result: Future[bytes] | None
    zero_lclusters: int = 0  # a chunk of zeros of this many lclusters: nothing to compress


class _RunCursor:
    """A file's data runs, walked once front to back as windows move along the file:
    which stored bytes fall in each window, without rescanning every run each time."""

    def __init__(self, content: Content) -> None:
        self.content = content
        self.runs = content.data_extents()
        self.index = 0  # the first run that does not end before the current window
        self.stored = 0  # stored offset of runs[index]

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(stored offset, logical offset, length) of the data in [start, end)."""
        runs = self.runs
        while self.index < len(runs) and runs[self.index].offset + runs[self.index].length <= start:
            self.stored += runs[self.index].length
            self.index += 1
        out = []
        stored = self.stored
        for run in runs[self.index :]:
            if run.offset >= end:
                break
            lo, hi = max(start, run.offset), min(end, run.offset + run.length)
            if lo < hi:
                out.append((stored + lo - run.offset, lo, hi - lo))
            stored += run.length
        return out

    def read(self, reader: ContentReader, start: int, end: int) -> bytes | None:
        """The bytes of [start, end), or None when it lies wholly in holes (not read)."""
        pieces = self.pieces(start, end)
        if not pieces:
            return None
        if not self.content.is_sparse:
            return reader.read(self.content, start, end - start)
        out = bytearray(end - start)
        for stored, logical, n in pieces:
            out[logical - start : logical - start + n] = reader.read(self.content, stored, n)
        return bytes(out)


class _DataArea:
    """File and directory data, written at a cursor that only moves forward
    (except to take back an attempt at compressing a file that did not shrink).

    Invariant: every byte at or after the cursor is zero, as in a fresh file.
    """

    def __init__(self, out_fd: int, reader: ContentReader, first_block: int) -> None:
        self.out_fd = out_fd
        self.reader = reader
        self.next_block = first_block
        self._current: CompressedFile | None = None

    # plain data

    def place_plain(self, inode: _Inode) -> int:
        """Store a file or symlink uncompressed: full blocks here, the tail
        inline after the inode when it fits there, else in one more block.
        Return the number of bytes written at the data's start."""
        size = inode.size
        full, tail = divmod(size, BLOCK)
        inline = 0 < tail <= BLOCK - inode.head_size  # fits_inline, without a call
        nblocks = full if inline or not tail else full + 1
        inode.datalayout = fmt.INODE_FLAT_INLINE if inline else fmt.INODE_FLAT_PLAIN
        inode.inline_len = tail if inline else 0
        inode.i_u = self.next_block if nblocks else 0
        written = size if nblocks > full else full * BLOCK
        if written:
            self._copy(inode.node, 0, written, self.next_block * BLOCK)
        self.next_block += nblocks
        return written

    def place_all_plain(self, inodes: list[_Inode]) -> None:
        """place_plain for each file and symlink among `inodes`, in order. The loop is C's
        (_erofsmeta.place_plain; its Python twin is in tests/erofsmeta_ref.py): it places the
        inodes and lists the copies to make, in order, and stops at any it leaves to
        place_plain (anything unusual), to go on after it."""
        at, count = 0, len(inodes)
        while True:
            at, self.next_block, copies = place_plain(inodes, at, self.next_block, *_PLAIN_ARGS)
            for index, offset, length in copies:
                self._copy(inodes[index].node, 0, length, offset)
            if at == count:
                return
            if inodes[at].node.type in _DATA_TYPES:
                self.place_plain(inodes[at])
            at += 1

    def _copy(self, node: Node, start: int, length: int, out_offset: int) -> None:
        if node.type is NodeType.SYMLINK:
            assert node.target is not None
            os.pwrite(self.out_fd, node.target[start : start + length], out_offset)
            return
        assert node.content is not None
        copy_logical(self.reader, node.content, start, length, self.out_fd, out_offset)

    # compressed data

    def place_compressed(self, files: list[_Inode], compress: Compress) -> None:
        """Compress files in 64 KiB chunks on a few threads, in order; write
        each pcluster as its result comes back; keep the result only if the
        file shrinks. Chunks of zeros share one pcluster per length, written last."""
        window: collections.deque[_Chunk] = collections.deque()
        with ThreadPoolExecutor(max_workers=COMPRESS_WORKERS) as pool:
            for chunk in self._chunks(files, compress, pool):
                window.append(chunk)
                if len(window) >= CHUNKS_IN_FLIGHT:
                    self._finish(window.popleft())
            while window:
                self._finish(window.popleft())
        self._place_zero_pclusters(files, compress)

    def _place_zero_pclusters(self, files: list[_Inode], compress: Compress) -> None:
        """Write the shared zero pclusters the compressed files use; point them there."""
        users = [
            i.compressed for i in files if i.compressed is not None and i.compressed.zero_heads
        ]
        lengths = sorted({nlc for c in users for _, nlc in c.zero_heads})
        blkaddr_of = {}
        for nlc in lengths:
            blkaddr_of[nlc] = self.next_block
            os.pwrite(self.out_fd, zero_pcluster(compress, nlc), self.next_block * BLOCK)
            self.next_block += 1
        for c in users:
            c.patch_zero_heads(blkaddr_of)

    def _chunks(
        self, files: list[_Inode], compress: Compress, pool: ThreadPoolExecutor
    ) -> Iterator[_Chunk]:
        for inode in files:
            node = inode.node
            # a file of one block or less cannot beat its inline tail
            if node.type is not NodeType.FILE or not BLOCK < inode.size <= MAX_COMPRESSED_FILE_SIZE:
                yield _Chunk(inode, True, True, b"", None)
                continue
            assert node.content is not None
            runs = _RunCursor(node.content)
            for start in range(0, inode.size, CHUNK_SIZE):
                length = min(CHUNK_SIZE, inode.size - start)
                first, last = start == 0, start + length == inode.size
                # a zero extent must decode to exactly its length: whole lclusters only
                nlc = length // BLOCK if length % BLOCK == 0 else 0
                raw = runs.read(self.reader, start, start + length)  # None: all holes
                if nlc >= MIN_ZERO_LCLUSTERS and (raw is None or raw.count(0) == length):
                    yield _Chunk(inode, first, last, b"", None, zero_lclusters=nlc)
                    continue
                raw = raw if raw is not None else bytes(length)
                yield _Chunk(inode, first, last, raw, pool.submit(compress, raw))

    def _finish(self, chunk: _Chunk) -> None:
        if chunk.result is None and not chunk.zero_lclusters:
            self.place_plain(chunk.inode)
            return
        if chunk.first:
            self._current = CompressedFile(chunk.inode.size, self.next_block)
        current = self._current
        assert current is not None
        if chunk.zero_lclusters:
            current.add_zero_chunk(chunk.zero_lclusters)
        else:
            assert chunk.result is not None
            offset = (current.start_block + current.blocks) * BLOCK
            data = current.add_chunk(len(chunk.raw), chunk.result.result(), chunk.raw)
            os.pwrite(self.out_fd, data, offset)
        if chunk.last:
            self._decide(chunk.inode, current)
            self._current = None

    def _decide(self, inode: _Inode, current: CompressedFile) -> None:
        full, tail = divmod(inode.size, BLOCK)
        plain_tail = tail if inode.fits_inline(tail) else blocks_for(tail) * BLOCK
        plain_cost = full * BLOCK + inode.head_size + plain_tail
        compressed_cost = current.blocks * BLOCK + current.metadata_size(inode.head_size)
        if compressed_cost < plain_cost:
            inode.compressed = current
            inode.datalayout = fmt.INODE_COMPRESSED_FULL
            inode.i_u = current.blocks
            self.next_block = current.start_block + current.blocks
            return
        # Take the attempt back: rewrite the file plain from the same place,
        # and zero what the plain copy does not cover (holes, the tail block).
        written_end = (current.start_block + current.blocks) * BLOCK
        self.next_block = current.start_block
        assert inode.node.content is not None
        if inode.node.content.is_sparse:
            self._zero(current.start_block * BLOCK, written_end)
        written = self.place_plain(inode)
        self._zero(current.start_block * BLOCK + written, written_end)

    def _zero(self, start: int, end: int) -> None:
        zeros = bytes(min(ZERO_CHUNK, max(0, end - start)))
        while start < end:
            start += os.pwrite(self.out_fd, zeros[: end - start], start)

    # directories

    def place_directory(self, inode: _Inode) -> None:
        """Reserve the directory's blocks; they are filled once nids are known."""
        nblocks = len(inode.block_starts)
        tail = inode.size - (nblocks - 1) * BLOCK
        inline = inode.fits_inline(tail)
        data_blocks = nblocks - 1 if inline else nblocks
        inode.datalayout = fmt.INODE_FLAT_INLINE if inline else fmt.INODE_FLAT_PLAIN
        inode.inline_len = tail if inline else 0
        inode.i_u = self.next_block if data_blocks else 0
        self.next_block += data_blocks

    def write_directory(self, inode: _Inode, nids: list[int], file_types: bytes) -> bytes:
        """Write the directory's data blocks; return its inline tail (or b"").
        `file_types`: each inode's dirent file type."""
        raw = dir_blocks(inode.names, inode.targets, inode.block_starts, nids, file_types, BLOCK)
        if not inode.inline_len:
            os.pwrite(self.out_fd, raw + bytes(-len(raw) % BLOCK), inode.i_u * BLOCK)
            return b""
        data_end = (len(inode.block_starts) - 1) * BLOCK
        if data_end:
            os.pwrite(self.out_fd, raw[:data_end], inode.i_u * BLOCK)
        return raw[data_end:]


# --- the meta area --------------------------------------------------------------


def _meta_sizes(inodes: list[_Inode]) -> tuple[list[int], bool]:
    """Each inode's meta_size, and whether any inode is compressed. The sizes of the
    uncompressed ones are C's (_erofsmeta.meta_sizes; its Python twin is in
    tests/erofsmeta_ref.py); it leaves the compressed ones (their indexes) and anything
    unusual for Python to fill. The two Python passes took 22 ms for 100,000 small files;
    this takes 3."""
    sizes, left = meta_sizes(inodes, _META_SIZE_SLOTS)
    for at in left:
        sizes[at] = inodes[at].meta_size
    return cast(list[int], sizes), any(inodes[at].compressed is not None for at in left)


_META_SIZE_SLOTS = _slots(_Inode, "head_size", "inline_len", "compressed")  # what meta_sizes reads


def _assign_nids(meta_sizes: list[int]) -> tuple[list[int], int]:
    """Give every inode its place in the meta area, from the bytes each takes there
    (inode, xattrs, inline data or indexes); return the nids and the area's length.

    First-fit over a window of open blocks: an inode (with its xattrs and
    inline data) goes into the first open block with room for all of it, or
    starts a new block. Slot 0 stays unused so that no inode has nid 0 (an
    inode number 0 means "no inode" to much of userspace). The loop is C's
    (_erofsmeta.first_fit): a Python one was a quarter of the writer's time.
    """
    nids, end = first_fit(meta_sizes, BLOCK, fmt.INODE_SLOT_SIZE, META_OPEN_BLOCKS)
    if nids[0] > fmt.ROOT_NID_MAX:
        raise WriterError("the root directory's inode does not fit in a 16-bit nid")
    return nids, end


def _write_inodes(meta: bytearray, inodes: list[_Inode], nids: list[int], base: int) -> None:
    """Pack every inode and its xattr ibody at its nid, and a compressed file's indexes;
    `meta` holds the area from byte `base` on. The loop is C's (_erofsmeta.pack_inodes; its
    Python twin is in tests/erofsmeta_ref.py): it packs the common inodes and stops at any
    it leaves to _pack_inode (a compressed file, a value out of the common range), in
    order. In Python it was a seventh of the writer's time for 100,000 small files."""
    i, n = 0, len(inodes)
    while (i := pack_inodes(meta, inodes, nids, base, i, _META_SHAPES)) < n:
        _pack_inode(meta, inodes[i], nids[i], base)
        i += 1


def _pack_inode(meta: bytearray, inode: _Inode, nid: int, base: int) -> None:
    """One inode as _write_inodes packs it: what pack_inodes leaves to Python."""
    node = inode.node
    offset = nid * fmt.INODE_SLOT_SIZE - base
    xattrs = inode.xattr_ibody
    icount = fmt.xattr_icount(len(xattrs)) if xattrs else 0
    # Node.st_mode without its two calls per inode
    if node.type is NodeType.SYMLINK:
        mode = node.st_mode
    else:
        mode = _TYPE_BITS[node.type] | (node.mode & _PERMISSION_BITS)
    if inode.extended:
        mtime_s, mtime_ns = divmod(node.mtime_ns, 1_000_000_000)
        fmt.pack_extended_into(
            meta,
            offset,
            (inode.datalayout, icount, mode, inode.nlink, inode.size, inode.i_u),
            (inode.ino, node.uid, node.gid, mtime_s, mtime_ns),
        )
    else:
        fmt.INODE_COMPACT.pack_into(
            meta,
            offset,
            _COMPACT_FORMAT[inode.datalayout],
            icount,
            mode,
            inode.nlink,
            inode.size,
            inode.i_u,
            inode.ino,
            node.uid,
            node.gid,
        )
    if xattrs:
        at = inode.head_size - len(xattrs) + offset
        meta[at : at + len(xattrs)] = xattrs
    if inode.compressed is not None:
        at = offset + inode.head_size
        body = inode.compressed.metadata(inode.head_size)
        meta[at : at + len(body)] = body


_DATALAYOUTS = (fmt.INODE_FLAT_PLAIN, fmt.INODE_FLAT_INLINE, fmt.INODE_COMPRESSED_FULL)
_TYPE_BITS = {t: t.st_ifmt for t in NodeType}
_PERMISSION_BITS = 0o7777  # what Node.st_mode keeps of Node.mode: rwx, setuid, setgid, sticky
_COMPACT_FORMAT = {d: fmt.i_format(fmt.INODE_LAYOUT_COMPACT, d) for d in _DATALAYOUTS}
# The slots pack_inodes and gather_tails read (by name, in _erofsmeta.c's order), the type
# bits of a mode and a symlink's whole st_mode (Node.st_mode's rule).
_META_SHAPES = (
    _slots(
        _Inode,
        *("node", "ino", "nlink", "extended", "xattr_ibody", "head_size", "datalayout"),
        *("size", "i_u", "inline_len", "compressed"),
    ),
    _slots(Node, "type", "mode", "uid", "gid", "mtime_ns", "target", "content"),
    _slots(Content, "extents"),
    tuple(_TYPE_BITS.items()),
    NodeType.FILE,
    NodeType.SYMLINK,
    _TYPE_BITS[NodeType.SYMLINK] | SYMLINK_MODE,
)


# Tails read and copied into the meta area at once: enough for one pread to cover a long
# run of neighbours in a layer, few enough that 100,000 small files do not hold every tail
# (and its range) in memory together (that was 17 MiB of the peak).
TAIL_BATCH = 4096


def _write_tails(
    meta: bytearray, inodes: list[_Inode], nids: list[int], reader: ContentReader, base: int
) -> None:
    """Each file's and symlink's inline tail, right after its inode and xattrs (`meta` holds
    the area from byte `base` on). Files'
    tails are read together (ContentReader.read_many): the small files of a layer lie
    close together in it, and one pread each was a fifth of the writer's time. They are
    copied into place a batch at a time by one call (_erofsmeta.scatter): a Python loop over
    them was another tenth. Where each goes and what to read is gathered by C
    (_erofsmeta.gather_tails, its Python twin in tests/erofsmeta_ref.py), which stops when
    a batch is full and at any inode it leaves to _gather_tail (a sparse file, anything
    unusual): that loop in Python was another fifth."""
    places: list[int] = []  # where each tail goes: those read from layers last
    pieces: list[bytes] = []
    read_places: list[int] = []
    ranges: list[tuple[Content, int, int]] = []
    gathered = (places, pieces, read_places, ranges)
    i, n = 0, len(inodes)
    while i < n:
        i = gather_tails(inodes, nids, base, i, TAIL_BATCH, _META_SHAPES, *gathered)
        if i < n and len(ranges) < TAIL_BATCH:  # inode i is left to Python
            _gather_tail(inodes[i], nids[i], base, reader, gathered)
            i += 1
        if len(ranges) >= TAIL_BATCH:
            _place_tails(meta, reader, places, pieces, read_places, ranges)
    _place_tails(meta, reader, places, pieces, read_places, ranges)


def _gather_tail(
    inode: _Inode,
    nid: int,
    base: int,
    reader: ContentReader,
    gathered: tuple[list[int], list[bytes], list[int], list[tuple[Content, int, int]]],
) -> None:
    """One inode as _write_tails gathers it: what gather_tails leaves to Python."""
    places, pieces, read_places, ranges = gathered
    inline = inode.inline_len
    if not inline:
        return
    node = inode.node
    at = nid * fmt.INODE_SLOT_SIZE + inode.head_size - base
    start = inode.size - inline
    if node.type is NodeType.FILE:
        content = node.content
        assert content is not None
        if content.extents is None:  # not sparse
            read_places.append(at)
            ranges.append((content, start, inline))
        else:
            places.append(at)
            pieces.append(read_logical(reader, content, start, inline))
    elif node.type is NodeType.SYMLINK:
        assert node.target is not None
        places.append(at)
        pieces.append(node.target[start:])


def _place_tails(
    meta: bytearray,
    reader: ContentReader,
    places: list[int],
    pieces: list[bytes],
    read_places: list[int],
    ranges: list[tuple[Content, int, int]],
) -> None:
    """Copy the tails gathered so far into `meta` (each has its own place: the order of
    batches changes no byte), and empty the lists for the next batch."""
    scatter(meta, places + read_places, pieces + reader.read_many(ranges))
    for gathered in (places, pieces, read_places, ranges):
        gathered.clear()


def _superblock_block(sb: fmt.Superblock, compressed: bool) -> bytes:
    """Block 0: the superblock (with its crc32c) and the lz4 configuration."""
    block = bytearray(BLOCK)
    tail = sb.pack()
    if compressed:
        tail += fmt.Lz4Config(fmt.LZ4_MAX_DISTANCE, MAX_PCLUSTER_BLOCKS).pack()
    block[fmt.SUPER_OFFSET : fmt.SUPER_OFFSET + len(tail)] = tail
    # the kernel's crc32c(~0, ...), no final inversion
    checksum = crc32c(0xFFFFFFFF, block[fmt.SUPER_OFFSET :])
    at = fmt.SUPER_OFFSET + fmt.SUPERBLOCK_CHECKSUM_OFFSET
    block[at : at + 4] = checksum.to_bytes(4, "little")
    return bytes(block)


def _volume_name(label: str) -> bytes:
    raw = label.encode()
    if len(raw) > VOLUME_NAME_MAX or b"\0" in raw:
        raise WriterError(f"erofs label {label!r} longer than {VOLUME_NAME_MAX} bytes")
    return raw.ljust(16, b"\0")


# --- reading logical file ranges ---------------------------------------------------


def _overlaps(content: Content, start: int, length: int) -> Iterable[tuple[int, int, int]]:
    """(stored offset, logical offset, length) of the data inside [start, start+length)."""
    stored = 0
    end = start + length
    for ext in content.data_extents():
        lo, hi = max(start, ext.offset), min(end, ext.offset + ext.length)
        if lo < hi:
            yield stored + lo - ext.offset, lo, hi - lo
        stored += ext.length


def read_logical(reader: ContentReader, content: Content, start: int, length: int) -> bytes:
    """The file's bytes [start, start+length), holes as zeros."""
    if not content.is_sparse:
        return reader.read(content, start, length)
    out = bytearray(length)
    for stored, logical, n in _overlaps(content, start, length):
        out[logical - start : logical - start + n] = reader.read(content, stored, n)
    return bytes(out)


def copy_logical(
    reader: ContentReader, content: Content, start: int, length: int, out_fd: int, out_offset: int
) -> None:
    """Copy the file's bytes [start, start+length) to `out_offset`, leaving holes
    unwritten (the output is zero there)."""
    if not content.is_sparse:
        reader.copy(content, start, length, out_fd, out_offset)
        return
    for stored, logical, n in _overlaps(content, start, length):
        reader.copy(content, stored, n, out_fd, out_offset + logical - start)
