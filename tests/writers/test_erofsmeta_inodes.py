"""The erofs writer's inodes and inline tails, packed and gathered by C
(_erofsmeta.pack_inodes, _erofsmeta.gather_tails) with anything unusual left to the
writer's Python (_pack_inode, _gather_tail): the same bytes as that Python alone gives, and
as the plain reference (tests/erofsmeta_ref.py), for any inode, hostile values included;
the same error where the Python raises one. Whole images from random trees agree too."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import erofsmeta_ref
from vmimg.image.layers import Extent
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Content, Node, NodeType, Tree
from vmimg.rootfs.writers.erofs import ErofsOptions, _erofsmeta, write_erofs, writer
from vmimg.rootfs.writers.erofs import format as fmt

BLOCK = fmt.BLOCK_SIZE
SLOT = fmt.INODE_SLOT_SIZE
U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


def _mostly(common: st.SearchStrategy[int], rare: list[int]) -> st.SearchStrategy[int]:
    """Ordinary values 24 times in 25, else one at or past a limit."""
    return st.integers(0, 24).flatmap(lambda k: st.sampled_from(rare) if k == 0 else common)


# Values at and past every limit of both inode layouts, and ordinary ones.
ids = _mostly(st.integers(0, 70000), [0, U16, U16 + 1, U32, U32 + 1, -1])
nlinks = _mostly(st.integers(1, 9), [0, U16, U16 + 1, U32, U32 + 1])
sizes = _mostly(st.integers(0, 3 * BLOCK), [U32, U32 + 1, (1 << 63) - 1, 1 << 63, U64, U64 + 1, -1])
i_us = _mostly(st.integers(0, 1 << 20), [U32, U32 + 1, -1])
modes = _mostly(st.integers(0, 0o7777), [0o10000, -1, -0o10000, 1 << 63, -(1 << 63) - 1, 1 << 70])
NS = 1_000_000_000
BUILD_TIME = 7  # the mtime compact inodes stand for
mtimes = _mostly(
    st.sampled_from([BUILD_TIME, BUILD_TIME, 0, -1, -NS - 1, 1700000000 * NS]),
    [(1 << 63) - 1, -(1 << 63), 1 << 63, ((1 << 63) - 1) * NS, -(1 << 63) * NS],
)
xattr_bodies = st.integers(
    0, 24
).flatmap(
    lambda k: (
        st.binary(max_size=11)  # shorter than an ibody's header: left to the Python
        if k == 0
        else st.one_of(
            st.just(b""), st.binary(min_size=12, max_size=80).map(lambda b: b[: len(b) // 4 * 4])
        )
    )
)


class _FakeCompressed:
    """What _pack_inode asks of a compressed file: its indexes after the head."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def metadata(self, head_size: int) -> bytes:
        return self.body


@st.composite
def inode_lists(draw: st.DrawFn) -> list[writer._Inode]:
    inodes = []
    for ino in range(1, draw(st.integers(1, 24)) + 1):
        node_type = draw(st.sampled_from(list(NodeType)))
        node = Node(node_type, draw(modes), draw(ids), draw(ids), draw(mtimes), target=b"t")
        inode = writer._Inode(node, b"n", None, ino=draw(_mostly(st.just(ino), [U32, U32 + 1])))
        inode.nlink, inode.size, inode.i_u = draw(nlinks), draw(sizes), draw(i_us)
        # mostly as _decide_inode_versions decides it, sometimes not
        inode.extended = draw(st.integers(0, 9)) == 0 or (
            max(node.uid, node.gid, inode.nlink) > U16
            or inode.size > U32
            or node.mtime_ns != BUILD_TIME
        )
        inode.datalayout = draw(st.sampled_from(writer._DATALAYOUTS))
        inode.xattr_ibody = draw(xattr_bodies)
        head = fmt.EXTENDED_INODE_SIZE if inode.extended else fmt.COMPACT_INODE_SIZE
        inode.head_size = head + len(inode.xattr_ibody) + draw(_mostly(st.just(0), [4, -4]))
        if draw(st.integers(0, 9)) == 0:
            inode.compressed = _FakeCompressed(draw(st.binary(max_size=40)))  # type: ignore[assignment]
        inodes.append(inode)
    return inodes


def _window(meta_sizes: list[int], low_block: int) -> tuple[list[int], int, bytearray]:
    """Nids as the writer gives them, and a window of the area from a block on."""
    nids, end = _erofsmeta.first_fit(meta_sizes, BLOCK, SLOT, writer.META_OPEN_BLOCKS)
    base = min(low_block, (end - 1) // BLOCK) * BLOCK
    return nids, base, bytearray(b"\xa5" * (end - base + BLOCK))


def _outcome(write: Callable[[bytearray], None], meta: bytearray) -> tuple[object, bytes]:
    """The bytes a write leaves, and the type of the error it raised, if any."""
    meta = bytearray(meta)
    try:
        write(meta)
    except Exception as e:  # whatever it is, the other side must raise it too
        return type(e), bytes(meta)
    return None, bytes(meta)


def _python_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer as it was: C leaves every inode to its Python (and every directory's plan,
    every inode's survey and meta size: tests/writers/test_erofsmeta_survey.py)."""
    monkeypatch.setattr(writer, "pack_inodes", lambda meta, inodes, nids, base, start, s: start)
    monkeypatch.setattr(writer, "gather_tails", lambda inodes, nids, base, start, *rest: start)
    monkeypatch.setattr(writer, "survey", lambda inodes, start, *rest: start)
    monkeypatch.setattr(
        writer, "meta_sizes", lambda inodes, f: ([None] * len(inodes), list(range(len(inodes))))
    )
    monkeypatch.setattr(writer, "plan_dirents", lambda directories, start, *rest: start)


@given(inode_lists(), st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_inodes_packed_as_the_python_and_the_reference_pack_them(
    inodes: list[writer._Inode], low_block: int
) -> None:
    meta_sizes = [max(i.head_size, 0) + 40 for i in inodes]  # room for the fake indexes
    nids, base, meta = _window(meta_sizes, 0)
    # an inode before the window's start is no inode C packs: only the later ones go
    first = next((k for k, nid in enumerate(nids) if nid * SLOT >= base), len(nids))
    inodes, nids = inodes[first:], nids[first:]
    ours = _outcome(lambda m: writer._write_inodes(m, inodes, nids, base), meta)
    with pytest.MonkeyPatch.context() as patch:
        _python_only(patch)
        python = _outcome(lambda m: writer._write_inodes(m, inodes, nids, base), meta)
    assert ours == python
    if python[0] is None:
        assert _outcome(lambda m: erofsmeta_ref.write_inodes(m, inodes, nids, base), meta) == python


@pytest.mark.parametrize(
    ("uid", "gid", "nlink", "size", "mtime_ns", "extended"),
    [
        (U16, U16, U16, U32, 7, False),  # every compact field at its limit
        (U16 + 1, 0, 1, 0, 7, True),
        (U32, U32, U32, U32 + 1, -1, True),  # extended limits, a time just before 1970
        (0, 0, 1, (1 << 63) - 1, -(1 << 63), True),
        (0, 0, 1, 1 << 63, ((1 << 63) - 1) * NS, True),  # both past C's 64 bits: left to Python
        (0, 0, 1, 5, 4102444800 * NS + 1, True),  # 2100
    ],
)
def test_hostile_values_pack_as_the_reference_packs_them(
    uid: int, gid: int, nlink: int, size: int, mtime_ns: int, extended: bool
) -> None:
    node = Node(NodeType.FILE, 0o4755, uid, gid, mtime_ns)
    inode = writer._Inode(node, b"f", None, ino=U32)
    inode.nlink, inode.size, inode.extended, inode.i_u = nlink, size, extended, U32
    inode.xattr_ibody = bytes(range(16))
    inode.head_size = (fmt.EXTENDED_INODE_SIZE if extended else fmt.COMPACT_INODE_SIZE) + 16
    ours, theirs = bytearray(2 * BLOCK), bytearray(2 * BLOCK)
    writer._write_inodes(ours, [inode], [3], 0)
    erofsmeta_ref.write_inodes(theirs, [inode], [3], 0)
    assert ours == theirs and ours[96:98] == bytes([extended, 0])


def test_values_no_inode_can_hold_raise_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node(NodeType.FILE, uid=U16 + 1)  # too large for the compact inode it is given
    inode = writer._Inode(node, b"f", None, ino=1)
    inode.head_size = fmt.COMPACT_INODE_SIZE
    import struct

    with pytest.raises(struct.error):
        writer._write_inodes(bytearray(BLOCK), [inode], [1], 0)
    _python_only(monkeypatch)
    with pytest.raises(struct.error):
        writer._write_inodes(bytearray(BLOCK), [inode], [1], 0)


def _shapes() -> tuple[Any, ...]:
    return writer._META_SHAPES


def test_pack_inodes_leaves_what_it_cannot_pack_untouched() -> None:
    """An inode outside the buffer, of another class or with odd values: C stops there
    (the writer's Python packs it, or raises), having written nothing for it."""
    good = writer._Inode(Node(NodeType.FILE), b"f", None, ino=1)
    good.head_size = fmt.COMPACT_INODE_SIZE
    meta = bytearray(b"\x5a" * 128)
    assert _erofsmeta.pack_inodes(meta, [good], [4], 0, 0, _shapes()) == 0  # at the end
    assert _erofsmeta.pack_inodes(meta, [good], [0], 32, 0, _shapes()) == 0  # before base
    assert _erofsmeta.pack_inodes(meta, [good, good], [1, 1 << 60], 0, 0, _shapes()) == 1
    assert meta[32:64] != b"\x5a" * 32 and meta[:32] + meta[64:] == b"\x5a" * 96
    odd = writer._Inode(Node(NodeType.FILE), b"f", None, ino=1)
    odd.head_size = fmt.COMPACT_INODE_SIZE
    for name, value in [("size", -1), ("nlink", 1.0), ("extended", 1), ("xattr_ibody", b"x")]:
        setattr(odd, name, value)
        assert _erofsmeta.pack_inodes(bytearray(128), [odd], [1], 0, 0, _shapes()) == 0
        setattr(odd, name, getattr(good, name))
    assert _erofsmeta.pack_inodes(bytearray(128), [object()], [1], 0, 0, _shapes()) == 0
    del odd.ino  # an unset slot
    assert _erofsmeta.pack_inodes(bytearray(128), [odd], [1], 0, 0, _shapes()) == 0


def test_pack_inodes_and_gather_tails_refuse_bad_input() -> None:
    inode = writer._Inode(Node(NodeType.FILE), b"f", None, ino=1)
    meta, lists = bytearray(BLOCK), ([], [], [], [])
    bad_shapes = (writer._META_SHAPES[1], *writer._META_SHAPES[1:])
    bad: list[tuple[type[Exception], Callable[[], object]]] = [
        (ValueError, lambda: _erofsmeta.pack_inodes(meta, [inode], [], 0, 0, _shapes())),
        (ValueError, lambda: _erofsmeta.pack_inodes(meta, [inode], [1], -1, 0, _shapes())),
        (ValueError, lambda: _erofsmeta.pack_inodes(meta, [inode], [1], 0, 2, _shapes())),
        (TypeError, lambda: _erofsmeta.pack_inodes(meta, [inode], [1], 0, 0, bad_shapes)),
        (TypeError, lambda: _erofsmeta.pack_inodes(bytes(BLOCK), [inode], [1], 0, 0, _shapes())),
        (TypeError, lambda: _erofsmeta.gather_tails([inode], [1], 0, 0, 1, bad_shapes, *lists)),
        (ValueError, lambda: _erofsmeta.gather_tails([inode], [1], 0, 0, 0, _shapes(), *lists)),
        (ValueError, lambda: _erofsmeta.gather_tails([inode], [], 0, 0, 1, _shapes(), *lists)),
    ]
    for error, call in bad:
        with pytest.raises(error):
            call()
    assert meta == bytearray(BLOCK) and lists == ([], [], [], [])


# --- tails ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes]]:
    """A layer file whose bytes files' contents point into."""
    data = os.urandom(64 * 1024)
    path = tmp_path_factory.mktemp("layer") / "layer.tar"
    path.write_bytes(data)
    yield str(path), data


@st.composite
def tail_inodes(draw: st.DrawFn, layer: tuple[str, bytes]) -> list[writer._Inode]:
    """Files (in the layer, in memory, sparse), symlinks, and inodes with no tail."""
    path, data = layer
    inodes = []
    for ino in range(1, draw(st.integers(1, 30)) + 1):
        kind = draw(st.sampled_from(["layer", "layer", "bytes", "sparse", "symlink", "dir"]))
        size = draw(st.integers(0, 3 * BLOCK))
        if kind == "symlink":
            node = Node(NodeType.SYMLINK, target=draw(st.binary(min_size=1, max_size=200)))
            size = len(node.target or b"")
        elif kind == "dir":
            node = Node(NodeType.DIR)
        elif kind == "bytes":
            node = Node(NodeType.FILE, content=Content.from_bytes(draw(st.binary(max_size=300))))
            size = node.content.size if node.content else 0
        elif kind == "sparse":
            run = draw(st.integers(0, size))
            extents = (Extent(size - run, run),) if run else ()
            node = Node(NodeType.FILE, content=Content(size, path, 0, None, extents))
        else:
            offset = draw(st.integers(0, len(data) - size))
            node = Node(NodeType.FILE, content=Content(size, path, offset))
        inode = writer._Inode(node, b"n", None, ino=ino)
        inode.size = size
        inode.head_size = draw(st.sampled_from([32, 64, 76]))
        inode.inline_len = draw(st.integers(0, min(size % BLOCK, BLOCK - inode.head_size)))
        inodes.append(inode)
    return inodes


def _read_all(reader: ContentReader) -> Callable[[Content], bytes]:
    return reader.read_all


@given(st.data(), st.integers(1, 8))
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_tails_gathered_as_the_python_and_the_reference_place_them(
    layer: tuple[str, bytes], data: st.DataObject, batch: int
) -> None:
    inodes = data.draw(tail_inodes(layer))
    nids, base, meta = _window([i.head_size + i.inline_len for i in inodes], 0)
    with ContentReader() as reader, pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "TAIL_BATCH", batch)  # batches end anywhere
        ours = _outcome(lambda m: writer._write_tails(m, inodes, nids, reader, base), meta)
        _python_only(patch)
        python = _outcome(lambda m: writer._write_tails(m, inodes, nids, reader, base), meta)
        ref = _outcome(
            lambda m: erofsmeta_ref.write_tails(
                m, inodes, nids, reader.read_all, base, NodeType.FILE, NodeType.SYMLINK
            ),
            meta,
        )
    assert ours == python == ref


def test_gather_tails_stops_at_a_sparse_file_and_a_full_batch(layer: tuple[str, bytes]) -> None:
    path, _ = layer
    files = []
    for extents in (None, None, (Extent(0, 10),), None):
        inode = writer._Inode(
            Node(NodeType.FILE, content=Content(10, path, 0, None, extents)), b"f", None, ino=1
        )
        inode.size, inode.inline_len, inode.head_size = 10, 10, 32
        files.append(inode)
    lists: tuple[list[Any], ...] = ([], [], [], [])
    nids = [1, 3, 5, 7]
    assert _erofsmeta.gather_tails(files, nids, 0, 0, 9, _shapes(), *lists) == 2  # sparse
    assert lists[2] == [64, 128] and [r[1:] for r in lists[3]] == [(0, 10), (0, 10)]
    assert _erofsmeta.gather_tails(files, nids, 0, 3, 3, _shapes(), *lists) == 4  # full
    assert lists[2] == [64, 128, 256] and lists[:2] == ([], [])


# --- whole images -------------------------------------------------------------------


@st.composite
def trees(draw: st.DrawFn, layer: tuple[str, bytes]) -> Tree:
    """Small trees of every kind of entry, owners, times and modes at their limits,
    hardlinks, xattrs and sparse files."""
    path, data = layer
    made: list[Node] = []

    def entry(depth: int) -> Node:
        kind = draw(st.sampled_from(["file", "file", "sparse", "symlink", "dev", "link", "dir"]))
        meta = (
            draw(modes.filter(lambda m: 0 <= m <= 0o7777)),
            draw(ids.filter(lambda i: 0 <= i <= U32)),
        )
        common: dict[str, Any] = {
            "mode": meta[0],
            "uid": meta[1],
            "gid": draw(ids.filter(lambda i: 0 <= i <= U32)),
            "mtime_ns": draw(st.sampled_from([0, 7, -1, -NS - 1, 4102444800 * NS])),
        }
        if draw(st.integers(0, 4)) == 0:
            common["xattrs"] = {b"user.k": draw(st.sampled_from([b"", b"v", b"x" * 30]))}
        if kind == "link" and made:
            return draw(st.sampled_from(made))
        if kind == "dir" and depth < 2:
            children = {
                draw(
                    st.binary(min_size=1, max_size=12).filter(
                        lambda n: b"/" not in n and b"\0" not in n
                    )
                ): entry(depth + 1)
                for _ in range(draw(st.integers(0, 5)))
            }
            return Node(NodeType.DIR, children=children, **common)
        if kind == "symlink":
            return Node(
                NodeType.SYMLINK, target=draw(st.binary(min_size=1, max_size=5000)), **common
            )
        if kind == "dev":
            return Node(NodeType.CHAR, rdev=(draw(st.integers(0, 0xFFF)), 3), **common)
        size = draw(st.integers(0, 3 * BLOCK))
        if kind == "sparse":
            content = Content(size, path, 0, None, (Extent(size // 2, size - size // 2),))
        else:
            content = Content(size, path, draw(st.integers(0, len(data) - size)))
        node = Node(NodeType.FILE, content=content, **common)
        made.append(node)
        return node

    root = Node(
        NodeType.DIR, children={b"%d" % i: entry(0) for i in range(draw(st.integers(1, 8)))}
    )
    return Tree(root)


def _image(tree: Tree, out: Path, compress: str) -> bytes:
    with ContentReader() as reader:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_erofs(tree, reader, fd, ErofsOptions(compress=compress))
        finally:
            os.close(fd)
    return out.read_bytes()


@given(st.data(), st.sampled_from(["none", "lz4"]))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_images_from_random_trees_are_the_pythons(
    layer: tuple[str, bytes],
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
    compress: str,
) -> None:
    tree = data.draw(trees(layer))
    out = tmp_path_factory.mktemp("img") / "image.erofs"
    ours = _image(tree, out, compress)
    with pytest.MonkeyPatch.context() as patch:
        _python_only(patch)
        assert _image(tree, out, compress) == ours
