"""The C loops of the erofs writer (vmimg/rootfs/writers/erofs/_erofsmeta.c) against their
plain Python reference (tests/erofsmeta_ref.py): the same output for any input, and bad
input refused with an exception, never read or written out of bounds."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import erofsmeta_ref
from vmimg.errors import WriterError
from vmimg.rootfs.tree import Node, NodeType
from vmimg.rootfs.writers.erofs import _erofsmeta, writer
from vmimg.rootfs.writers.erofs import format as fmt

BLOCK = fmt.BLOCK_SIZE
SLOT = fmt.INODE_SLOT_SIZE

# Meta sizes as inodes have them: mostly under a block (inode, xattrs, a tail), some
# exactly a block or a slot short of one, a few bigger (compression indexes).
meta_sizes = st.lists(
    st.one_of(
        st.integers(fmt.COMPACT_INODE_SIZE, BLOCK),
        st.sampled_from([BLOCK - SLOT, BLOCK, BLOCK + 1, 2 * BLOCK]),
        st.integers(0, 5 * BLOCK),
    ),
    max_size=400,
)


@given(meta_sizes, st.integers(1, 40))
@settings(max_examples=300, deadline=None)
def test_first_fit_matches_the_reference(sizes: list[int], open_blocks: int) -> None:
    assert _erofsmeta.first_fit(sizes, BLOCK, SLOT, open_blocks) == erofsmeta_ref.first_fit(
        sizes, BLOCK, SLOT, open_blocks
    )


@given(meta_sizes, st.sampled_from([(512, 32), (1024, 64), (4096, 4096)]))
@settings(max_examples=100, deadline=None)
def test_first_fit_other_geometries(sizes: list[int], geometry: tuple[int, int]) -> None:
    block, slot = geometry
    assert _erofsmeta.first_fit(sizes, block, slot, 3) == erofsmeta_ref.first_fit(
        sizes, block, slot, 3
    )


def test_first_fit_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        _erofsmeta.first_fit([32], BLOCK, 100, 32)  # a block is no whole number of slots
    with pytest.raises(ValueError):
        _erofsmeta.first_fit([32], BLOCK, SLOT, 0)
    with pytest.raises(OverflowError):
        _erofsmeta.first_fit([-1], BLOCK, SLOT, 32)
    with pytest.raises(OverflowError):
        _erofsmeta.first_fit([1 << 60], BLOCK, SLOT, 32)
    with pytest.raises(TypeError):
        _erofsmeta.first_fit(["32"], BLOCK, SLOT, 32)  # type: ignore[list-item]
    assert _erofsmeta.first_fit([], BLOCK, SLOT, 32) == ([], BLOCK)


@st.composite
def directories(draw: st.DrawFn) -> tuple[list[bytes], list[int], list[int], list[int], bytes]:
    """Entries split into blocks the way the writer splits them, nids of every size."""
    names = draw(st.lists(st.binary(min_size=1, max_size=fmt.NAME_LEN_MAX), min_size=1))
    inodes = draw(st.integers(1, 50))
    targets = [draw(st.integers(0, inodes - 1)) for _ in names]
    nids = draw(st.lists(st.integers(0, (1 << 64) - 1), min_size=inodes, max_size=inodes))
    file_types = draw(st.binary(min_size=inodes, max_size=inodes))
    starts, used = [0], 0
    for i, name in enumerate(names):
        need = fmt.DIRENT_SIZE + len(name)
        if used + need > BLOCK:
            starts.append(i)
            used = 0
        used += need
    return names, targets, starts, nids, file_types


@given(directories())
@settings(max_examples=200, deadline=None)
def test_dir_blocks_match_the_reference(
    directory: tuple[list[bytes], list[int], list[int], list[int], bytes],
) -> None:
    assert _erofsmeta.dir_blocks(*directory, BLOCK) == erofsmeta_ref.dir_blocks(*directory, BLOCK)


def test_dirent_is_formats() -> None:
    assert _erofsmeta.DIRENT_SIZE == fmt.DIRENT_SIZE == fmt.DIRENT.size
    raw = _erofsmeta.dir_blocks([b"a", b"bc"], [1, 0], [0], [7, 1 << 40], b"\x02\x01", BLOCK)
    assert raw == (fmt.Dirent(1 << 40, 24, 1).pack() + fmt.Dirent(7, 25, 2).pack() + b"abc")


def test_dir_blocks_refuse_bad_input() -> None:
    ok = ([b"a", b"b"], [0, 0], [0], [1], b"\x01")
    assert _erofsmeta.dir_blocks(*ok, BLOCK)
    bad: list[tuple[type[Exception], tuple[object, ...]]] = [
        (IndexError, ([b"a"], [1], [0], [1], b"\x01", BLOCK)),  # no such inode
        (IndexError, ([b"a"], [0], [0], [1], b"", BLOCK)),  # no file type for it
        (IndexError, ([b"a"], [-1], [0], [1], b"\x01", BLOCK)),
        (ValueError, ([b"a", b"b"], [0], [0], [1], b"\x01", BLOCK)),  # lists differ
        (ValueError, ([], [], [0], [1], b"\x01", BLOCK)),
        (ValueError, ([b"a"], [0], [], [1], b"\x01", BLOCK)),
        (ValueError, ([b"a"], [0], [1], [1], b"\x01", BLOCK)),  # first block not at 0
        (ValueError, ([b"a", b"b"], [0, 0], [0, 0], [1], b"\x01", BLOCK)),  # not rising
        (ValueError, ([b"a", b"b"], [0, 0], [0, 2], [1], b"\x01", BLOCK)),  # past the end
        (ValueError, ([b"x" * 100], [0], [0], [1], b"\x01", 64)),  # overflows its block
        (ValueError, ([b"a"], [0], [0], [1], b"\x01", 0)),
        (TypeError, (["a"], [0], [0], [1], b"\x01", BLOCK)),
        (OverflowError, ([b"a"], [0], [0], [-1], b"\x01", BLOCK)),  # a nid below 0
        (OverflowError, ([b"a"], [0], [0], [1 << 64], b"\x01", BLOCK)),
    ]
    for error, args in bad:
        with pytest.raises(error):
            _erofsmeta.dir_blocks(*args)  # type: ignore[arg-type]


@given(
    st.integers(0, 300),
    st.lists(st.tuples(st.integers(-10, 310), st.binary(max_size=40)), max_size=30),
)
@settings(max_examples=300, deadline=None)
def test_scatter_matches_the_reference(size: int, pieces: list[tuple[int, bytes]]) -> None:
    """Pieces overlap, fall outside or are empty: the C copy and the reference agree on
    the bytes, or both refuse and leave the buffer as it was."""
    places, data = [at for at, _ in pieces], [piece for _, piece in pieces]
    ours, theirs = bytearray(b"\x5a" * size), bytearray(b"\x5a" * size)
    try:
        erofsmeta_ref.scatter(theirs, places, data)
    except IndexError:
        with pytest.raises(IndexError):
            _erofsmeta.scatter(ours, places, data)
    else:
        _erofsmeta.scatter(ours, places, data)
    assert ours == theirs


def test_scatter_refuses_bad_input() -> None:
    dest = bytearray(8)
    bad: list[tuple[type[Exception], tuple[object, ...]]] = [
        (ValueError, (dest, [0, 1], [b"a"])),  # lists differ
        (TypeError, (dest, [0], ["a"])),
        (TypeError, (bytes(8), [0], [b"a"])),  # not writable
        (OverflowError, (dest, [1 << 70], [b"a"])),
        (IndexError, (dest, [-1], [b"a"])),
        (IndexError, (dest, [7], [b"ab"])),
    ]
    for error, args in bad:
        with pytest.raises(error):
            _erofsmeta.scatter(*args)  # type: ignore[arg-type]
    assert dest == bytearray(8)


# Names that sort around "." and "..", and a few longer ones.
entry_names = st.sampled_from([b"-", b"+", b".a", b"...", b"a", b"b", b"ab", b"\xff", b"z" * 40])


@st.composite
def trees(draw: st.DrawFn) -> Node:
    """A small tree whose files may be hardlinked from several directories."""
    shared = [Node(NodeType.FILE) for _ in range(draw(st.integers(0, 3)))]

    def directory(depth: int) -> Node:
        node = Node(NodeType.DIR)
        assert node.children is not None
        for name in draw(st.lists(entry_names, max_size=6, unique=True)):
            kind = draw(st.sampled_from(["file", "link", "symlink", "dir"]))
            if kind == "dir" and depth < 3:
                node.children[name] = directory(depth + 1)
            elif kind == "link" and shared:
                node.children[name] = draw(st.sampled_from(shared))
            elif kind == "symlink":
                node.children[name] = Node(NodeType.SYMLINK, target=b"t")
            else:
                node.children[name] = Node(NodeType.FILE)
        return node

    return directory(0)


def _collected(collect: Any, root_node: Node) -> list[tuple[object, ...]]:
    """What collect made, every slot of every inode, with objects named by their place."""
    root = writer._Inode(root_node, b"/", None, ino=1)
    fields = tuple(getattr(writer._Inode, f) for f in writer._COLLECT_FIELDS)
    defaults = tuple(
        getattr(root, f) for f in writer._COLLECT_FIELDS[writer._COLLECT_DEFAULTS_FROM :]
    )
    inodes, dirs = collect(root, fields, defaults, NodeType.DIR, fmt.NAME_LEN_MAX, _refuse)
    place = {id(inode): i for i, inode in enumerate(inodes)}
    rows = [(id(i.node), i.up and place[id(i.up)]) for i in inodes]
    rows += [tuple(getattr(i, f) for f in writer._COLLECT_FIELDS[3:]) for i in inodes]
    return [*rows, tuple(place[id(d)] for d in dirs)]


def _refuse(name: bytes, directory: Any) -> None:
    raise WriterError(f"refused {name!r} in {directory.path!r}")


@given(trees())
@settings(max_examples=200, deadline=None)
def test_collect_matches_the_reference(root: Node) -> None:
    assert _collected(_erofsmeta.collect, root) == _collected(erofsmeta_ref.collect, root)


def _linked_tree(keep: list[Node]) -> Node:
    """/a/{s,h,p} and /b/s2, where s2 is s (a hardlink) and h is also in `keep`; no other
    reference to any node is left once this returns."""
    shared, held = Node(NodeType.FILE), Node(NodeType.FILE)
    keep.append(held)  # a reference from outside the tree: not a second name
    a = Node(NodeType.DIR, children={b"s": shared, b"h": held, b"p": Node(NodeType.FILE)})
    b = Node(NodeType.DIR, children={b"s2": shared})
    return Node(NodeType.DIR, children={b"a": a, b"b": b})


def test_collect_tells_hardlinks_from_nodes_held_elsewhere() -> None:
    """collect looks a child up among the nodes it placed only when something besides its
    directory holds it: a hardlink (another directory), or anything else (here a list).
    Either way the inodes are the reference's: one per node, links counted."""
    keep: list[Node] = []
    root = _linked_tree(keep)
    inodes, _dirs = _erofsmeta.collect(*_collect_args(root))
    links = {i.name: i.nlink for i in inodes}
    assert len(inodes) == 6  # /, a, b, s (also named s2), h, p
    assert links[b"s"] == 2 and links[b"h"] == 1 and links[b"p"] == 1 and b"s2" not in links
    del inodes, _dirs
    assert _collected(_erofsmeta.collect, root) == _collected(erofsmeta_ref.collect, root)


def _collect_args(root_node: Node) -> tuple[object, ...]:
    root = writer._Inode(root_node, b"/", None, ino=1)
    fields = tuple(getattr(writer._Inode, f) for f in writer._COLLECT_FIELDS)
    defaults = tuple(
        getattr(root, f) for f in writer._COLLECT_FIELDS[writer._COLLECT_DEFAULTS_FROM :]
    )
    return (root, fields, defaults, NodeType.DIR, fmt.NAME_LEN_MAX, _refuse)


@pytest.mark.parametrize("bad", [b"", b"a/b", b"a\0", b"x" * (fmt.NAME_LEN_MAX + 1)])
def test_collect_hands_bad_names_over(bad: bytes) -> None:
    sub = Node(NodeType.DIR, children={bad: Node(NodeType.FILE), b"\x01": Node(NodeType.FILE)})
    root = Node(NodeType.DIR, children={b"sub": sub})
    for collect in (_erofsmeta.collect, erofsmeta_ref.collect):
        with pytest.raises(WriterError, match=r"in b'/sub'"):
            _collected(collect, root)


def test_collect_refuses_bad_input() -> None:
    root_node = Node(NodeType.DIR, children={b"a": Node(NodeType.FILE)})
    root = writer._Inode(root_node, b"/", None, ino=1)
    fields = tuple(getattr(writer._Inode, f) for f in writer._COLLECT_FIELDS)
    defaults = tuple(
        getattr(root, f) for f in writer._COLLECT_FIELDS[writer._COLLECT_DEFAULTS_FROM :]
    )
    args = (NodeType.DIR, fmt.NAME_LEN_MAX, _refuse)
    bad: list[tuple[type[Exception], tuple[object, ...]]] = [
        (ValueError, (root, fields, defaults[1:], *args)),  # a default short
        (ValueError, (root, fields[:3], (), *args)),
        (TypeError, (root, (*fields[:-1], Node.mode), defaults, *args)),  # another class's
        (TypeError, (root, (*fields[:-1], fields[0]), defaults, *args)),  # a slot twice
        (TypeError, (root_node, fields, defaults, *args)),  # root not an inode
        (ValueError, (root, fields, defaults, NodeType.DIR, 0, lambda n, d: None)),  # no raise
    ]
    for error, call_args in bad:
        with pytest.raises(error):
            _erofsmeta.collect(*call_args)  # type: ignore[arg-type]
    not_bytes = Node(NodeType.DIR, children={"a": Node(NodeType.FILE)})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        _erofsmeta.collect(writer._Inode(not_bytes, b"/", None, 1), fields, defaults, *args)
    no_children = Node(NodeType.DIR)
    no_children.children = None
    with pytest.raises(TypeError):
        _erofsmeta.collect(writer._Inode(no_children, b"/", None, 1), fields, defaults, *args)
