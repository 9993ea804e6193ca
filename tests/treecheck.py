"""Compare a flattened `Tree` with a directory an independent tool extracted.

Used by every writer's tests: write an image from a tree, let the format's own
tool (tar, debugfs rdump, fsck.erofs --extract, umoci unpack) put it back on
disk, then check both entry by entry. Each difference is reported by path.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Node, NodeType, Tree

_TYPE_OF_IFMT = {
    stat.S_IFREG: NodeType.FILE,
    stat.S_IFDIR: NodeType.DIR,
    stat.S_IFLNK: NodeType.SYMLINK,
    stat.S_IFCHR: NodeType.CHAR,
    stat.S_IFBLK: NodeType.BLOCK,
    stat.S_IFIFO: NodeType.FIFO,
    stat.S_IFSOCK: NodeType.SOCKET,
}


@dataclass(frozen=True)
class Checks:
    """What to compare; some extractors cannot preserve everything."""

    owner: bool = True
    mode: bool = True
    mtime: bool = False
    xattrs: bool = True
    hardlinks: bool = True
    dir_mode: bool = True


def content_sha256(reader: ContentReader, node: Node) -> str:
    assert node.content is not None
    return hashlib.sha256(reader.read_all(node.content)).hexdigest()


def file_sha256(path: str | bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> dict[bytes, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        out[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
    return out


def compare_tree_with_dir(
    tree: Tree, reader: ContentReader, root: str, checks: Checks = Checks()
) -> list[str]:
    """Return a list of differences (empty when the directory matches the tree)."""
    problems: list[str] = []
    expected_paths: set[bytes] = set()
    inode_of_node: dict[int, tuple[int, int]] = {}
    node_of_inode: dict[tuple[int, int], int] = {}
    rootb = os.fsencode(root)
    for path, node in tree.walk():
        expected_paths.add(path)
        disk = rootb + path if path != b"/" else rootb
        shown = os.fsdecode(path)
        try:
            st = os.lstat(disk)
        except FileNotFoundError:
            problems.append(f"{shown}: missing")
            continue
        kind = _TYPE_OF_IFMT.get(stat.S_IFMT(st.st_mode))
        if kind is not node.type:
            problems.append(f"{shown}: type {kind} != {node.type}")
            continue
        check_mode = checks.mode and (checks.dir_mode or not node.is_dir)
        if (
            check_mode
            and node.type is not NodeType.SYMLINK
            and stat.S_IMODE(st.st_mode) != node.mode
        ):
            problems.append(f"{shown}: mode {stat.S_IMODE(st.st_mode):o} != {node.mode:o}")
        if checks.owner and (st.st_uid, st.st_gid) != (node.uid, node.gid):
            problems.append(f"{shown}: owner {st.st_uid}:{st.st_gid} != {node.uid}:{node.gid}")
        if checks.mtime and node.type is not NodeType.SYMLINK and st.st_mtime_ns != node.mtime_ns:
            problems.append(f"{shown}: mtime {st.st_mtime_ns} != {node.mtime_ns}")
        if node.type is NodeType.FILE:
            if st.st_size != node.size:
                problems.append(f"{shown}: size {st.st_size} != {node.size}")
            elif file_sha256(disk) != content_sha256(reader, node):
                problems.append(f"{shown}: content differs")
        elif node.type is NodeType.SYMLINK:
            if os.readlink(disk) != node.target:
                problems.append(f"{shown}: target {os.readlink(disk)!r} != {node.target!r}")
        elif node.type in (NodeType.CHAR, NodeType.BLOCK):
            got = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if got != node.rdev:
                problems.append(f"{shown}: rdev {got} != {node.rdev}")
        if checks.xattrs and node.type is not NodeType.SYMLINK:
            got_x = _xattrs(disk)
            if got_x != node.xattrs:
                problems.append(f"{shown}: xattrs {got_x} != {node.xattrs}")
        if checks.hardlinks and not node.is_dir:
            key = (st.st_dev, st.st_ino)
            if id(node) in inode_of_node and inode_of_node[id(node)] != key:
                problems.append(f"{shown}: should be a hardlink of an earlier path")
            if key in node_of_inode and node_of_inode[key] != id(node):
                problems.append(f"{shown}: is a hardlink but should not be")
            inode_of_node[id(node)] = key
            node_of_inode[key] = id(node)
    for dirpath, dirnames, filenames in os.walk(rootb):
        for name in dirnames + filenames:
            rel = os.path.join(dirpath, name)[len(rootb) :]
            if rel not in expected_paths:
                problems.append(f"{os.fsdecode(rel)}: unexpected")
    return problems
