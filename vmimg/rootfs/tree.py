"""The flattened root tree: what every writer is fed.

A `Tree` is an in-memory directory hierarchy of `Node`s. It holds metadata and
*references* to file content (`Content`), never the content itself, so memory
grows with the number of entries, not with the bytes of the image.

Names and paths are `bytes`: container layers may carry names that are not
valid UTF-8, and ordering "by path bytes" is the contract that keeps every
writer deterministic.

Hardlinks are modelled the way a file system does it: two directory entries
that hold the *same* `Node` object. `Tree.link_counts()` gives the link count
of each node, and writers recognise a hardlink by node identity.
"""

from __future__ import annotations

import enum
import functools
import gc
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import ParamSpec, TypeVar, cast

from vmimg.errors import TreeError
from vmimg.image.layers import MAX_TIME_NS as MAX_TIME_NS
from vmimg.image.layers import MIN_TIME_NS as MIN_TIME_NS
from vmimg.image.layers import NS_PER_S as NS_PER_S
from vmimg.image.layers import Extent
from vmimg.rootfs._slots import file_sizes
from vmimg.rootfs._slots import new as _c_new

# Builds slotted objects without __init__ (file_node). None: the classes' __init__ does,
# the way the tests check both make the same nodes.
_new_slotted: Callable[..., object] | None = _c_new

PATH_MAX = 4096  # bytes in a path below the root (Linux's PATH_MAX): deeper trees are refused
SYMLINK_MODE = 0o777  # Linux gives every symlink these permissions, whatever a layer says


_P = ParamSpec("_P")
_R = TypeVar("_R")


def without_cycle_collection(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `func` with Python's cyclic garbage collector paused (as it was, after).

    Building a tree, or an image from one, makes a million objects that hold no cycles;
    the collector would walk all of them again each time the heap grows by a quarter,
    which is a good part of the time such work takes. Memory is freed by reference
    counting all the same."""

    @functools.wraps(func)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return func(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused


class NodeType(enum.Enum):
    """File types, in the order a directory listing conventionally names them."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"

    # Members are singletons: hash them by identity, in C. Enum's own __hash__ is Python
    # code, and writers look a type up in a table once per entry.
    __hash__ = object.__hash__

    @property
    def st_ifmt(self) -> int:
        """The S_IFMT bits of this type, as stored in an inode's mode."""
        return _IFMT[self]


# Module constants: NodeType.FILE is a slow metaclass lookup (80 ns), and these are per inode.
_DIR = NodeType.DIR
_FILE = NodeType.FILE
_SYMLINK = NodeType.SYMLINK
# Sets a field of a frozen dataclass (what its generated __init__ does), bound once.
_set_frozen = object.__setattr__

_IFMT = {
    NodeType.FILE: stat.S_IFREG,
    NodeType.DIR: stat.S_IFDIR,
    NodeType.SYMLINK: stat.S_IFLNK,
    NodeType.CHAR: stat.S_IFCHR,
    NodeType.BLOCK: stat.S_IFBLK,
    NodeType.FIFO: stat.S_IFIFO,
    NodeType.SOCKET: stat.S_IFSOCK,
}


@dataclass(frozen=True, slots=True, init=False)
class Content:
    """Where a regular file's bytes are.

    Either `data` holds them (small content vmimg generates itself, such as
    the agent's config), or they are `stored_size` bytes at `offset` in the
    file `path` (an uncompressed layer tar in the cache).

    `size` is the file's logical size. For a sparse file, `extents` lists the
    data runs in logical order; the stored bytes are those runs concatenated,
    and everything outside them reads as zeros.
    """

    size: int
    path: str | None = None
    offset: int = 0
    data: bytes | None = None
    extents: tuple[Extent, ...] | None = None

    # By hand, not dataclass's: a frozen dataclass's __init__ looks object.__setattr__ up
    # again for each field, and so costs twice this; one Content is made per file of every
    # layer. Same parameters.
    def __init__(
        self,
        size: int,
        path: str | None = None,
        offset: int = 0,
        data: bytes | None = None,
        extents: tuple[Extent, ...] | None = None,
    ) -> None:
        _set_frozen(self, "size", size)
        _set_frozen(self, "path", path)
        _set_frozen(self, "offset", offset)
        _set_frozen(self, "data", data)
        _set_frozen(self, "extents", extents)

    @classmethod
    def from_bytes(cls, data: bytes) -> Content:
        return cls(size=len(data), data=data)

    @property
    def stored_size(self) -> int:
        if self.extents is None:
            return self.size
        return sum(e.length for e in self.extents)

    @property
    def is_sparse(self) -> bool:
        return self.extents is not None

    def data_extents(self) -> tuple[Extent, ...]:
        """The data runs of the file: one run covering it all unless sparse."""
        if self.extents is not None:
            return self.extents
        return (Extent(0, self.size),) if self.size else ()


@dataclass(eq=False, slots=True, init=False)
class Node:
    """One inode: a file, directory, symlink, device, fifo or socket.

    `mode` holds only the permission bits (including setuid, setgid and
    sticky, 0o7777); the type is `type`. A symlink's are always 0o777, as
    Linux makes them. No path in a tree is longer than PATH_MAX. `mtime_ns` is nanoseconds since the
    epoch. `xattrs` maps full names (b"security.capability",
    b"user.foo") to raw values. `children` is used by directories only,
    `target` by symlinks only, `rdev` (major, minor) by devices only,
    `content` by regular files only.

    Nodes compare by identity (eq=False) because identity *is* the hardlink
    relation. Slots, not a __dict__: a tree holds one Node per entry.
    """

    type: NodeType
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, Node] | None = None
    target: bytes | None = None
    rdev: tuple[int, int] = (0, 0)
    content: Content | None = None

    # By hand, not dataclass's: one Node is made per entry of every layer, and the
    # generated __init__ with its default factory and __post_init__ cost twice this.
    # Same parameters; a directory gets its children dict, a file empty content, a
    # symlink SYMLINK_MODE.
    def __init__(
        self,
        type: NodeType,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int = 0,
        xattrs: dict[bytes, bytes] | None = None,
        children: dict[bytes, Node] | None = None,
        target: bytes | None = None,
        rdev: tuple[int, int] = (0, 0),
        content: Content | None = None,
    ) -> None:
        self.type = type
        self.mode = SYMLINK_MODE if type is _SYMLINK else mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.xattrs = {} if xattrs is None else xattrs
        self.children = {} if children is None and type is _DIR else children
        self.target = target
        self.rdev = rdev
        self.content = Content(size=0) if content is None and type is _FILE else content

    @property
    def is_dir(self) -> bool:
        return self.type is _DIR

    @property
    def size(self) -> int:
        """The byte size a stat() would report for a file or symlink."""
        kind = self.type
        if kind is _FILE:
            assert self.content is not None
            return self.content.size
        if kind is _SYMLINK:
            assert self.target is not None
            return len(self.target)
        return 0

    @property
    def st_mode(self) -> int:
        """Full st_mode: type bits plus permission bits (always 0777 for a symlink)."""
        kind = self.type
        if kind is _SYMLINK:
            return stat.S_IFLNK | SYMLINK_MODE
        return _IFMT[kind] | (self.mode & 0o7777)  # the table, not st_ifmt: once per inode

    @property
    def permissions(self) -> int:
        """The permission bits an output stores: `mode`, but 0777 for a symlink."""
        return stat.S_IMODE(self.st_mode)

    def sorted_children(self) -> list[tuple[bytes, Node]]:
        """Children ordered by name bytes, the order every writer uses."""
        assert self.children is not None
        return sorted(self.children.items())


def file_node(
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    xattrs: dict[bytes, bytes],
    size: int,
    path: str | None,
    offset: int,
    extents: tuple[Extent, ...] | None,
) -> Node:
    """Node(FILE, mode, uid, gid, mtime_ns, xattrs, content=Content(size, path, offset,
    None, extents)), the same objects, made without running __init__ (by _slots.new, with
    the values __init__ would store): a flatten makes one per file, and the two __init__s
    were most of what a small file cost."""
    if _new_slotted is None:
        return Node(
            _FILE,
            mode,
            uid,
            gid,
            mtime_ns,
            xattrs,
            content=Content(size, path, offset, None, extents),
        )
    content = _new_slotted(Content, CONTENT_SLOTS, size, path, offset, None, extents)
    node = _new_slotted(
        Node, NODE_SLOTS, _FILE, mode, uid, gid, mtime_ns, xattrs, None, None, NO_RDEV, content
    )
    return cast(Node, node)


def _slot_descriptors(cls: type) -> tuple[object, ...]:
    """The slot descriptors of a slotted dataclass, in field order (its __init__'s)."""
    return tuple(vars(cls)[f.name] for f in fields(cls))


# What file_node makes nodes of (and flatten's C fast path, _flatten.apply_files, too)
CONTENT_SLOTS = _slot_descriptors(Content)
NODE_SLOTS = _slot_descriptors(Node)
NO_RDEV = (0, 0)
# What Tree.content_bytes reads through _slots.file_sizes, in its order
_SIZED_NODE_SLOTS = (vars(Node)["children"], vars(Node)["type"], vars(Node)["content"])
_SIZED_CONTENT_SLOTS = (vars(Content)["size"], vars(Content)["extents"])


def split_path(path: bytes) -> list[bytes]:
    """Split a tree path into components, refusing anything that leaves the root.

    Leading "/" and "./" are accepted (tar members carry both), "." components
    are dropped, and ".." is an error rather than something to resolve: a
    flattened tree never needs it, and resolving it is how extraction escapes.
    """
    # list operations that run in C: a path may have 2048 components, and every
    # entry of a layer is split (twice)
    parts = path.split(b"/")
    if b"" in parts:
        parts = list(filter(None, parts))
    dots = parts.count(b".")
    if dots == 1:
        parts.remove(b".")
    elif dots:
        parts = [p for p in parts if p != b"."]
    if b".." in parts:
        raise TreeError(f"path leaves the root: {os.fsdecode(path)!r}")
    return parts


class Tree:
    """A root directory and operations on it by path."""

    def __init__(self, root: Node | None = None) -> None:
        self.root = root or Node(NodeType.DIR, mode=0o755)
        if not self.root.is_dir:
            raise TreeError("the root of a tree must be a directory")

    def get(self, path: bytes) -> Node | None:
        """The node at `path`, or None. Symlinks are not followed."""
        node = self.root
        for name in split_path(path):
            if node.children is None:
                return None
            child = node.children.get(name)
            if child is None:
                return None
            node = child
        return node

    def parent_of(self, path: bytes, make_dirs: Node | None = None) -> tuple[Node, bytes]:
        """The directory that holds `path`, and the last name of `path`.

        With `make_dirs`, missing parents are created as copies of that
        template node; otherwise a missing parent is an error.
        """
        parts = split_path(path)
        if not parts:
            raise TreeError("the root has no parent")
        node = self.root
        for i, name in enumerate(parts[:-1]):
            assert node.children is not None
            child = node.children.get(name)
            if child is None:
                if make_dirs is None:
                    raise TreeError(f"no directory {os.fsdecode(b'/'.join(parts[: i + 1]))!r}")
                child = Node(
                    NodeType.DIR,
                    mode=make_dirs.mode,
                    uid=make_dirs.uid,
                    gid=make_dirs.gid,
                    mtime_ns=make_dirs.mtime_ns,
                )
                node.children[name] = child
            elif not child.is_dir:
                raise TreeError(f"not a directory: {os.fsdecode(b'/'.join(parts[: i + 1]))!r}")
            node = child
        return node, parts[-1]

    def add(self, path: bytes, node: Node, make_dirs: Node | None = None) -> None:
        """Place `node` at `path`, replacing whatever was there."""
        parent, name = self.parent_of(path, make_dirs)
        assert parent.children is not None
        parent.children[name] = node

    def remove(self, path: bytes) -> Node | None:
        """Remove and return the entry at `path` (with everything below it)."""
        try:
            parent, name = self.parent_of(path)
        except TreeError:
            return None
        assert parent.children is not None
        return parent.children.pop(name, None)

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """Every (path, node) in depth-first order, children by name bytes.

        Paths are absolute (b"/", b"/etc", b"/etc/passwd"). A hardlinked node
        appears once per path that holds it.
        """
        # One (path, children iterator) per open directory: a path is made only when it
        # is yielded, so memory follows the depth of the tree, never its width times depth.
        yield b"/", self.root
        stack: list[tuple[bytes, Iterator[tuple[bytes, Node]]]] = [
            (b"", iter(self.root.sorted_children()))
        ]
        while stack:
            prefix, children = stack[-1]
            # A for loop, left to descend and resumed after: cheaper per entry than next().
            for name, child in children:
                path = prefix + b"/" + name
                yield path, child
                if child.children:
                    stack.append((path, iter(child.sorted_children())))
                    break
            else:
                stack.pop()

    def content_bytes(self) -> int:
        """The stored bytes of every file, each hardlinked one once: what writing the
        tree reads, and what an uncompressed output holds at least."""
        # Not walk(): a sum needs neither paths nor sorted children, and this runs on every
        # conversion. C sums the files named once (_slots.file_sizes; a Python loop over
        # 100,000 small files took 33 ms); the rest (hardlinks, sparse files) are few.
        total, others = file_sizes(self.root, _SIZED_NODE_SLOTS, _SIZED_CONTENT_SLOTS, _FILE)
        for node in set(others):  # by identity (eq=False): hardlinks count once
            content = node.content
            assert content is not None
            total += content.size if content.extents is None else content.stored_size
        return total

    def link_counts(self) -> dict[int, int]:
        """Link count per node id: entries naming it, plus for a directory its
        "." and each subdirectory's "..", as a file system counts them."""
        counts: dict[int, int] = {}
        for _path, node in self.walk():
            counts[id(node)] = counts.get(id(node), 0) + 1
            if node.type is _DIR:
                assert node.children is not None
                counts[id(node)] += 1 + sum(1 for c in node.children.values() if c.type is _DIR)
        return counts

    def clamp_mtimes(self, epoch_ns: int) -> None:
        """Clamp every mtime to at most `epoch_ns` (SOURCE_DATE_EPOCH)."""
        seen: set[int] = set()
        for _path, node in self.walk():
            if id(node) not in seen:
                seen.add(id(node))
                node.mtime_ns = min(node.mtime_ns, epoch_ns)
