"""A pure-Python reference for the C loops of the erofs writer,
vmimg/rootfs/writers/erofs/_erofsmeta.c: the same contracts, written plainly (these are the
writer's loops as they were in Python), as the oracle the C code is checked against
(tests/writers/test_erofsmeta.py)."""

from __future__ import annotations

import bisect
import collections
import itertools
import os
from collections.abc import Callable
from typing import Any

from vmimg.errors import WriterError
from vmimg.rootfs.tree import NodeType
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


def collect(
    root: Any,
    fields: tuple[Any, ...],
    defaults: tuple[Any, ...],
    dir_type: Any,
    name_len_max: int,
    bad_name: Callable[[bytes, Any], object],
) -> tuple[list[Any], list[Any]]:
    """The inodes of the tree under root's node, in inode order, and the directories
    among them: the writer's _collect_inodes as it was in Python. `fields`: the inode
    class's slot descriptors, node, name, up, ino, nlink, names, targets first."""
    node_f, _, _, ino_f, nlink_f, names_f, targets_f = fields[:7]
    cls = type(root)

    def new_inode(node: Any, name: bytes, up: Any, ino: int) -> Any:
        inode = cls.__new__(cls)
        for field, value in zip(fields[:4], (node, name, up, ino), strict=True):
            field.__set__(inode, value)
        for field, value in zip(fields[5:], defaults, strict=True):
            field.__set__(inode, value)
        nlink_f.__set__(inode, 1)
        return inode

    nlink_f.__set__(root, 1)
    index_of = {id(node_f.__get__(root)): 0}
    inodes, directories = [root], [root]
    stack = [(root, 0)]
    while stack:
        directory, parent = stack.pop()
        children = node_f.__get__(directory).children
        names = sorted(children)
        for name in names:
            if not 0 < len(name) <= name_len_max or b"/" in name or b"\0" in name:
                bad_name(name, directory)
                raise ValueError("bad_name did not raise")
        targets, subdirs, child_dirs = [], [], 0
        for name in names:
            child = children[name]
            is_dir = child.type is dir_type
            child_dirs += is_dir
            at = index_of.setdefault(id(child), len(inodes))
            if at == len(inodes):
                inode = new_inode(child, name, directory, at + 1)
                inodes.append(inode)
                if is_dir:
                    directories.append(inode)
                    subdirs.append(inode)
            else:
                nlink_f.__set__(inodes[at], nlink_f.__get__(inodes[at]) + 1)
            targets.append(at)
        here = ino_f.__get__(directory) - 1
        for name, target in ((b".", here), (b"..", parent)):
            at = bisect.bisect_right(names, name)
            names.insert(at, name)
            targets.insert(at, target)
        names_f.__set__(directory, names)
        targets_f.__set__(directory, targets)
        nlink_f.__set__(directory, nlink_f.__get__(directory) + 1 + child_dirs)
        stack.extend([(subdir, here) for subdir in reversed(subdirs)])
    return inodes, directories


def decide_versions(inodes: list[Any], build_time_ns: int) -> None:
    """Each inode's size, compact or extended, head size, and a device's number: the
    writer's _decide_inode_versions as it was in Python (C's decide_versions, with the
    inodes it hands back decided by the writer's _decide_version)."""
    for inode in inodes:
        node = inode.node
        if node.type is NodeType.FILE:
            assert node.content is not None
            inode.size = node.content.size
        elif node.type is not NodeType.DIR:
            inode.size = node.size
            if node.type in (NodeType.CHAR, NodeType.BLOCK):
                major, minor = node.rdev
                if not (0 <= major <= fmt.DEV_MAJOR_MAX and 0 <= minor <= fmt.DEV_MINOR_MAX):
                    path = os.fsdecode(inode.path)
                    raise WriterError(f"device number {major}:{minor} of {path!r}")
                inode.i_u = fmt.encode_dev(major, minor)
        uid, gid = node.uid, node.gid
        if not (0 <= uid <= fmt.EXTENDED_ID_MAX and 0 <= gid <= fmt.EXTENDED_ID_MAX):
            raise WriterError(f"owner {uid}:{gid} of {os.fsdecode(inode.path)!r} too large")
        inode.extended = (
            uid > fmt.COMPACT_ID_MAX
            or gid > fmt.COMPACT_ID_MAX
            or inode.nlink > fmt.COMPACT_NLINK_MAX
            or inode.size > fmt.COMPACT_SIZE_MAX
            or node.mtime_ns != build_time_ns
        )
        inode_size = fmt.EXTENDED_INODE_SIZE if inode.extended else fmt.COMPACT_INODE_SIZE
        inode.head_size = inode_size + len(inode.xattr_ibody)


def place_plain(
    inodes: list[Any], next_block: int, block_size: int
) -> tuple[int, list[tuple[int, int, int]]]:
    """Each file and symlink stored uncompressed from block `next_block` on: the writer's
    _DataArea.place_plain over them as it was in Python. Returns the next free block and
    the copies made, in order: (index, offset in the image, length from the data's start)."""
    copies = []
    for index, inode in enumerate(inodes):
        if inode.node.type not in (NodeType.FILE, NodeType.SYMLINK):
            continue
        size = inode.size
        full, tail = divmod(size, block_size)
        inline = 0 < tail <= block_size - inode.head_size
        nblocks = full if inline or not tail else full + 1
        inode.datalayout = fmt.INODE_FLAT_INLINE if inline else fmt.INODE_FLAT_PLAIN
        inode.inline_len = tail if inline else 0
        inode.i_u = next_block if nblocks else 0
        written = size if nblocks > full else full * block_size
        if written:
            copies.append((index, next_block * block_size, written))
        next_block += nblocks
    return next_block, copies


def write_inodes(meta: bytearray, inodes: list[Any], nids: list[int], base: int) -> None:
    """Each inode as format.py's dataclasses pack it, at nid * 32 - base in `meta`; its
    xattr ibody at the end of its head; a compressed file's indexes after that: the
    writer's _write_inodes as it was in Python."""
    for inode, nid in zip(inodes, nids, strict=True):
        node = inode.node
        offset = nid * fmt.INODE_SLOT_SIZE - base
        xattrs = inode.xattr_ibody
        fields = {
            "datalayout": inode.datalayout,
            "xattr_icount": fmt.xattr_icount(len(xattrs)),
            "mode": node.st_mode,
            "nlink": inode.nlink,
            "size": inode.size,
            "i_u": inode.i_u,
            "ino": inode.ino,
            "uid": node.uid,
            "gid": node.gid,
        }
        if inode.extended:
            mtime, mtime_nsec = divmod(node.mtime_ns, 1_000_000_000)
            raw = fmt.InodeExtended(**fields, mtime=mtime, mtime_nsec=mtime_nsec).pack()
        else:
            raw = fmt.InodeCompact(**fields).pack()
        if not 0 <= offset <= len(meta) - len(raw):
            raise IndexError("an inode falls outside the meta area")
        meta[offset : offset + len(raw)] = raw
        at = offset + inode.head_size
        meta[at - len(xattrs) : at] = xattrs
        if inode.compressed is not None:
            body = inode.compressed.metadata(inode.head_size)
            meta[at : at + len(body)] = body


def write_tails(
    meta: bytearray,
    inodes: list[Any],
    nids: list[int],
    read_all: Callable[[Any], bytes],
    base: int,
    file_type: Any,
    symlink_type: Any,
) -> None:
    """Each file's and symlink's inline tail (the last inline_len bytes of its logical
    content, `read_all(content)`, or of its target) right after its inode and xattrs: the
    writer's _write_tails as it was in Python, one tail at a time."""
    for inode, nid in zip(inodes, nids, strict=True):
        inline = inode.inline_len
        node = inode.node
        if not inline or node.type not in (file_type, symlink_type):
            continue
        data = read_all(node.content) if node.type is file_type else node.target
        tail = data[inode.size - inline :]
        at = nid * fmt.INODE_SLOT_SIZE + inode.head_size - base
        if not 0 <= at <= len(meta) - len(tail):
            raise IndexError("a tail falls outside the meta area")
        meta[at : at + len(tail)] = tail


def survey(
    inodes: list[Any], file_type_of: dict[Any, int]
) -> tuple[dict[Any, int], bytes, list[int]]:
    """Per inode, in order: its mtime counted if not before 1970 (as collections.Counter
    counts: the first key given stays), its dirent file type, and its place if its xattrs
    are anything but an empty dict: the writer's _survey. (The writer also lists the places
    of the inodes C leaves to its Python, whatever their xattrs: _assign_xattrs looks.)"""
    counts: dict[Any, int] = {}
    file_types = bytearray()
    with_xattrs = []
    for at, inode in enumerate(inodes):
        node = inode.node
        if node.mtime_ns >= 0:
            counts[node.mtime_ns] = counts.get(node.mtime_ns, 0) + 1
        file_types.append(file_type_of[node.type])
        if type(node.xattrs) is not dict or node.xattrs:
            with_xattrs.append(at)
    return counts, bytes(file_types), with_xattrs


def most_common_mtime(inodes: list[Any]) -> int:
    """The most common mtime not before 1970, the smallest of those tied, 0 if none: the
    writer's _most_common_mtime as it was, over the inodes."""
    counts = collections.Counter(i.node.mtime_ns for i in inodes if i.node.mtime_ns >= 0)
    if not counts:
        return 0
    best = max(counts.values())
    return min(t for t, n in counts.items() if n == best)


def assign_xattrs(inodes: list[Any], xattr_key: Callable[[Any, bytes, bytes], Any]) -> bytes:
    """Each inode's xattr ibody, and the shared table: the writer's _assign_xattrs as it
    was, looking at every inode (`xattr_key`: the writer's _xattr_key, unchanged)."""
    keys = {
        id(i): [xattr_key(i, n, v) for n, v in i.node.xattrs.items()]
        for i in inodes
        if i.node.xattrs
    }
    usage = collections.Counter(k for ks in keys.values() for k in ks)
    table = bytearray()
    shared_id: dict[Any, int] = {}
    for key in sorted(k for k, n in usage.items() if n > 1):
        shared_id[key] = len(table) // fmt.XATTR_ALIGN
        table += fmt.XattrEntry(*key).pack()
    for inode in inodes:
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


def meta_sizes(inodes: list[Any]) -> tuple[list[int], bool]:
    """Each inode's meta_size (a compressed file's from its indexes), and whether any inode
    is compressed: the writer's two passes as they were."""
    sizes = [i.meta_size for i in inodes]
    return sizes, any(i.compressed is not None for i in inodes)


def plan_dirents(directories: list[Any], dirent_size: int, block_size: int) -> None:
    """Each directory's entries split into blocks (block_starts) and its size: the writer's
    _plan_dirents as it was, over every directory in order."""
    for inode in directories:
        names = inode.names
        used = dirent_size * len(names) + sum(map(len, names))
        starts = [0]
        if used > block_size:
            used = 0
            for i, name in enumerate(names):
                need = dirent_size + len(name)
                if used + need > block_size:
                    starts.append(i)
                    used = 0
                used += need
        inode.block_starts = starts
        inode.size = (len(starts) - 1) * block_size + used
