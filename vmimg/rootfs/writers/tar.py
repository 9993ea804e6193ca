"""The flattened root as one deterministic POSIX (pax) tar.

Entries come in Tree.walk() order, the root first as "./". A node reached a
second time is written as a hardlink to its first path. Nanosecond mtimes
and xattrs (SCHILY.xattr.*) travel in pax records. Sparse files are written
whole; their holes stay holes in the output file (the tar reads as zeros).
"""

from __future__ import annotations

import os
import tarfile

from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import NS_PER_S, Node, NodeType, Tree
from vmimg.rootfs.writers.options import TarOptions as TarOptions  # also importable from here

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = 2 * BLOCK
PAX_XATTR_PREFIX = "SCHILY.xattr."
USTAR_MTIME_LIMIT = 8**11  # the header's 12-byte octal field holds 0 up to this, exclusive

_TAR_TYPE = {
    NodeType.FILE: tarfile.REGTYPE,
    NodeType.DIR: tarfile.DIRTYPE,
    NodeType.SYMLINK: tarfile.SYMTYPE,
    NodeType.CHAR: tarfile.CHRTYPE,
    NodeType.BLOCK: tarfile.BLKTYPE,
    NodeType.FIFO: tarfile.FIFOTYPE,
}


def _str(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def tar_name(path: bytes, node: Node) -> str:
    if path == b"/":
        return "./"
    name = _str(path.lstrip(b"/"))
    return name + "/" if node.is_dir else name


def pax_time(ns: int) -> str:
    """A time as PAX writes it: exact decimal seconds, sign first ("-1.5", never "-2.5")."""
    secs, frac = divmod(abs(ns), NS_PER_S)
    text = f"{'-' if ns < 0 else ''}{secs}"
    return f"{text}.{frac:09d}".rstrip("0") if frac else text


def header(path: bytes, node: Node, hardlink_to: str | None) -> bytes:
    """The tar header block(s) for one entry."""
    info = tarfile.TarInfo(tar_name(path, node))
    info.mode = node.permissions
    info.uid, info.gid = node.uid, node.gid
    info.uname = info.gname = ""
    secs = node.mtime_ns // NS_PER_S
    in_header = 0 <= secs < USTAR_MTIME_LIMIT
    info.mtime = secs if in_header else 0
    pax: dict[str, str] = {}
    if node.mtime_ns % NS_PER_S or not in_header:
        pax["mtime"] = pax_time(node.mtime_ns)
    for key, value in sorted(node.xattrs.items()):
        pax[PAX_XATTR_PREFIX + _str(key)] = _str(value)
    if hardlink_to is not None:
        info.type = tarfile.LNKTYPE
        info.linkname = hardlink_to
    else:
        if node.type is NodeType.SOCKET:
            raise ValueError("sockets cannot be stored in tar")
        info.type = _TAR_TYPE[node.type]
        if node.type is NodeType.FILE:
            info.size = node.size
        elif node.type is NodeType.SYMLINK:
            assert node.target is not None
            info.linkname = _str(node.target)
        elif node.type in (NodeType.CHAR, NodeType.BLOCK):
            info.devmajor, info.devminor = node.rdev
    info.pax_headers = pax
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_tar(tree: Tree, reader: ContentReader, out_fd: int, options: TarOptions) -> list[str]:
    """Write the tree as a tar to `out_fd` from offset 0. Returns warnings (skipped sockets)."""
    warnings: list[str] = []
    first_path: dict[int, str] = {}
    pos = 0
    for path, node in tree.walk():
        if node.type is NodeType.SOCKET:
            warnings.append(f"{os.fsdecode(path)}: sockets cannot be stored in tar; skipped")
            continue
        link = first_path.get(id(node)) if not node.is_dir else None
        hdr = header(path, node, link)
        os.pwrite(out_fd, hdr, pos)
        pos += len(hdr)
        if link is None and not node.is_dir:
            first_path[id(node)] = tar_name(path, node)
        if link is None and node.type is NodeType.FILE:
            assert node.content is not None
            reader.write_logical(node.content, out_fd, pos)
            pos += -(-node.size // BLOCK) * BLOCK
    pos += END_OF_ARCHIVE
    os.ftruncate(out_fd, pos)  # the zero blocks at the end (and any hole) read as zeros
    return warnings
