"""Lay out a Tree as an ext4 image and write it, without root, loop devices or mke2fs.

The image is planned completely before anything is written:

1. `_plan_inodes` numbers the inodes (root 2, journal 8, lost+found 11, then
   the tree in walk order) and works out what blocks each one needs:
   directory blocks (built and checksummed in memory, they are metadata),
   file data ranges, extent tree blocks, xattr blocks.
2. `_geometry` sizes the file system: groups, inodes per group, metadata.
3. `_allocate` hands out blocks front to back: superblock, group
   descriptors, all bitmaps, all inode tables, journal, then each inode's
   blocks in inode order. Every used block is below `used_end`, so the
   bitmaps are "all ones up to N".
4. `write_ext4` writes each inode's blocks in inode order: large files by
   kernel-side copies, small files and directory blocks gathered into runs of
   neighbouring blocks (`_BlockRun`), the inode table a chunk at a time (each inode
   packed by the C extension `_ext4meta`), then the rest of the metadata. Blocks
   nobody writes are holes of the fresh file.

See docs/ext4.md for the resulting layout and its limits.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from vmimg.errors import WriterError
from vmimg.image.fsutil import pwrite_all
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import NS_PER_S, Content, Node, NodeType, Tree, without_cycle_collection
from vmimg.rootfs.writers.dirent import FILE_TYPES as _FILE_TYPE
from vmimg.rootfs.writers.dirent import FT_DIR
from vmimg.rootfs.writers.ext4 import _ext4meta
from vmimg.rootfs.writers.ext4 import format as fmt
from vmimg.rootfs.writers.gather import GatherWriter
from vmimg.rootfs.writers.options import DEFAULT_HEADROOM as DEFAULT_HEADROOM
from vmimg.rootfs.writers.options import Ext4Options as Ext4Options  # also importable from here
from vmimg.rootfs.writers.pathwarnings import PathWarnings

HEADROOM_BYTES_PER_INODE = 64 * 1024  # spare inodes: one per this many free bytes
LOST_FOUND_BLOCKS = 4  # pre-sized like mke2fs so e2fsck can use it without allocating
JOURNAL_DATA_FRACTION = 16  # journal ~ 1/16 of the data, within the limits below
JOURNAL_MAX_BLOCKS = 32768  # 128 MiB, one extent
MAX_UID = 0xFFFFFFFF
MAX_MAJOR = 0xFFF
MAX_MINOR = 0xFFFFF
MAX_INODES = 0xFFFFFFFF
SMALL_FILE_MAX = 256 * 1024  # files up to this size are written from memory, not copied
BLOCK_RUN_BYTES = 1 << 20  # small files' and directories' blocks read and put at once
ITABLE_CHUNK_INODES = 4096  # inode table held in memory at once: 1 MiB
# Inode times ext4 stores with 256-byte inodes: signed 32-bit seconds plus two epoch
# bits, 1901-12-13 to 2446-05-10 (the kernel's EXT4_TIMESTAMP_MIN / EXTRA_TIMESTAMP_MAX).
MIN_TIME_NS = -(1 << 31) * NS_PER_S
MAX_TIME_NS = ((1 << 34) - 1 - (1 << 31)) * NS_PER_S + NS_PER_S - 1


def _zeros(typecode: str, count: int) -> array[int]:
    return array(typecode, [0]) * count


# Says which inode an error is about: called only when one is raised, as the path is
# looked up then (_Inodes.path), not kept for every inode.
_Where = Callable[[], bytes]


class _Inodes:
    """The inodes to write, as parallel arrays indexed by inode number.

    A tree of 100,000 entries would otherwise hold 100,000 objects of a dozen fields,
    each field an int object, plus a dict from node to inode: some 40 MiB, a third of a
    conversion's peak memory (issue #18). Here an inode costs 40 bytes. Numbers without
    a node of the tree (0, 1, and 3 to 10: reserved, or written on their own like the
    journal) hold None and zeros.

    Inodes are numbered in the order _number_inodes walks the tree, each directory's new
    entries one after another from `first_child`: a directory's blocks find an entry's
    inode by walking that run again, and look up in `linked` only the entries named
    before (hardlinks, and a lost+found made for the image).
    """

    __slots__ = (
        "data_blocks",
        "data_start",
        "first_child",
        "flags",
        "linked",
        "links",
        "lost_found",
        "nodes",
        "ranges",
        "tree_blocks",
        "up",
        "xattr_ibody",
        "xattr_key",
    )

    def __init__(self, root: Node, lost_found: Node | None) -> None:
        self.nodes: list[Node | None] = [None] * fmt.FIRST_INO
        self.nodes[fmt.ROOT_INO] = root
        # The directory holding an inode's first name (for a directory, its ".."):
        # with `nodes`, its path for errors.
        self.up = _zeros("I", fmt.FIRST_INO)
        self.up[fmt.ROOT_INO] = fmt.ROOT_INO
        self.links = _zeros("I", fmt.FIRST_INO)
        self.first_child = _zeros("I", fmt.FIRST_INO)  # directories only
        # Filled in by _plan_inode once every inode is numbered.
        self.flags = array("I")
        self.data_blocks = array("Q")  # from logical block 0 (the data ranges' sum)
        # The rare cases, by inode: sparse files' data ranges (any other file's is
        # one run from block 0), extent tree blocks, xattrs.
        self.ranges: dict[int, list[tuple[int, int]]] = {}
        self.tree_blocks: dict[int, int] = {}
        self.xattr_ibody: dict[int, bytes] = {}
        self.xattr_key: dict[int, tuple[bytes, int]] = {}  # (xattr block body, share group)
        self.data_start = array("Q")  # filled in by _allocate; tree blocks follow the data
        self.linked: dict[Node, int] = {}
        self.lost_found = lost_found  # made for the image: no name in the tree
        if lost_found is not None:
            self.add(lost_found, fmt.ROOT_INO, 2)
            self.linked[lost_found] = fmt.LOST_FOUND_INO

    def add(self, node: Node, up: int, links: int) -> None:
        """Number `node`, first named in directory `up`: the next inode."""
        self.nodes.append(node)
        self.up.append(up)
        self.links.append(links)
        self.first_child.append(0)

    @property
    def max_ino(self) -> int:
        return len(self.nodes) - 1

    def where(self, ino: int) -> _Where:
        return lambda: self.path(ino)

    def path(self, ino: int) -> bytes:
        """The first path naming inode `ino`, looked up (error messages only)."""
        names = []
        while ino != fmt.ROOT_INO:
            names.append(self._name(ino))
            ino = self.up[ino]
        return b"/" + b"/".join(reversed(names))

    def _name(self, ino: int) -> bytes:
        """The name `ino` was numbered under: its first in its directory's name order."""
        node = self.nodes[ino]
        if node is self.lost_found:
            return b"lost+found"
        directory = self.nodes[self.up[ino]]
        assert directory is not None
        return next(name for name, child in directory.sorted_children() if child is node)

    def child_inos(self, ino: int, children: list[tuple[bytes, Node]]) -> list[int]:
        """The inodes of directory `ino`'s entries (`children`, in name order)."""
        nodes = self.nodes
        linked = self.linked
        last = len(nodes) - 1
        nxt = self.first_child[ino]
        out = []
        for _name, child in children:
            # Numbered here, in this order: the next of this directory's run.
            if nxt <= last and nodes[nxt] is child:
                out.append(nxt)
                nxt += 1
            else:
                out.append(linked[child])
        return out


@dataclass(slots=True)
class _XattrBlock:
    entries: list[fmt.XattrEntry]
    refcount: int = 0
    block: int = 0


@dataclass
class _Plan:
    """Everything known before the geometry: inodes, block needs, identity."""

    inodes: _Inodes
    uuid: bytes
    hash_seed: bytes
    fs_seed: int
    time_ns: int
    journal_blocks: int
    xattr_blocks: dict[tuple[bytes, int], _XattrBlock]

    @property
    def payload_blocks(self) -> int:
        """Blocks of everything except the fixed metadata (sb, GDT, bitmaps, tables)."""
        inodes = self.inodes
        fixed = self.journal_blocks + len(self.xattr_blocks)
        return fixed + sum(inodes.data_blocks) + sum(inodes.tree_blocks.values())

    @property
    def max_ino(self) -> int:
        return self.inodes.max_ino


@dataclass(frozen=True)
class _Geometry:
    blocks: int  # s_blocks_count
    groups: int
    inodes_per_group: int
    gdt_blocks: int

    @property
    def itable_blocks(self) -> int:
        """Inode table blocks per group."""
        return self.inodes_per_group // fmt.INODES_PER_BLOCK

    @property
    def metadata_blocks(self) -> int:
        return 1 + self.gdt_blocks + self.groups * (2 + self.itable_blocks)

    @property
    def block_bitmaps(self) -> int:
        return 1 + self.gdt_blocks

    @property
    def inode_bitmaps(self) -> int:
        return self.block_bitmaps + self.groups

    @property
    def inode_tables(self) -> int:
        return self.inode_bitmaps + self.groups


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- Identity: UUID, hash seed, time ---------------------------------------------------


def _tree_digest(tree: Tree) -> bytes:
    """A digest of the tree's metadata: the seed when the caller gives none."""
    h = hashlib.sha256()
    index: dict[int, int] = {}
    for path, node in tree.walk():
        first = index.setdefault(id(node), len(index))
        fields = (first, node.st_mode, node.uid, node.gid, node.mtime_ns, node.size, node.rdev)
        h.update(repr(fields).encode() + b"\0" + path + b"\0" + (node.target or b"") + b"\0")
        for k, v in sorted(node.xattrs.items()):
            h.update(struct.pack("<II", len(k), len(v)) + k + v)
    return h.digest()


def _derive(seed: bytes, purpose: bytes) -> bytes:
    return hashlib.sha256(b"vmimg ext4 " + purpose + b"\0" + seed).digest()[:16]


def _make_uuid(seed: bytes) -> bytes:
    u = bytearray(_derive(seed, b"uuid"))
    u[6] = (u[6] & 0x0F) | 0x40  # shaped like a version 4 UUID
    u[8] = (u[8] & 0x3F) | 0x80
    return bytes(u)


# --- Planning ------------------------------------------------------------------------------


def _xattr_prefix(name: bytes) -> tuple[bytes, int] | None:
    for prefix, index in fmt.XATTR_PREFIXES:
        if name.startswith(prefix):
            return prefix, index
    return None


def _xattr_entries(node: Node, where: _Where) -> list[fmt.XattrEntry]:
    entries = []
    for name, value in node.xattrs.items():
        known = _xattr_prefix(name)
        if known is None:
            raise WriterError(f"xattr {name!r} on {os.fsdecode(where())}: unsupported namespace")
        prefix, index = known
        suffix = name[len(prefix) :]
        if index in (fmt.XATTR_INDEX_ACL_ACCESS, fmt.XATTR_INDEX_ACL_DEFAULT):
            if suffix:
                raise WriterError(
                    f"xattr {name!r} on {os.fsdecode(where())}: unsupported namespace"
                )
            value = _acl_to_disk(value, where)
        if len(suffix) > fmt.NAME_MAX:
            raise WriterError(f"xattr {name!r} on {os.fsdecode(where())}: name too long")
        entries.append(fmt.XattrEntry(index, suffix, value))
    entries.sort(key=fmt.XattrEntry.sort_key)
    return entries


def _acl_to_disk(value: bytes, where: _Where) -> bytes:
    """A POSIX ACL from its xattr form (version 2) to ext4's compact form (version 1)."""
    if len(value) < 4 or (len(value) - 4) % 8:
        raise WriterError(f"malformed POSIX ACL on {os.fsdecode(where())}")
    (version,) = struct.unpack_from("<I", value)
    if version != fmt.POSIX_ACL_XATTR_VERSION:
        raise WriterError(f"POSIX ACL version {version} on {os.fsdecode(where())}")
    out = bytearray(struct.pack("<I", fmt.EXT4_ACL_VERSION))
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        if tag in (fmt.ACL_USER, fmt.ACL_GROUP):
            out += struct.pack("<HHI", tag, perm, ident)
        else:
            out += struct.pack("<HH", tag, perm)
    return bytes(out)


def _data_ranges(content: Content, where: _Where) -> list[tuple[int, int]]:
    """Logical block ranges holding data; holes between them stay unallocated."""
    ranges: list[tuple[int, int]] = []
    end_prev = 0
    for ext in content.data_extents():
        if ext.length == 0:
            continue
        if ext.offset < end_prev or ext.offset + ext.length > content.size:
            raise WriterError(
                f"sparse extents of {os.fsdecode(where())} overlap or exceed its size"
            )
        end_prev = ext.offset + ext.length
        b0 = ext.offset // fmt.BLOCK_SIZE
        b1 = _ceil_div(ext.offset + ext.length, fmt.BLOCK_SIZE)
        if ranges and b0 <= ranges[-1][0] + ranges[-1][1]:
            start = ranges[-1][0]
            ranges[-1] = (start, b1 - start)
        else:
            ranges.append((b0, b1 - b0))
    return ranges


def _extent_count(ranges: Sequence[tuple[int, int]]) -> int:
    return sum(_ceil_div(n, fmt.EXTENT_MAX_LEN) for _, n in ranges)


def _extent_tree_blocks(n_extents: int) -> int:
    """Index and leaf blocks an extent tree of n extents needs beyond the inode."""
    total = 0
    count = n_extents
    while count > fmt.EXTENTS_IN_INODE:
        count = _ceil_div(count, fmt.EXTENTS_PER_BLOCK)
        total += count
    return total


def _journal_blocks(data_blocks: int) -> int:
    """About 1/16 of the data, a power of two between 4 MiB and 128 MiB."""
    want = max(data_blocks // JOURNAL_DATA_FRACTION, fmt.JBD2_MIN_JOURNAL_BLOCKS)
    blocks = 1 << (want - 1).bit_length()
    return min(blocks, JOURNAL_MAX_BLOCKS)


# Types _check_node checks only the owner of: most entries, checked inline.
_UNCHECKED = frozenset({NodeType.FILE, NodeType.DIR, NodeType.FIFO, NodeType.SOCKET})


def _check_node(node: Node, where: _Where) -> None:
    problem = None
    if node.uid > MAX_UID or node.gid > MAX_UID or node.uid < 0 or node.gid < 0:
        problem = f"uid/gid {node.uid}:{node.gid} does not fit in 32 bits"
    if node.type in (NodeType.CHAR, NodeType.BLOCK):
        major, minor = node.rdev
        if not (0 <= major <= MAX_MAJOR and 0 <= minor <= MAX_MINOR):
            problem = f"device number {major}:{minor} out of range"
    if node.type is NodeType.SYMLINK:
        target = node.target or b""
        if not target or len(target) >= fmt.BLOCK_SIZE:
            problem = f"symlink target must be 1..{fmt.BLOCK_SIZE - 1} bytes"
    if problem is not None:
        raise WriterError(f"{os.fsdecode(where())}: {problem}")


def _plan_inodes(tree: Tree, options: Ext4Options) -> _Plan:
    seed = options.seed or _tree_digest(tree)
    uuid = _make_uuid(seed)
    hash_seed = _derive(seed, b"hash seed")
    hash_words: tuple[int, int, int, int] = struct.unpack("<4I", hash_seed)
    inodes, time_ns = _number_inodes(tree)

    inodes.flags = _zeros("I", len(inodes.nodes))
    inodes.data_blocks = _zeros("Q", len(inodes.nodes))
    xattr_blocks: dict[tuple[bytes, int], _XattrBlock] = {}
    xattr_users: dict[bytes, int] = {}
    dir_type = NodeType.DIR
    file_type = NodeType.FILE
    links = inodes.links
    for ino, node in enumerate(inodes.nodes):
        if node is None:
            continue
        kind = node.type
        if links[ino] > fmt.LINK_MAX and kind is not dir_type:
            where = inodes.path(ino)
            raise WriterError(f"{os.fsdecode(where)}: more than {fmt.LINK_MAX} links")
        content = node.content
        if kind is file_type and content is not None and content.extents is None:
            _plan_plain_file(inodes, ino, content.size)  # most inodes, without _plan_inode
        else:
            _plan_inode(inodes, ino, hash_words)
        if node.xattrs:
            _plan_xattrs(inodes, ino, xattr_blocks, xattr_users)

    plan = _Plan(
        inodes=inodes,
        uuid=uuid,
        hash_seed=hash_seed,
        fs_seed=fmt.fs_checksum_seed(uuid),
        time_ns=time_ns,
        journal_blocks=0,
        xattr_blocks=xattr_blocks,
    )
    if options.journal:
        plan.journal_blocks = _journal_blocks(plan.payload_blocks)
    return plan


def _number_inodes(tree: Tree) -> tuple[_Inodes, int]:
    """Number the inodes: root 2, lost+found 11 when the image makes one, then the tree.
    Returns them with the latest mtime (the file system's own times)."""
    root = tree.root
    assert root.children is not None
    _check_node(root, lambda: b"/")
    lost_found: Node | None = None
    if b"lost+found" not in root.children:
        lost_found = Node(NodeType.DIR, mode=0o700, mtime_ns=root.mtime_ns, children={})
    inodes = _Inodes(root, lost_found)
    nodes = inodes.nodes
    links = inodes.links
    time_ns = max(0, root.mtime_ns)

    # Number the tree's inodes: each directory's children together, names sorted, then
    # its subdirectories depth first. Only names are held, never whole paths: memory
    # follows the number of entries, not their depth. Link counts are counted here too:
    # names for a file, "." and ".." and each subdirectory's ".." for a directory.
    # `seen` finds a node named again: a hardlink (or a directory linked twice, refused).
    # It is dropped on return; `again` keeps those nodes, one per extra name.
    seen: set[Node] = {root}
    again: list[Node] = []
    dir_type = NodeType.DIR
    # _Inodes.add, inline: this runs once per entry of the image
    up = inodes.up
    first_child = inodes.first_child
    stack = [fmt.ROOT_INO]
    while stack:
        directory = stack.pop()
        node = nodes[directory]
        assert node is not None
        inodes.first_child[directory] = len(nodes)
        subdirs = []
        for name, child in node.sorted_children():
            if not name or b"/" in name or name in (b".", b".."):
                shown = os.fsdecode(inodes.path(directory))
                raise WriterError(f"bad name {name!r} in {shown}")
            if len(name) > fmt.NAME_MAX:
                shown = os.fsdecode(inodes.path(directory))
                raise WriterError(f"name longer than 255 bytes in {shown}")
            if child in seen:
                if child.type is dir_type:
                    shown = os.fsdecode(inodes.path(directory).rstrip(b"/") + b"/" + name)
                    raise WriterError(f"{shown}: directory linked twice")
                again.append(child)
                continue
            seen.add(child)
            ino = len(nodes)
            nodes.append(child)
            up.append(directory)
            first_child.append(0)
            if child.type is dir_type:
                links.append(2)
                subdirs.append(ino)
            else:
                links.append(1)
            if child.type not in _UNCHECKED or not (
                0 <= child.uid <= MAX_UID and 0 <= child.gid <= MAX_UID
            ):
                _check_node(child, inodes.where(ino))
            if child.mtime_ns > time_ns:
                time_ns = child.mtime_ns
        links[directory] = 2 + len(subdirs)
        stack.extend(reversed(subdirs))
    if lost_found is not None:
        links[fmt.ROOT_INO] += 1
    _count_hardlinks(inodes, again)
    return inodes, time_ns


def _count_hardlinks(inodes: _Inodes, again: list[Node]) -> None:
    """Each extra name of a node adds a link, and the node joins `inodes.linked`, where
    the directories naming it find its inode."""
    if not again:
        return
    linked = dict.fromkeys(again, 0)
    for ino, node in enumerate(inodes.nodes):
        if node in linked:
            linked[node] = ino
    for node in again:
        inodes.links[linked[node]] += 1
    inodes.linked.update(linked)


def _plan_inode(inodes: _Inodes, ino: int, hash_words: tuple[int, int, int, int]) -> None:
    """An inode's flags and the blocks it needs."""
    node = inodes.nodes[ino]
    assert node is not None
    kind = node.type
    if kind is NodeType.FILE:
        content = node.content
        assert content is not None
        if content.extents is None:
            _plan_plain_file(inodes, ino, content.size)
            return
        ranges = _data_ranges(content, inodes.where(ino))  # sparse: its data runs
        inodes.ranges[ino] = ranges
        inodes.data_blocks[ino] = sum(n for _, n in ranges)
        tree_blocks = _extent_tree_blocks(_extent_count(ranges))
        if tree_blocks:
            inodes.tree_blocks[ino] = tree_blocks
        inodes.flags[ino] = fmt.INODE_FLAG_EXTENTS
    elif kind is NodeType.DIR:
        inodes.data_blocks[ino] = _plan_dir(inodes, ino, hash_words)
        if inodes.links[ino] > fmt.LINK_MAX:
            inodes.links[ino] = 1  # dir_nlink: "more than the field can count"
    elif kind is NodeType.SYMLINK:
        assert node.target is not None
        if len(node.target) > fmt.MAX_FAST_SYMLINK:  # a slow symlink: its target in a block
            inodes.data_blocks[ino] = 1
            inodes.flags[ino] = fmt.INODE_FLAG_EXTENTS


def _plan_plain_file(inodes: _Inodes, ino: int, size: int) -> None:
    """A file of one data run from block 0 (not sparse): most inodes of an image."""
    count = -(-size // fmt.BLOCK_SIZE)
    inodes.data_blocks[ino] = count
    if count > fmt.EXTENTS_IN_INODE * fmt.EXTENT_MAX_LEN:
        inodes.tree_blocks[ino] = _extent_tree_blocks(_extent_count(((0, count),)))
    inodes.flags[ino] = fmt.INODE_FLAG_EXTENTS


def _plan_dir(inodes: _Inodes, ino: int, hash_words: tuple[int, int, int, int]) -> int:
    """A directory's flags, and the number of its blocks. Only the number is worked out
    here; the blocks themselves are built and written one directory at a time
    (_dir_blocks), never all held."""
    node = inodes.nodes[ino]
    inodes.flags[ino] = fmt.INODE_FLAG_EXTENTS
    if node is inodes.lost_found:
        return LOST_FOUND_BLOCKS  # pre-sized, as mke2fs does
    if _linear_size(inodes, ino) <= _LEAF_SPACE:
        return 1
    # More than one block: hash-indexed, as the kernel would make it.
    inodes.flags[ino] |= fmt.INODE_FLAG_INDEX
    names = _dir_entries(inodes, ino)
    return _htree_shape(inodes.where(ino), _htree_order(names, hash_words)).blocks


def _plan_xattrs(
    inodes: _Inodes,
    ino: int,
    xattr_blocks: dict[tuple[bytes, int], _XattrBlock],
    xattr_users: dict[bytes, int],
) -> None:
    node = inodes.nodes[ino]
    assert node is not None
    where = inodes.where(ino)
    entries = _xattr_entries(node, where)
    if fmt.xattrs_space(entries) <= fmt.XATTR_IBODY_SPACE - 4:
        inodes.xattr_ibody[ino] = fmt.xattr_ibody(entries)
        return
    if fmt.XATTR_BLOCK_HEADER_SIZE + fmt.xattrs_space(entries) > fmt.BLOCK_SIZE:
        raise WriterError(f"{os.fsdecode(where())}: xattrs do not fit in one 4 KiB block")
    # Identical xattr sets share one block (as the kernel does), up to its refcount limit.
    body = bytes(fmt.xattr_block_body(entries, 0))
    users = xattr_users.get(body, 0)
    xattr_users[body] = users + 1
    key = (body, users // fmt.XATTR_REFCOUNT_MAX)
    block = xattr_blocks.setdefault(key, _XattrBlock(entries))
    block.refcount += 1
    inodes.xattr_key[ino] = key


# --- Directories ------------------------------------------------------------------------------

_LEAF_SPACE = fmt.BLOCK_SIZE - fmt.DIR_TAIL_SIZE


def _pack_leaves(entries: list[fmt.DirEntry2], seed: int, breaks: list[int]) -> list[bytes]:
    """Directory leaf blocks holding entries, a new block at each index in `breaks`."""
    blocks = []
    start = 0
    for stop in [*breaks, len(entries)]:
        leaf = entries[start:stop]
        inos = [e.inode for e in leaf]
        types = bytes([e.file_type for e in leaf])
        blocks.append(_ext4meta.dir_leaf(inos, [e.name for e in leaf], types, seed))
        start = stop
    return blocks


def _greedy_breaks(sizes: list[int], can_break: list[bool] | None = None) -> list[int]:
    """Where to start new blocks so that each block's entries fit in a leaf."""
    breaks = []
    used = 0
    i = 0
    n = len(sizes)
    while i < n:
        # A group of entries that should stay together (same hash), from i to j.
        j = i + 1
        if can_break is not None:
            while j < n and not can_break[j]:
                j += 1
        group = sum(sizes[i:j])
        if used + group <= _LEAF_SPACE:
            used += group
        elif group <= _LEAF_SPACE:
            breaks.append(i)
            used = group
        else:  # a group larger than a block must be split (hash collision chain)
            for k in range(i, j):
                if used + sizes[k] > _LEAF_SPACE:
                    breaks.append(k)
                    used = 0
                used += sizes[k]
        i = j
    return breaks


def _children(inodes: _Inodes, ino: int) -> list[tuple[bytes, Node]]:
    """A directory's entries by name (sorted again when written: nothing is kept)."""
    node = inodes.nodes[ino]
    assert node is not None
    children = node.sorted_children()
    if ino == fmt.ROOT_INO and inodes.lost_found is not None:
        children = sorted([*children, (b"lost+found", inodes.lost_found)])
    return children


def _dir_entries(inodes: _Inodes, ino: int) -> list[fmt.DirEntry2]:
    children = _children(inodes, ino)
    return [
        fmt.DirEntry2(child_ino, name, _FILE_TYPE[child.type])
        for (name, child), child_ino in zip(children, inodes.child_inos(ino, children), strict=True)
    ]


_DOTS_SIZE = fmt.dirent_size(1) + fmt.dirent_size(2)


def _linear_size(inodes: _Inodes, ino: int) -> int:
    """Bytes of a linear directory's entries, "." and ".." included."""
    node = inodes.nodes[ino]
    assert node is not None and node.children is not None
    # dirent_size, inline: this runs once per directory entry of the image
    size = _DOTS_SIZE + sum([(fmt.DIRENT_HEADER + 3 + len(name)) & ~3 for name in node.children])
    if ino == fmt.ROOT_INO and inodes.lost_found is not None:
        size += fmt.dirent_size(len(b"lost+found"))
    return size


def _linear_block(inodes: _Inodes, ino: int, seed: int) -> bytes:
    """The one leaf block of a linear directory: ".", ".." and the entries, as
    _pack_leaves would make it, without an object per entry."""
    children = _children(inodes, ino)
    inos = [ino, inodes.up[ino], *inodes.child_inos(ino, children)]
    names = [b".", b"..", *[name for name, _ in children]]
    file_type = _FILE_TYPE
    types = bytes([FT_DIR, FT_DIR, *[file_type[child.type] for _, child in children]])
    return _ext4meta.dir_leaf(inos, names, types, seed)


@dataclass(frozen=True)
class _HtreeOrder:
    """A hashed directory's entries in hash order, and where its leaves break."""

    ordered: list[fmt.DirEntry2]
    hashes: list[int]
    breaks: list[int]

    @property
    def leaves(self) -> int:
        return len(self.breaks) + 1


@dataclass(frozen=True)
class _HtreeShape:
    leaves: int
    nodes: int  # dx_node blocks: 0 for a one-level tree

    @property
    def blocks(self) -> int:
        return 1 + self.nodes + self.leaves


def _htree_order(names: list[fmt.DirEntry2], hash_words: tuple[int, int, int, int]) -> _HtreeOrder:
    """Leaves hold entries in hash order. A block boundary falls between different
    hashes where possible (a run of equal hashes split across blocks is marked by the
    next block's "continued" bit, as the kernel does)."""
    hashed = sorted(
        ((*fmt.dx_hash_half_md4(e.name, hash_words), e.name, e) for e in names),
        key=lambda t: (t[0], t[1], t[2]),
    )
    ordered = [t[3] for t in hashed]
    hashes = [t[0] for t in hashed]
    can_break = [i == 0 or hashes[i] != hashes[i - 1] for i in range(len(hashes))]
    return _HtreeOrder(ordered, hashes, _greedy_breaks([e.size for e in ordered], can_break))


def _htree_shape(where: _Where, order: _HtreeOrder) -> _HtreeShape:
    if order.leaves <= fmt.DX_ROOT_LIMIT:
        return _HtreeShape(order.leaves, 0)
    n_nodes = _ceil_div(order.leaves, fmt.DX_NODE_LIMIT)
    if n_nodes > fmt.DX_ROOT_LIMIT:
        raise WriterError(f"{os.fsdecode(where())}: directory too large for a 2-level htree")
    return _HtreeShape(order.leaves, n_nodes)


def _dir_blocks(plan: _Plan, ino: int, seed: int) -> list[bytes | bytearray]:
    """The blocks of one directory, as _plan_dir counted them."""
    inodes = plan.inodes
    if inodes.flags[ino] & fmt.INODE_FLAG_INDEX:
        names = _dir_entries(inodes, ino)
        hash_words: tuple[int, int, int, int] = struct.unpack("<4I", plan.hash_seed)
        blocks = _htree_dir(inodes, ino, _htree_order(names, hash_words), seed)
    else:
        blocks = [_linear_block(inodes, ino, seed)]
    # lost+found is pre-sized with empty leaves, as mke2fs does
    count = inodes.data_blocks[ino]
    blocks += [_pack_leaves([], seed, [])[0] for _ in range(count - len(blocks))]
    assert len(blocks) == count
    return blocks


def _htree_dir(inodes: _Inodes, ino: int, order: _HtreeOrder, seed: int) -> list[bytes | bytearray]:
    """A hashed (dir_index) directory: dx_root, maybe one level of dx_nodes, leaves."""
    leaves = _pack_leaves(order.ordered, seed, order.breaks)
    hashes = order.hashes
    leaf_hashes = []
    for k, s in enumerate([0, *order.breaks]):
        continued = k > 0 and hashes[s] == hashes[s - 1]
        leaf_hashes.append(hashes[s] | (1 if continued else 0))
    shape = _htree_shape(inodes.where(ino), order)
    dots = (ino, inodes.up[ino])
    if shape.nodes == 0:
        root = _dx_root(dots, 0, [(h, 1 + k) for k, h in enumerate(leaf_hashes)], seed)
        return [root, *leaves]
    first_leaf = 1 + shape.nodes
    nodes = []
    root_entries = []
    for j in range(shape.nodes):
        chunk = range(j * fmt.DX_NODE_LIMIT, min((j + 1) * fmt.DX_NODE_LIMIT, len(leaves)))
        node_entries = [(leaf_hashes[k], first_leaf + k) for k in chunk]
        nodes.append(_dx_node(node_entries, seed))
        root_entries.append((node_entries[0][0], 1 + j))
    return [_dx_root(dots, 1, root_entries, seed), *nodes, *leaves]


def _put_dx_entries(
    block: bytearray, offset: int, limit: int, entries: list[tuple[int, int]], seed: int
) -> None:
    """count/limit plus (hash, block) entries; the first entry's hash is implied."""
    fmt.DX_COUNT_LIMIT.pack_into(block, offset, limit, len(entries))
    struct.pack_into("<I", block, offset + 4, entries[0][1])
    for i, (h, blk) in enumerate(entries[1:], start=1):
        fmt.DX_ENTRY.pack_into(block, offset + i * fmt.DX_ENTRY_SIZE, h, blk)
    fmt.seal_dx_node(block, offset, limit, seed)


def _dx_root(
    dots: tuple[int, int], levels: int, entries: list[tuple[int, int]], seed: int
) -> bytearray:
    """The first block: "." and ".." (the inodes `dots`), then the root of the index."""
    block = bytearray(fmt.BLOCK_SIZE)
    dot = fmt.DirEntry2(dots[0], b".", FT_DIR)
    dotdot = fmt.DirEntry2(dots[1], b"..", FT_DIR)
    dot.pack_into(block, 0, dot.size)
    dotdot.pack_into(block, dot.size, fmt.BLOCK_SIZE - dot.size)
    fmt.DX_ROOT_INFO.pack_into(
        block, dot.size + dotdot.size, 0, fmt.DX_HASH_HALF_MD4, fmt.DX_ROOT_INFO_LENGTH, levels, 0
    )
    _put_dx_entries(block, fmt.DX_ROOT_ENTRIES_OFFSET, fmt.DX_ROOT_LIMIT, entries, seed)
    return block


def _dx_node(entries: list[tuple[int, int]], seed: int) -> bytearray:
    block = bytearray(fmt.BLOCK_SIZE)
    fmt.DIRENT.pack_into(block, 0, 0, fmt.BLOCK_SIZE, 0, 0)
    _put_dx_entries(block, fmt.DX_NODE_ENTRIES_OFFSET, fmt.DX_NODE_LIMIT, entries, seed)
    return block


# --- Geometry ---------------------------------------------------------------------------------


def _geometry_for(blocks: int, inodes_wanted: int) -> _Geometry:
    """Groups for `blocks`, and inodes spread evenly over them (a whole inode table block)."""
    groups = max(_ceil_div(blocks, fmt.BLOCKS_PER_GROUP), 1)
    ipg = _ceil_div(_ceil_div(inodes_wanted, groups), fmt.INODES_PER_BLOCK) * fmt.INODES_PER_BLOCK
    ipg = max(ipg, fmt.INODES_PER_BLOCK)
    assert ipg <= fmt.MAX_INODES_PER_GROUP
    gdt = _ceil_div(groups * fmt.DESC_SIZE, fmt.BLOCK_SIZE)
    return _Geometry(blocks=blocks, groups=groups, inodes_per_group=ipg, gdt_blocks=gdt)


def _min_blocks_for_inodes(inodes: int) -> int:
    """One inode bitmap block per group caps inodes per group: more inodes, more groups."""
    groups = _ceil_div(inodes, fmt.MAX_INODES_PER_GROUP)
    return (groups - 1) * fmt.BLOCKS_PER_GROUP + 1


def _auto_geometry(plan: _Plan, headroom: int, extra_inodes: int) -> _Geometry:
    payload = plan.payload_blocks
    headroom_blocks = _ceil_div(headroom, fmt.BLOCK_SIZE)
    inodes = plan.max_ino + extra_inodes + headroom // HEADROOM_BYTES_PER_INODE
    blocks = max(payload + headroom_blocks + 1, _min_blocks_for_inodes(inodes))
    for _ in range(32):  # converges in two or three rounds: metadata grows with groups
        geo = _geometry_for(blocks, inodes)
        need = geo.metadata_blocks + payload + headroom_blocks
        if need <= blocks:
            return geo
        blocks = need
    raise AssertionError("ext4 geometry did not converge")


def _geometry(plan: _Plan, options: Ext4Options) -> _Geometry:
    if options.size is None:
        geo = _auto_geometry(plan, options.headroom, options.extra_inodes)
    else:
        blocks = options.size // fmt.BLOCK_SIZE
        groups = max(_ceil_div(blocks, fmt.BLOCKS_PER_GROUP), 1)
        needed_inodes = plan.max_ino + options.extra_inodes
        spare = max(blocks - plan.payload_blocks, 0) * fmt.BLOCK_SIZE
        spare_inodes = spare // (HEADROOM_BYTES_PER_INODE + fmt.INODE_SIZE)
        inodes = min(needed_inodes + spare_inodes, groups * fmt.MAX_INODES_PER_GROUP)
        geo = _geometry_for(blocks, inodes)
        fits = geo.metadata_blocks + plan.payload_blocks <= blocks
        if not fits or needed_inodes > inodes:
            smallest = _auto_geometry(plan, 0, options.extra_inodes)
            raise WriterError(
                f"image too small: needs {smallest.blocks * fmt.BLOCK_SIZE} bytes, "
                f"--size gives {options.size}"
            )
    if geo.groups * geo.inodes_per_group > MAX_INODES:
        raise WriterError("too many inodes for ext4")
    return geo


# --- Allocation -----------------------------------------------------------------------------


def _allocate(plan: _Plan, geo: _Geometry) -> tuple[int, int]:
    """Assign blocks front to back; return (journal start, first unused block).

    The journal, then each inode in inode order: its data, its extent tree blocks, and
    the xattr block it shares if it is the first to use it."""
    inodes = plan.inodes
    journal_start = geo.inode_tables + geo.groups * geo.itable_blocks
    sizes = array("Q", inodes.data_blocks)
    for ino, count in inodes.tree_blocks.items():
        sizes[ino] += count
    first_user: dict[tuple[bytes, int], int] = {}
    for ino, key in inodes.xattr_key.items():  # filled in inode order
        if key not in first_user:
            first_user[key] = ino
            sizes[ino] += 1
    starts = array("Q", accumulate(sizes, initial=journal_start + plan.journal_blocks))
    used_end = starts.pop()
    inodes.data_start = starts
    for key, ino in first_user.items():
        plan.xattr_blocks[key].block = starts[ino] + sizes[ino] - 1  # the inode's last
    assert used_end <= geo.blocks
    return journal_start, used_end


def _block_ranges(inodes: _Inodes, ino: int, metadata: bool) -> Sequence[tuple[int, int]]:
    """Logical block ranges of an inode's blocks: one run from 0 unless a sparse file."""
    if not metadata:
        ranges = inodes.ranges.get(ino)
        if ranges is not None:
            return ranges
    count = inodes.data_blocks[ino]
    return ((0, count),) if count else ()


def _extents(ranges: Sequence[tuple[int, int]], physical: int) -> list[fmt.Extent]:
    out = []
    for logical, count in ranges:
        while count > 0:
            n = min(count, fmt.EXTENT_MAX_LEN)
            out.append(fmt.Extent(logical, n, physical))
            logical += n
            physical += n
            count -= n
    return out


def _extent_tree(
    extents: list[fmt.Extent], tree_start: int, seed: int
) -> tuple[bytes, list[tuple[int, bytearray]]]:
    """The inode's i_block (extent root) and the tree blocks below it, leaves first."""
    entries = [e.pack() for e in extents]
    firsts = [e.logical for e in extents]
    depth = 0
    blocks: list[tuple[int, bytearray]] = []
    nxt = tree_start
    while len(entries) > fmt.EXTENTS_IN_INODE:
        up_entries = []
        up_firsts = []
        for i in range(0, len(entries), fmt.EXTENTS_PER_BLOCK):
            blocks.append(
                (nxt, fmt.extent_block(entries[i : i + fmt.EXTENTS_PER_BLOCK], depth, seed))
            )
            up_entries.append(fmt.ExtentIdx(firsts[i], nxt).pack())
            up_firsts.append(firsts[i])
            nxt += 1
        entries, firsts = up_entries, up_firsts
        depth += 1
    return bytes(fmt.extent_node(entries, depth, fmt.EXTENTS_IN_INODE)), blocks


# --- Writing ---------------------------------------------------------------------------------


def _copy_file_data(
    reader: ContentReader, content: Content, inodes: _Inodes, ino: int, out: GatherWriter
) -> None:
    """A large or sparse file's data runs, each to its blocks (contiguous on disk from
    data_start), copied by the kernel."""
    out.flush()
    ranges = _block_ranges(inodes, ino, False)
    r = 0
    phys = inodes.data_start[ino]
    stored = 0
    for ext in content.data_extents():
        if ext.length == 0:
            continue
        while ext.offset >= (ranges[r][0] + ranges[r][1]) * fmt.BLOCK_SIZE:
            phys += ranges[r][1]
            r += 1
        at = phys * fmt.BLOCK_SIZE + ext.offset - ranges[r][0] * fmt.BLOCK_SIZE
        reader.copy(content, stored, ext.length, out.fd, at)
        stored += ext.length


class _BlockRun:
    """Blocks that follow each other on disk, gathered a run at a time: small files'
    bytes (read together by ContentReader.read_many: files close together in a layer tar
    are one pread) and directory blocks, written at once into a buffer of zeros (a
    file's last block is padded with them).

    100,000 tiny files would otherwise be 100,000 reads and as many puts. Anything else
    written to `out` flushes the run first, so that writes still rise."""

    def __init__(self, reader: ContentReader, out: GatherWriter) -> None:
        self.reader = reader
        self.out = out
        self.start = 0  # output offset of the run
        self.end = 0  # and of the end of its last blocks
        self.items: list[Content | bytes] = []  # a file's content, or blocks' bytes
        self.offsets: list[int] = []  # where each item goes in the run

    def add(self, offset: int, length: int, item: Content | bytes) -> None:
        """A small file's content or ready blocks, taking `length` bytes at `offset`."""
        if self.items and (offset != self.end or self.end - self.start >= BLOCK_RUN_BYTES):
            self.flush()
        if not self.items:
            self.start = offset
        self.items.append(item)
        self.offsets.append(offset - self.start)
        self.end = offset + length

    def flush(self) -> None:
        if not self.items:
            return
        reads = [(item, 0, item.size) for item in self.items if type(item) is Content]
        datas = iter(self.reader.read_many(reads))
        run = bytearray(self.end - self.start)
        for at, item in zip(self.offsets, self.items, strict=True):
            data = item if type(item) is bytes else next(datas)
            run[at : at + len(data)] = data
        self.out.write(self.start, run)
        self.items = []
        self.offsets = []


def _i_block_special(node: Node) -> bytes:
    """i_block for devices (old or new encoding) and fast symlinks."""
    if node.type in (NodeType.CHAR, NodeType.BLOCK):
        major, minor = node.rdev
        if major < 256 and minor < 256:
            words = ((major << 8) | minor, 0)
        else:
            words = (0, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12))
        return struct.pack("<II", *words).ljust(fmt.N_BLOCKS_BYTES, b"\0")
    if node.type is NodeType.SYMLINK:
        assert node.target is not None
        return node.target.ljust(fmt.N_BLOCKS_BYTES, b"\0")
    return bytes(fmt.N_BLOCKS_BYTES)


def _metadata_blocks(node: Node, plan: _Plan, ino: int, seed: int) -> list[bytes | bytearray]:
    """The blocks of a directory or slow symlink, built when they are written."""
    if node.is_dir:
        return _dir_blocks(plan, ino, seed)
    assert node.type is NodeType.SYMLINK and node.target is not None
    block = bytearray(fmt.BLOCK_SIZE)
    block[: len(node.target)] = node.target
    return [block]


def clamp_time(ns: int) -> int:
    """A time as ext4 can store it: clamped to 1901..2446, as the kernel clamps."""
    return min(max(ns, MIN_TIME_NS), MAX_TIME_NS)


class _InodeTable:
    """The inode table (inodes 1..count, contiguous from `start`: the groups' tables
    follow each other), held a chunk at a time: inodes are packed in number order, and
    each chunk is written once the next one is asked for."""

    def __init__(self, fd: int, start: int, count: int) -> None:
        self.fd = fd
        self.start = start
        self.count = count
        self.first = 1  # the inode at chunk[0]
        self.chunk = bytearray(min(count, ITABLE_CHUNK_INODES) * fmt.INODE_SIZE)

    def at(self, ino: int) -> int:
        """The offset of inode `ino` in `chunk`, moving on to its chunk if need be."""
        index = ino - self.first
        if index >= ITABLE_CHUNK_INODES:
            self.flush()
            index = (ino - 1) % ITABLE_CHUNK_INODES
            self.first = ino - index
            size = min(ITABLE_CHUNK_INODES, self.count - self.first + 1)
            self.chunk = bytearray(size * fmt.INODE_SIZE)
        assert index >= 0, "inodes packed out of order"
        return index * fmt.INODE_SIZE

    def flush(self) -> None:
        if self.chunk:
            pwrite_all(self.fd, self.chunk, self.start + (self.first - 1) * fmt.INODE_SIZE)
            self.chunk = bytearray()


def _write_inodes(
    plan: _Plan, itable: _InodeTable, out_fd: int, reader: ContentReader
) -> list[str]:
    """Fill the inode table, and write each inode's blocks (data, dirs, extents).
    Returns warnings: the paths whose times were clamped."""
    bs = fmt.BLOCK_SIZE
    clamped = PathWarnings("mtime outside what ext4 stores (1901..2446); clamped")
    out = GatherWriter(out_fd)
    run = _BlockRun(reader, out)
    run_add = run.add
    fs_seed = plan.fs_seed
    times: dict[int, tuple[int, int, int]] = {}  # mtime -> clamped, (sec, extra): few differ
    file_type = NodeType.FILE
    dir_type = NodeType.DIR
    symlink_type = NodeType.SYMLINK
    ifmt = {kind: kind.st_ifmt for kind in NodeType}
    extents_flag = fmt.INODE_FLAG_EXTENTS
    sectors_per_block = bs // fmt.SECTOR
    pack_inode = _ext4meta.pack_inode
    one_extent_root = fmt.one_extent_root
    inodes = plan.inodes
    links = inodes.links
    flags = inodes.flags
    data_blocks = inodes.data_blocks
    data_start = inodes.data_start
    tree_blocks = inodes.tree_blocks
    ranges = inodes.ranges
    xattr_ibody = inodes.xattr_ibody
    xattr_key = inodes.xattr_key
    for ino, node in enumerate(inodes.nodes):
        if node is None:
            continue
        kind = node.type
        start = data_start[ino]
        count = data_blocks[ino]
        if kind is file_type:
            content = node.content
            assert content is not None
            if content.extents is not None or content.size > SMALL_FILE_MAX:
                run.flush()
                _copy_file_data(reader, content, inodes, ino, out)
            elif count:  # small: written from memory with its neighbours
                run_add(start * bs, count * bs, content)
            size = content.size
        else:
            size = count * bs if kind is dir_type else node.size
            if count:  # the blocks of a directory or slow symlink: metadata
                seed = fmt.inode_checksum_seed(fs_seed, ino, 0)
                blocks = b"".join(_metadata_blocks(node, plan, ino, seed))
                run_add(start * bs, count * bs, blocks)
        inode_flags = flags[ino]
        if not inode_flags & extents_flag:
            i_block = _i_block_special(node)
        elif 0 < count <= fmt.EXTENT_MAX_LEN and ino not in ranges:  # one extent: most
            i_block = one_extent_root(0, count, start)
        else:
            seed = fmt.inode_checksum_seed(fs_seed, ino, 0)
            metadata = kind is not file_type
            extents = _extents(_block_ranges(inodes, ino, metadata), start)
            i_block, tree = _extent_tree(extents, start + count, seed)
            if tree:
                run.flush()
            for blk, data in tree:
                out.put(blk * bs, data)
        used = count + (tree_blocks.get(ino, 0) if tree_blocks else 0)
        file_acl = 0
        key = xattr_key.get(ino) if xattr_key else None
        if key is not None:
            file_acl = plan.xattr_blocks[key].block
            used += 1
        mtime_ns = node.mtime_ns
        time = times.get(mtime_ns)
        if time is None:
            clamped_ns = clamp_time(mtime_ns)
            time = times[mtime_ns] = (clamped_ns, *fmt.encode_time(clamped_ns))
        # node.st_mode, without its property call for most inodes (a symlink's is 0777)
        mode = node.st_mode if kind is symlink_type else ifmt[kind] | (node.mode & 0o7777)
        offset = itable.at(ino)  # before itable.chunk: it may move on to the next chunk
        pack_inode(
            itable.chunk,
            offset,
            fs_seed,
            ino,
            mode,
            node.uid,
            node.gid,
            size,
            links[ino],
            used * sectors_per_block,
            inode_flags,
            i_block,
            time[1],
            time[2],
            file_acl,
            xattr_ibody.get(ino, b"") if xattr_ibody else b"",
        )
        if time[0] != mtime_ns:
            clamped.add(inodes.path(ino))
    run.flush()
    out.flush()
    return clamped.lines()


def _write_journal(plan: _Plan, start: int, itable: _InodeTable, out_fd: int) -> bytes:
    """The journal inode and superblock; returns s_jnl_blocks (the inode's backup)."""
    blocks = plan.journal_blocks
    seed = fmt.inode_checksum_seed(plan.fs_seed, fmt.JOURNAL_INO, 0)
    i_block, tree = _extent_tree(_extents([(0, blocks)], start), 0, seed)
    assert not tree
    size = blocks * fmt.BLOCK_SIZE
    inode = fmt.Inode(
        mode=stat.S_IFREG | 0o600,
        uid=0,
        gid=0,
        size=size,
        links=1,
        blocks_512=blocks * (fmt.BLOCK_SIZE // fmt.SECTOR),
        flags=fmt.INODE_FLAG_EXTENTS,
        i_block=i_block,
        mtime_ns=clamp_time(plan.time_ns),
    )
    inode.pack_into(itable.chunk, itable.at(fmt.JOURNAL_INO), fmt.JOURNAL_INO, plan.fs_seed)
    pwrite_all(out_fd, fmt.JournalSuperblock(blocks, plan.uuid).pack(), start * fmt.BLOCK_SIZE)
    return i_block + struct.pack("<II", size >> 32, size & 0xFFFFFFFF)


def _bitmap(used: int, valid: int, length: int) -> bytearray:
    """A bitmap block: the first `used` bits set, and every bit from `valid` on."""
    out = bytearray(length)
    full, rest = divmod(used, 8)
    out[:full] = b"\xff" * full
    if rest:
        out[full] = (1 << rest) - 1
    if valid < length * 8:
        v_full, v_rest = divmod(valid, 8)
        if v_rest:
            out[v_full] |= 0xFF & ~((1 << v_rest) - 1)
            v_full += 1
        out[v_full:] = b"\xff" * (length - v_full)
    return out


def _write_groups(plan: _Plan, geo: _Geometry, used_end: int, out_fd: int) -> tuple[int, int]:
    """Bitmaps and group descriptors; returns (free blocks, free inodes)."""
    bs = fmt.BLOCK_SIZE
    ipg = geo.inodes_per_group
    dirs_per_group = [0] * geo.groups
    dir_type = NodeType.DIR
    for ino, node in enumerate(plan.inodes.nodes):
        if node is not None and node.type is dir_type:
            dirs_per_group[(ino - 1) // ipg] += 1
    gdt = bytearray()
    free_blocks_total = 0
    free_inodes_total = 0
    for g in range(geo.groups):
        first = g * fmt.BLOCKS_PER_GROUP
        valid = min(fmt.BLOCKS_PER_GROUP, geo.blocks - first)
        used_blocks = min(max(used_end - first, 0), valid)
        bbitmap = _bitmap(used_blocks, valid, bs)
        used_inodes = min(max(plan.max_ino - g * ipg, 0), ipg)
        ibitmap = _bitmap(used_inodes, ipg, bs)
        if any(bbitmap):
            pwrite_all(out_fd, bbitmap, (geo.block_bitmaps + g) * bs)
        pwrite_all(out_fd, ibitmap, (geo.inode_bitmaps + g) * bs)
        flags = fmt.BG_INODE_ZEROED
        if used_inodes == 0:
            flags |= fmt.BG_INODE_UNINIT
        desc = fmt.GroupDescriptor(
            block_bitmap=geo.block_bitmaps + g,
            inode_bitmap=geo.inode_bitmaps + g,
            inode_table=geo.inode_tables + g * geo.itable_blocks,
            free_blocks=valid - used_blocks,
            free_inodes=ipg - used_inodes,
            used_dirs=dirs_per_group[g],
            flags=flags,
            itable_unused=ipg - used_inodes,
            block_bitmap_csum=fmt.bitmap_checksum(
                plan.fs_seed, bbitmap[: fmt.BLOCKS_PER_GROUP // 8]
            ),
            inode_bitmap_csum=fmt.bitmap_checksum(plan.fs_seed, ibitmap[: ipg // 8]),
        )
        gdt += desc.pack(g, plan.fs_seed)
        free_blocks_total += valid - used_blocks
        free_inodes_total += ipg - used_inodes
    pwrite_all(out_fd, gdt, bs)
    return free_blocks_total, free_inodes_total


def _superblock(
    plan: _Plan,
    geo: _Geometry,
    options: Ext4Options,
    free: tuple[int, int],
    jnl_blocks: bytes,
) -> bytearray:
    secs = max(clamp_time(plan.time_ns) // NS_PER_S, 0)
    t_lo, t_hi = secs & 0xFFFFFFFF, min(secs >> 32, 0xFF)
    label = options.label.encode()
    compat = fmt.COMPAT_EXT_ATTR | fmt.COMPAT_DIR_INDEX | fmt.COMPAT_SPARSE_SUPER2
    if options.journal:
        compat |= fmt.COMPAT_HAS_JOURNAL
    incompat = (
        fmt.INCOMPAT_FILETYPE | fmt.INCOMPAT_EXTENTS | fmt.INCOMPAT_64BIT | fmt.INCOMPAT_FLEX_BG
    )
    ro_compat = (
        fmt.RO_COMPAT_SPARSE_SUPER
        | fmt.RO_COMPAT_LARGE_FILE
        | fmt.RO_COMPAT_DIR_NLINK
        | fmt.RO_COMPAT_EXTRA_ISIZE
        | fmt.RO_COMPAT_METADATA_CSUM
    )
    sb = fmt.SUPERBLOCK.pack(
        s_inodes_count=geo.groups * geo.inodes_per_group,
        s_blocks_count_lo=geo.blocks & 0xFFFFFFFF,
        s_free_blocks_count_lo=free[0] & 0xFFFFFFFF,
        s_free_inodes_count=free[1],
        s_first_data_block=0,
        s_log_block_size=fmt.LOG_BLOCK_SIZE,
        s_log_cluster_size=fmt.LOG_BLOCK_SIZE,
        s_blocks_per_group=fmt.BLOCKS_PER_GROUP,
        s_clusters_per_group=fmt.BLOCKS_PER_GROUP,
        s_inodes_per_group=geo.inodes_per_group,
        s_wtime=t_lo,
        s_max_mnt_count=fmt.MAX_MNT_COUNT_NONE,
        s_magic=fmt.EXT4_SUPER_MAGIC,
        s_state=fmt.STATE_CLEAN,
        s_errors=fmt.ERRORS_CONTINUE,
        s_lastcheck=t_lo,
        s_creator_os=fmt.OS_LINUX,
        s_rev_level=fmt.REV_DYNAMIC,
        s_first_ino=fmt.FIRST_INO,
        s_inode_size=fmt.INODE_SIZE,
        s_feature_compat=compat,
        s_feature_incompat=incompat,
        s_feature_ro_compat=ro_compat,
        s_uuid=plan.uuid,
        s_volume_name=label,
        s_journal_inum=fmt.JOURNAL_INO if options.journal else 0,
        s_hash_seed=plan.hash_seed,
        s_def_hash_version=fmt.DX_HASH_HALF_MD4,
        s_jnl_backup_type=fmt.JNL_BACKUP_BLOCKS if options.journal else 0,
        s_desc_size=fmt.DESC_SIZE,
        s_default_mount_opts=fmt.DEFAULT_MOUNT_OPTS,
        s_mkfs_time=t_lo,
        s_jnl_blocks=jnl_blocks,
        s_blocks_count_hi=geo.blocks >> 32,
        s_free_blocks_count_hi=free[0] >> 32,
        s_min_extra_isize=fmt.EXTRA_ISIZE,
        s_want_extra_isize=fmt.EXTRA_ISIZE,
        s_flags=fmt.FLAGS_UNSIGNED_HASH,
        s_log_groups_per_flex=fmt.LOG_GROUPS_PER_FLEX,
        s_checksum_type=fmt.CHECKSUM_TYPE_CRC32C,
        s_wtime_hi=t_hi,
        s_mkfs_time_hi=t_hi,
        s_lastcheck_hi=t_hi,
    )
    fmt.seal_superblock(sb)
    return sb


@without_cycle_collection
def write_ext4(tree: Tree, reader: ContentReader, out_fd: int, options: Ext4Options) -> list[str]:
    """Write `tree` as an ext4 image to the fresh file `out_fd`. Returns warnings."""
    label = options.label.encode()
    if len(label) > 16:
        raise WriterError(f"ext4 label {options.label!r} is longer than 16 bytes")
    if options.size is not None and options.size < 0:
        raise WriterError(f"image size {options.size} is negative")
    plan = _plan_inodes(tree, options)
    geo = _geometry(plan, options)
    journal_start, used_end = _allocate(plan, geo)

    # Nothing is written before this point: a too-small --size fails cleanly.
    image_size = options.size if options.size is not None else geo.blocks * fmt.BLOCK_SIZE
    os.ftruncate(out_fd, image_size)
    itable = _InodeTable(out_fd, geo.inode_tables * fmt.BLOCK_SIZE, plan.max_ino)
    jnl_blocks = b""
    if options.journal:  # inode 8: packed first, as the table is written in inode order
        jnl_blocks = _write_journal(plan, journal_start, itable, out_fd)
    warnings = _write_inodes(plan, itable, out_fd, reader)
    itable.flush()
    for xb in plan.xattr_blocks.values():
        block = fmt.xattr_block_body(xb.entries, xb.refcount)
        fmt.seal_xattr_block(block, xb.block, plan.fs_seed)
        pwrite_all(out_fd, block, xb.block * fmt.BLOCK_SIZE)
    free = _write_groups(plan, geo, used_end, out_fd)
    sb = _superblock(plan, geo, options, free, jnl_blocks)
    pwrite_all(out_fd, sb, fmt.SUPERBLOCK_OFFSET)
    return warnings
