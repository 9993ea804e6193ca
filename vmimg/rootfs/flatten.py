"""Layers -> one Tree, following the OCI image-spec layer rules.

For each layer, lowest first:
1. Whiteouts apply first, wherever they stand in the tar: `.wh..wh..opq` in
   a directory hides everything the lower layers put there; `.wh.NAME` hides
   NAME. Whiteouts only ever hide what lower layers made, so applying them
   before the layer's own entries is exactly the spec's meaning.
2. Then every other entry in tar order. A directory over a directory keeps
   the children and takes the new attributes; anything else replaces what
   was at that path (a later duplicate within a layer wins too).

Nothing is extracted. A path with ".." is an error naming the layer and
entry; absolute paths are taken relative to the root, as tar does. A parent
component that is a symlink is resolved *inside* the tree (never on the
host), the way container runtimes extract layers, so a symlink pointing
"outside" just points at another place in the root.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from vmimg.errors import LayerError, TreeError
from vmimg.image.layers import Entry, LayerFile, load_entries
from vmimg.image.tarparse import ENTRY_SLOTS
from vmimg.rootfs._flatten import apply_files as _c_apply_files
from vmimg.rootfs.tree import (
    CONTENT_SLOTS,
    NO_RDEV,
    NODE_SLOTS,
    PATH_MAX,
    SYMLINK_MODE,
    Content,
    Node,
    NodeType,
    Tree,
    file_node,
    split_path,
    without_cycle_collection,
)

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
MAX_SYMLINK_HOPS = 40  # as the kernel's MAXSYMLINKS
IMPLICIT_DIR_MODE = 0o755
NAME_MAX = 255  # bytes in one name: Linux's limit, and ext4's and erofs's
SYMLINK_MAX = 4095  # bytes in a symlink target: PATH_MAX less its NUL
SHOWN_NAME_MAX = 300  # bytes of an entry name an error message quotes (NAME_MAX fits)
# The xattrs of every node that has none: one dict, not one per node. Nodes' xattrs are
# replaced, never changed in place (the Tree contract), so sharing it is safe.
_NO_XATTRS: dict[bytes, bytes] = {}

# Enum members looked up once: NodeType.FILE is a slow metaclass lookup, once per entry.
_FILE = NodeType.FILE
_DIR = NodeType.DIR
_SYMLINK = NodeType.SYMLINK
# The last component of an entry name that is not the name of a new entry in the
# directory before it ("a/b/", "a/b/.", "a/b/.."): split_path decides what those mean.
_NOT_NAMES = (b"", b".", b"..")
# Types a path resolution goes through: replacing one may make a remembered one wrong.
_ROUTING_TYPES = frozenset((_DIR, _SYMLINK))

# Applies the plain regular files and directories in known directories at the end of a
# layer's reversed entries, as apply_entry would (_flatten.c), remembering each directory as
# _remember_dir does. None: apply_entry applies every entry, the way the tests check both
# make the same trees and errors.
_apply_files: Callable[[list[Entry], dict[bytes, tuple[Node, int]], dict[int, int], str,
                        tuple[Any, ...]], int] | None = _c_apply_files  # fmt: skip

_NODE_TYPE = {
    tarfile.REGTYPE: NodeType.FILE,
    tarfile.AREGTYPE: NodeType.FILE,
    tarfile.CONTTYPE: NodeType.FILE,
    tarfile.GNUTYPE_SPARSE: NodeType.FILE,
    tarfile.DIRTYPE: NodeType.DIR,
    tarfile.SYMTYPE: NodeType.SYMLINK,
    tarfile.CHRTYPE: NodeType.CHAR,
    tarfile.BLKTYPE: NodeType.BLOCK,
    tarfile.FIFOTYPE: NodeType.FIFO,
}


class _Flattener:
    def __init__(self) -> None:
        self.tree = Tree(Node(_DIR, mode=IMPLICIT_DIR_MODE))
        # Parent directories already resolved, by the directory part of entry names as
        # written (all before the last "/"): the directory, and the longest its path and
        # that part as written may be before a name (what PATH_MAX bounds). Entries of a
        # layer share parents, and resolving a 2000-level path per entry would cost
        # depth x entries; an entry whose parent is here is not even split. Valid until a
        # directory or symlink (what a resolution goes through) is replaced or removed:
        # then it is emptied.
        self.parents: dict[bytes, tuple[Node, int]] = {}
        # One int object per distinct mtime (most entries of a layer share a few): a
        # nanosecond time is a 32-byte object of its own otherwise, per node.
        self.times: dict[int, int] = {}

    def _put(self, directory: Node, name: bytes, node: Node) -> None:
        assert directory.children is not None
        old = directory.children.get(name)
        if old is not None and old.type in _ROUTING_TYPES:
            self.parents.clear()
        directory.children[name] = node

    # -- path resolution inside the tree --------------------------------------

    def _resolve_dir(
        self, parts: list[bytes], create_mtime: int | None = None
    ) -> tuple[Node, int] | None:
        """The directory at `parts`, following symlinks *inside* the tree, and the
        length of its path from the root (what PATH_MAX bounds).

        ".." stops at the root, as it does for a chrooted process. With
        `create_mtime`, missing directories are created (and a non-directory
        in the way is replaced, as tar does); otherwise a missing one gives None.
        No directory is ever made deeper than PATH_MAX, whatever symlinks lead there.
        """
        stack: list[Node] = [self.tree.root]
        lengths: list[int] = [0]  # path length of each directory on the stack
        pending = list(reversed(parts))
        hops = 0
        while pending:
            name = pending.pop()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                    lengths.pop()
                continue
            node = stack[-1]
            assert node.children is not None
            child = node.children.get(name)
            if child is not None and child.type is _SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise TreeError("too many levels of symbolic links")
                assert child.target is not None
                if child.target.startswith(b"/"):
                    del stack[1:]
                    del lengths[1:]
                pending.extend(reversed(child.target.split(b"/")))
                continue
            length = _joined_length(lengths[-1], name)
            if child is None or child.type is not _DIR:
                if create_mtime is None:
                    return None
                _check_path_length(length)
                child = Node(_DIR, mode=IMPLICIT_DIR_MODE, mtime_ns=create_mtime)
                self._put(node, name, child)
            stack.append(child)
            lengths.append(length)
        return stack[-1], lengths[-1]

    # -- whiteouts -------------------------------------------------------------

    def apply_whiteout(self, e: Entry) -> None:
        """Apply `e` if it is a whiteout (to what the lower layers made)."""
        parts = split_path(e.name)
        if not parts or not parts[-1].startswith(WHITEOUT_PREFIX):
            return
        name = parts[-1]
        hidden = name[len(WHITEOUT_PREFIX) :]
        if hidden in (b"", b".", b".."):
            raise TreeError("invalid whiteout")  # checked first: where it stands is no excuse
        found = self._resolve_dir(parts[:-1])
        if found is None:
            return  # whiting out inside a directory that is not there
        directory = found[0]
        assert directory.children is not None
        if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX) and name != OPAQUE_MARKER:
            return  # other aufs metadata (.wh..wh.plnk ...): not content
        self.parents.clear()
        if name == OPAQUE_MARKER:
            directory.children.clear()
        else:
            directory.children.pop(hidden, None)

    # -- entries ---------------------------------------------------------------

    def apply_entry(self, e: Entry, tar_path: str) -> None:
        """Apply the non-whiteout entry `e` of the layer tar `tar_path`."""
        # The common case first, checked as _place does: the parent is known.
        head, _, name = e.name.rpartition(b"/")
        known = self.parents.get(head)
        if known is None or name in _NOT_NAMES:
            placed = self._place(e)
            if placed is None:
                return
            parent, name = placed
            known = self.parents.get(head)  # remembered by _place where `name` split plainly
        else:
            parent, bound = known
            if name.startswith(WHITEOUT_PREFIX):
                return  # applied before (apply_whiteout)
            if len(name) > NAME_MAX:
                raise TreeError(f"a name longer than {NAME_MAX} bytes")
            _check_path_length(bound + len(name))
        kind = _NODE_TYPE.get(e.type)
        if kind is _FILE:
            node = file_node(
                e.mode & 0o7777,
                e.uid,
                e.gid,
                self.times.setdefault(e.mtime_ns, e.mtime_ns),
                dict(e.xattrs) if e.xattrs else _NO_XATTRS,
                e.size,
                tar_path,
                e.offset,
                e.sparse,
            )
        else:
            other = self._other_node(e, kind, parent, name)
            if other is not None:
                self._put(parent, name, other)
            if kind is _DIR:
                self._remember_dir(e.name, parent, name, known)
            return
        self._put(parent, name, node)

    def _remember_dir(
        self, path: bytes, parent: Node, name: bytes, known: tuple[Node, int] | None
    ) -> None:
        """After a directory entry: the entries inside it name it by `path` as their head,
        so remember where it is (and its path's bound) for them, as _place would when the
        first of them came; most then take C's way (apply_files) from their first on.
        apply_files does the same for the directory entries it applies itself."""
        if known is None or known[0] is not parent:
            return  # its head did not split plainly (`a//b`, `./a`): _place will see
        assert parent.children is not None
        directory = parent.children.get(name)
        if directory is not None and directory.type is _DIR:
            self.parents[path] = (directory, known[1] + len(name) + 1)

    def _place(self, e: Entry) -> tuple[Node, bytes] | None:
        """Where the entry `e` goes: its parent directory, made if missing, and its name;
        None if it goes nowhere (a whiteout, or the root's own attributes, set here).
        Its parent is remembered for the entries that follow."""
        parts = split_path(e.name)
        if not parts:
            if e.type == tarfile.DIRTYPE:
                self._set_attrs(self.tree.root, e)
            return None
        name = parts[-1]
        if name.startswith(WHITEOUT_PREFIX):
            return None  # applied before (apply_whiteout)
        if max(map(len, parts)) > NAME_MAX:
            raise TreeError(f"a name longer than {NAME_MAX} bytes")
        dirs = parts[:-1]
        # Checked before anything is made: the path as written, then where it lands.
        written = sum(map(len, dirs)) + len(dirs)  # its directory part and a "/"
        _check_path_length(written + len(name))
        found = self._resolve_dir(dirs, create_mtime=e.mtime_ns)
        assert found is not None
        parent, parent_length = found
        bound = max(written, _joined_length(parent_length, b""))
        _check_path_length(bound + len(name))
        head, _, last = e.name.rpartition(b"/")
        if last == name:  # `head` split is `dirs`: entries with this head go where e went
            self.parents[head] = (parent, bound)
        return parent, name

    def _other_node(
        self, e: Entry, kind: NodeType | None, parent: Node, name: bytes
    ) -> Node | None:
        """The node for `e`, anything but a regular file (`kind`: its type, None for a
        hardlink or an unsupported type); None if it only changes the directory there."""
        if e.type == tarfile.LNKTYPE:
            return self._hardlink_target(e)
        if kind is None:
            raise TreeError(f"unsupported tar entry type {e.type!r}")
        assert parent.children is not None
        existing = parent.children.get(name)
        if kind is _DIR and existing is not None and existing.type is _DIR:
            self._set_attrs(existing, e)
            return None
        mtime_ns = self.times.setdefault(e.mtime_ns, e.mtime_ns)
        xattrs = dict(e.xattrs) if e.xattrs else _NO_XATTRS
        node = Node(kind, e.mode & 0o7777, e.uid, e.gid, mtime_ns, xattrs)
        if kind is _SYMLINK:
            if not e.linkname:
                raise TreeError("symlink with an empty target")
            if len(e.linkname) > SYMLINK_MAX:
                raise TreeError(f"symlink target longer than {SYMLINK_MAX} bytes")
            node.target = e.linkname
        elif kind in (NodeType.CHAR, NodeType.BLOCK):
            node.rdev = (e.devmajor, e.devminor)
        return node

    def _hardlink_target(self, e: Entry) -> Node:
        target_parts = split_path(e.linkname)
        found = self._resolve_dir(target_parts[:-1]) if target_parts else None
        directory = found[0] if found is not None else None
        target = None
        if directory is not None and directory.children is not None:
            target = directory.children.get(target_parts[-1])
        if target is None:
            raise TreeError(f"hardlink to missing {os.fsdecode(e.linkname)!r}")
        if target.type is _DIR:
            raise TreeError(f"hardlink to directory {os.fsdecode(e.linkname)!r}")
        return target

    def _set_attrs(self, node: Node, e: Entry) -> None:
        node.mode = SYMLINK_MODE if node.type is _SYMLINK else e.mode & 0o7777
        node.uid = e.uid
        node.gid = e.gid
        node.mtime_ns = self.times.setdefault(e.mtime_ns, e.mtime_ns)
        node.xattrs = dict(e.xattrs) if e.xattrs else _NO_XATTRS


# What _flatten.apply_files makes nodes of, and the limits it checks (see _flatten.c)
_SHAPES = (Entry, ENTRY_SLOTS, Node, NODE_SLOTS, Content, CONTENT_SLOTS, _FILE, _DIR,
           _NO_XATTRS, NO_RDEV, NAME_MAX, PATH_MAX)  # fmt: skip


def _joined_length(parent_length: int, name: bytes) -> int:
    """Length of the path of `name` in a directory whose path is `parent_length` long."""
    return parent_length + (1 if parent_length else 0) + len(name)


def _check_path_length(length: int) -> None:
    if length > PATH_MAX:
        raise TreeError(f"path longer than {PATH_MAX} bytes")


def shown_name(name: bytes) -> str:
    """An entry name for an error message: long ones cut, their length said."""
    if len(name) <= SHOWN_NAME_MAX:
        return repr(os.fsdecode(name))
    return f"{os.fsdecode(name[:SHOWN_NAME_MAX])!r}... ({len(name)} bytes)"


_entry_name = attrgetter("name")


def _whiteouts(entries: list[Entry]) -> list[Entry]:
    """The layer's whiteout entries, in order. Most layers have none, which one search over
    all the names joined shows at C's speed (8 ms for 100,000 entries, where testing each
    entry's name took 23)."""
    if WHITEOUT_PREFIX not in b"/".join(map(_entry_name, entries)):
        return []
    return [e for e in entries if WHITEOUT_PREFIX in e.name]


@without_cycle_collection
def flatten(layers: list[LayerFile]) -> Tree:
    """Flatten layer tars, lowest first, into one Tree."""
    f = _Flattener()
    for layer in layers:
        entries = layer.entries
        layer.entries = None  # handed over: let go below as applied (a later flatten reparses)
        if entries is None:
            entries = load_entries(layer.tar_path, f"layer {layer.name}")
        try:
            for e in _whiteouts(entries):
                f.apply_whiteout(e)
            # Each entry is let go once applied: the tree grows into the memory the
            # layer's entries held, rather than beside it.
            entries.reverse()
            tar_path = layer.tar_path
            while entries:
                # Most entries are plain files and directories in directories met before:
                # C applies those, and hands back the first that is anything else (a
                # whiteout, a name that climbs or fails a limit, an unknown parent, a
                # directory over a file, a link...)
                if _apply_files is not None:
                    _apply_files(entries, f.parents, f.times, tar_path, _SHAPES)
                    if not entries:
                        break
                e = entries.pop()
                f.apply_entry(e, tar_path)
        except TreeError as err:
            raise LayerError(f"layer {layer.name}: entry {shown_name(e.name)}: {err}") from None
        del entries
    return f.tree
