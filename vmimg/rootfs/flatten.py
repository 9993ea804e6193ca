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

from vmimg.errors import LayerError, TreeError
from vmimg.image.layers import Entry, LayerFile, load_entries
from vmimg.rootfs.tree import (
    PATH_MAX,
    SYMLINK_MODE,
    Content,
    Node,
    NodeType,
    Tree,
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
        self.tree = Tree(Node(NodeType.DIR, mode=IMPLICIT_DIR_MODE))
        # Parent directories already resolved, by their path as written: entries of a
        # layer share parents, and resolving a 2000-level path per entry would cost
        # depth x entries. Valid until an entry is replaced or removed (it may have been
        # a directory or symlink such a resolution went through): then it is emptied.
        self._parents: dict[bytes, tuple[Node, int]] = {}
        # One int object per distinct mtime (most entries of a layer share a few): a
        # nanosecond time is a 32-byte object of its own otherwise, per node.
        self._times: dict[int, int] = {}
        # Entry names split before, by their directory part as written: that part's
        # components joined and its longest component. Pure functions of the bytes, so
        # never stale: an entry whose directory part is here is not split again (a path
        # may have 2048 components, and most entries share their directory).
        self._heads: dict[bytes, tuple[bytes, int]] = {}

    def _put(self, directory: Node, name: bytes, node: Node) -> None:
        assert directory.children is not None
        if directory.children.get(name) is not None:
            self._parents.clear()
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
            if child is not None and child.type is NodeType.SYMLINK:
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
            if child is None or not child.is_dir:
                if create_mtime is None:
                    return None
                _check_path_length(length)
                child = Node(NodeType.DIR, mode=IMPLICIT_DIR_MODE, mtime_ns=create_mtime)
                self._put(node, name, child)
            stack.append(child)
            lengths.append(length)
        return stack[-1], lengths[-1]

    # -- whiteouts -------------------------------------------------------------

    def _split(self, name: bytes) -> tuple[bytes, bytes, int] | None:
        """(directory part joined, last component, longest component) of an entry name
        whose directory part was split before and whose last component is a plain name;
        None for any other (split_path is the judge of those)."""
        head, _, last = name.rpartition(b"/")
        known = self._heads.get(head)
        if known is None or last in (b"", b".", b".."):
            return None
        return known[0], last, max(known[1], len(last))

    def _split_slowly(self, name: bytes) -> list[bytes]:
        parts = split_path(name)
        head, _, last = name.rpartition(b"/")
        if parts and last == parts[-1] and last not in (b".", b".."):
            self._heads[head] = (b"/".join(parts[:-1]), max(map(len, parts[:-1]), default=0))
        return parts

    def apply_whiteout(self, e: Entry) -> None:
        """Apply `e` if it is a whiteout (to what the lower layers made)."""
        if WHITEOUT_PREFIX not in e.name:
            return  # most entries: no need to split the path
        parts = self._split_slowly(e.name)
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
        self._parents.clear()
        if name == OPAQUE_MARKER:
            directory.children.clear()
        else:
            directory.children.pop(hidden, None)

    # -- entries ---------------------------------------------------------------

    def apply_entry(self, e: Entry, layer: LayerFile) -> None:
        split = self._split(e.name)
        if split is None:
            parts = self._split_slowly(e.name)
            if not parts:
                if e.type == tarfile.DIRTYPE:
                    self._set_attrs(self.tree.root, e)
                return
            split = b"/".join(parts[:-1]), parts[-1], max(map(len, parts))
        written, name, longest = split
        if name.startswith(WHITEOUT_PREFIX):
            return  # handled in apply_whiteouts
        if longest > NAME_MAX:
            raise TreeError(f"a name longer than {NAME_MAX} bytes")
        # Checked before anything is made: the path as written, then (below) where it lands.
        _check_path_length(_joined_length(len(written), name))
        found = self._parents.get(written)
        if found is None:
            found = self._resolve_dir(split_path(written), create_mtime=e.mtime_ns)
            assert found is not None
            self._parents[written] = found
        parent, parent_length = found
        assert parent.children is not None
        _check_path_length(_joined_length(parent_length, name))
        if e.type == tarfile.LNKTYPE:
            self._put(parent, name, self._hardlink_target(e))
            return
        kind = _NODE_TYPE.get(e.type)
        if kind is None:
            raise TreeError(f"unsupported tar entry type {e.type!r}")
        existing = parent.children.get(name)
        if kind is NodeType.DIR and existing is not None and existing.is_dir:
            self._set_attrs(existing, e)
            return
        mtime_ns = self._times.setdefault(e.mtime_ns, e.mtime_ns)
        xattrs = dict(e.xattrs) if e.xattrs else _NO_XATTRS
        if kind is NodeType.FILE:
            content = Content(e.size, layer.tar_path, e.offset, None, e.sparse)
            node = Node(kind, e.mode & 0o7777, e.uid, e.gid, mtime_ns, xattrs, content=content)
            self._put(parent, name, node)
            return
        node = Node(kind, e.mode & 0o7777, e.uid, e.gid, mtime_ns, xattrs)
        if kind is NodeType.SYMLINK:
            if not e.linkname:
                raise TreeError("symlink with an empty target")
            if len(e.linkname) > SYMLINK_MAX:
                raise TreeError(f"symlink target longer than {SYMLINK_MAX} bytes")
            node.target = e.linkname
        elif kind in (NodeType.CHAR, NodeType.BLOCK):
            node.rdev = (e.devmajor, e.devminor)
        self._put(parent, name, node)

    def _hardlink_target(self, e: Entry) -> Node:
        target_parts = split_path(e.linkname)
        found = self._resolve_dir(target_parts[:-1]) if target_parts else None
        directory = found[0] if found is not None else None
        target = None
        if directory is not None and directory.children is not None:
            target = directory.children.get(target_parts[-1])
        if target is None:
            raise TreeError(f"hardlink to missing {os.fsdecode(e.linkname)!r}")
        if target.is_dir:
            raise TreeError(f"hardlink to directory {os.fsdecode(e.linkname)!r}")
        return target

    def _set_attrs(self, node: Node, e: Entry) -> None:
        node.mode = SYMLINK_MODE if node.type is NodeType.SYMLINK else e.mode & 0o7777
        node.uid = e.uid
        node.gid = e.gid
        node.mtime_ns = self._times.setdefault(e.mtime_ns, e.mtime_ns)
        node.xattrs = dict(e.xattrs) if e.xattrs else _NO_XATTRS


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
            for e in entries:
                f.apply_whiteout(e)
            # Each entry is let go once applied: the tree grows into the memory the
            # layer's entries held, rather than beside it.
            entries.reverse()
            while entries:
                e = entries.pop()
                f.apply_entry(e, layer)
        except TreeError as err:
            raise LayerError(f"layer {layer.name}: entry {shown_name(e.name)}: {err}") from None
        del entries
    return f.tree
