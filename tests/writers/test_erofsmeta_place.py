"""The erofs writer's per-inode decisions in C (_erofsmeta.decide_versions and place_plain,
with the inodes they hand back decided in Python) against the writer's loops as they were
in Python (tests/erofsmeta_ref.py): the same slots, the same copies in the same order, the
same errors naming the same paths, for any inodes, hostile values included."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import erofsmeta_ref
from vmimg.errors import WriterError
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Content, Node, NodeType
from vmimg.rootfs.writers.erofs import _erofsmeta, writer
from vmimg.rootfs.writers.erofs import format as fmt

BLOCK = fmt.BLOCK_SIZE
BUILD = 1_700_000_000_000_000_000
_INODE_SLOTS = tuple(s for s in writer._Inode.__slots__ if s not in ("node", "up"))

# owners and device numbers in range, then out of it (the writer's errors)
ids = st.sampled_from([0, 1, 1000, fmt.COMPACT_ID_MAX, fmt.COMPACT_ID_MAX + 1, fmt.EXTENDED_ID_MAX])
bad_ids = st.sampled_from([-1, fmt.EXTENDED_ID_MAX + 1, 1 << 63, 1 << 64, 1 << 70, True])
nlinks = st.sampled_from(
    [1, 2, fmt.COMPACT_NLINK_MAX - 1, fmt.COMPACT_NLINK_MAX, fmt.COMPACT_NLINK_MAX + 1, 1 << 64]
)
sizes = st.one_of(
    st.integers(0, 3 * BLOCK),
    st.sampled_from([0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 7 * BLOCK, 7 * BLOCK + 1]),
    st.sampled_from([fmt.COMPACT_SIZE_MAX, fmt.COMPACT_SIZE_MAX + 1, (1 << 32) + BLOCK]),
    st.sampled_from([(1 << 63) - 1, 1 << 63, 1 << 64]),
)
mtimes = st.sampled_from([BUILD, BUILD + 1, BUILD - 1, 0, -1, 1 << 63, -(1 << 63) - 1, 1 << 80])
# xattr ibodies whose head (inode + ibody) leaves a tail just room, or just none, in a block
ibodies = st.one_of(
    st.just(0),
    st.integers(0, 64).map(lambda n: 12 + 4 * n),
    st.sampled_from([BLOCK - 64 - 1, BLOCK - 64, BLOCK - 32 - 1, BLOCK - 32, BLOCK, BLOCK + 4]),
)
devices = st.tuples(
    st.sampled_from([0, 8, fmt.DEV_MAJOR_MAX]), st.sampled_from([0, 1, 255, 256, fmt.DEV_MINOR_MAX])
)
bad_devices = st.tuples(
    st.sampled_from([0, fmt.DEV_MAJOR_MAX + 1, -1]), st.sampled_from([fmt.DEV_MINOR_MAX + 1, -1])
)


def _edge_of_inline(ibody: int) -> st.SearchStrategy[int]:
    """Sizes whose tail just fits inline after a compact or extended head with this ibody,
    or just does not."""
    return st.builds(
        lambda blocks, inode, delta: blocks * BLOCK + BLOCK - inode - ibody + delta,
        st.integers(0, 2),
        st.sampled_from([fmt.COMPACT_INODE_SIZE, fmt.EXTENDED_INODE_SIZE]),
        st.sampled_from([-1, 0, 1]),
    ).filter(lambda size: size >= 0)


@st.composite
def inode_specs(draw: st.DrawFn, hostile: bool) -> dict[str, Any]:
    """An inode's values; `hostile`: now and then an owner or device number out of range."""
    kind = draw(st.sampled_from(list(NodeType)))
    owners = st.one_of(ids, ids, ids, bad_ids) if hostile else ids
    spec: dict[str, Any] = {"type": kind, "uid": draw(owners), "gid": draw(owners)}
    spec["mtime"] = draw(st.one_of(st.just(BUILD), mtimes))
    spec["nlink"] = draw(nlinks)
    spec["ibody"] = draw(ibodies)
    spec["name"] = draw(st.binary(min_size=1, max_size=8))
    spec["size"] = draw(st.one_of(sizes, _edge_of_inline(spec["ibody"])))
    spec["rdev"] = draw(st.one_of(devices, bad_devices) if hostile else devices)
    spec["target"] = draw(
        st.one_of(st.integers(1, 64), st.sampled_from([BLOCK - 64, BLOCK - 63, BLOCK - 1]))
    )
    return spec


def _make(specs: list[dict[str, Any]]) -> list[writer._Inode]:
    """A root and an inode per spec in it (fresh objects each call)."""
    root = writer._Inode(Node(NodeType.DIR), b"/", None, ino=1)
    root.size = 2 * fmt.DIRENT_SIZE + 3
    inodes = [root]
    for n, spec in enumerate(specs):
        kind = spec["type"]
        node = Node(kind, uid=spec["uid"], gid=spec["gid"], mtime_ns=spec["mtime"])
        if kind is NodeType.FILE:
            node.content = Content(size=spec["size"])
        elif kind is NodeType.SYMLINK:
            node.target = b"t" * spec["target"]
        elif kind in (NodeType.CHAR, NodeType.BLOCK):
            node.rdev = spec["rdev"]
        inode = writer._Inode(node, spec["name"], root, ino=n + 2)
        inode.nlink = spec["nlink"]
        inode.xattr_ibody = bytes(spec["ibody"])
        if kind is NodeType.DIR:
            inode.size = spec["size"]
        inodes.append(inode)
    return inodes


def _slots(inodes: list[writer._Inode]) -> list[tuple[tuple[type, object], ...]]:
    return [tuple((type(v), v) for v in (getattr(i, s) for s in _INODE_SLOTS)) for i in inodes]


def _outcome(call: Any) -> tuple[type, str] | None:
    try:
        call()
    except (WriterError, AssertionError, AttributeError, TypeError) as e:
        return type(e), str(e)
    return None


@given(
    st.booleans().flatmap(lambda hostile: st.lists(inode_specs(hostile), max_size=40)),
    st.sampled_from([BUILD, BUILD, 0, 1 << 63, 1 << 70]),
)
@settings(max_examples=400, deadline=None)
def test_decide_versions_matches_the_reference(specs: list[dict[str, Any]], build: int) -> None:
    ours, theirs = _make(specs), _make(specs)
    assert _outcome(lambda: writer._decide_inode_versions(ours, build)) == _outcome(
        lambda: erofsmeta_ref.decide_versions(theirs, build)
    )
    assert _slots(ours) == _slots(theirs)


@given(st.lists(inode_specs(False), max_size=40), st.sampled_from([1, 1 << 40]))
@settings(max_examples=300, deadline=None)
def test_decided_and_placed_as_the_reference(specs: list[dict[str, Any]], first: int) -> None:
    """The two loops one after the other, as the writer runs them: heads with xattrs next to
    tails that just fit inline, or just do not."""
    ours, theirs = _make(specs), _make(specs)
    writer._decide_inode_versions(ours, BUILD)
    erofsmeta_ref.decide_versions(theirs, BUILD)
    data = _Recording(first, ours)
    data.place_all_plain(ours)
    assert (data.next_block, data.copies) == erofsmeta_ref.place_plain(theirs, first, BLOCK)
    assert _slots(ours) == _slots(theirs)


def test_decide_versions_errors_name_the_path() -> None:
    for spec, error in [
        ({"uid": fmt.EXTENDED_ID_MAX + 1}, r"owner 4294967296:0 of '/x' too large"),
        ({"gid": -1}, r"owner 0:-1 of '/x' too large"),
        ({"uid": 1 << 70}, r"owner 1180591620717411303424:0 of '/x' too large"),
    ]:
        inodes = _make([])
        inodes.append(writer._Inode(Node(NodeType.FILE, **spec), b"x", inodes[0], ino=2))
        with pytest.raises(WriterError, match=error):
            writer._decide_inode_versions(inodes, 0)
    dev = _make([{**_PLAIN_SPEC, "type": NodeType.CHAR, "rdev": (fmt.DEV_MAJOR_MAX + 1, 0)}])
    with pytest.raises(WriterError, match=r"device number 4096:0 of '/f'"):
        writer._decide_inode_versions(dev, BUILD)


_PLAIN_SPEC: dict[str, Any] = {
    "type": NodeType.FILE,
    "uid": 0,
    "gid": 0,
    "mtime": BUILD,
    "nlink": 1,
    "ibody": 0,
    "name": b"f",
    "size": 5,
    "rdev": (0, 0),
    "target": 3,
}


def _c_versions(inodes: list[Any], start: int = 0, build: int = BUILD) -> int:
    return _erofsmeta.decide_versions(inodes, start, build, *writer._VERSION_ARGS)


def test_decide_versions_in_c_decides_the_common_inodes() -> None:
    """Files, symlinks, directories, fifos, sockets of ordinary values: all decided in C;
    a device, an out-of-range owner, an int subclass are handed back by their index."""
    common = [{**_PLAIN_SPEC, "type": t} for t in NodeType if t not in writer._DEVICE_TYPES]
    inodes = _make(common * 3)
    assert _c_versions(inodes) == len(inodes)
    theirs = _make(common * 3)
    erofsmeta_ref.decide_versions(theirs, BUILD)
    assert _slots(inodes) == _slots(theirs)
    for odd in (
        {"type": NodeType.BLOCK},
        {"uid": fmt.EXTENDED_ID_MAX + 1},
        {"gid": True},
        {"mtime": 1 << 64},
        {"size": 1 << 64},
    ):
        inodes = _make([_PLAIN_SPEC, {**_PLAIN_SPEC, **odd}, _PLAIN_SPEC])
        assert _c_versions(inodes) == 2
        assert _c_versions(inodes, 3) == 4
    assert _c_versions(_make([_PLAIN_SPEC]), build=1 << 64) == 0  # a build time over 64 bits


def test_decide_versions_hands_back_what_it_cannot_read() -> None:
    class Sub(writer._Inode):
        __slots__ = ()

    inodes = _make([_PLAIN_SPEC, _PLAIN_SPEC])
    inodes[1] = Sub(inodes[1].node, b"s", inodes[0], ino=2)
    assert _c_versions(inodes) == 1
    unset = writer._Inode.__new__(writer._Inode)
    assert _c_versions([unset]) == 0
    with pytest.raises(AttributeError):
        writer._decide_inode_versions([unset], BUILD)
    no_content = _make([_PLAIN_SPEC])
    no_content[1].node.content = None
    assert _c_versions(no_content) == 1
    with pytest.raises(AssertionError):
        writer._decide_inode_versions(no_content, BUILD)


def test_decide_versions_refuses_bad_arguments() -> None:
    inode_f, node_f, content_f, types, limits = writer._VERSION_ARGS
    inodes = _make([_PLAIN_SPEC])
    bad: list[tuple[type[Exception], tuple[object, ...]]] = [
        (ValueError, (inodes, 0, BUILD, inode_f[1:], node_f, content_f, types, limits)),
        (
            TypeError,
            (inodes, 0, BUILD, (*inode_f[:-1], Node.uid), node_f, content_f, types, limits),
        ),
        (TypeError, (inodes, 0, BUILD, inode_f, node_f, (writer._Inode.path,), types, limits)),
        (ValueError, (inodes, 0, BUILD, inode_f, node_f, content_f, types[:2], limits)),
        (ValueError, (inodes, 0, BUILD, inode_f, node_f, content_f, types, limits[1:])),
        (ValueError, (inodes, 0, BUILD, inode_f, node_f, content_f, types, (-1, *limits[1:]))),
        (ValueError, (inodes, 0, BUILD, inode_f, node_f, content_f, types, (*limits[:5], 1 << 20))),
        (TypeError, (inodes, 0, "0", inode_f, node_f, content_f, types, limits)),
        (IndexError, (inodes, -1, BUILD, inode_f, node_f, content_f, types, limits)),
        (TypeError, (tuple(inodes), 0, BUILD, inode_f, node_f, content_f, types, limits)),
    ]
    for error, args in bad:
        with pytest.raises(error):
            _erofsmeta.decide_versions(*args)  # type: ignore[arg-type]
    assert _c_versions(inodes, 5) == 5  # past the end: nothing to do


def test_decide_versions_survives_a_release_that_empties_the_list() -> None:
    """An old slot value whose release runs code (here: empties the inode list) while C
    walks the list: no crash, the loop ends where the list does."""
    inodes = _make([_PLAIN_SPEC] * 4)

    class Clears:
        def __del__(self) -> None:
            inodes.clear()

    inodes[1].extended = Clears()  # type: ignore[assignment]
    assert _c_versions(inodes) == 2 and inodes == []


# --- place_plain ------------------------------------------------------------------------


@st.composite
def placed_specs(draw: st.DrawFn) -> tuple[str, int, int]:
    kind = draw(st.sampled_from(["file", "symlink", "dir", "fifo", "file", "file"]))
    size = draw(sizes.filter(lambda s: s < (1 << 63)))
    head = draw(
        st.one_of(
            st.sampled_from([32, 64]),
            ibodies.map(lambda n: 32 + n),
            st.sampled_from([0, -1, BLOCK - 1, BLOCK, BLOCK + 1, 1 << 62, (1 << 62) + 1]),
        )
    )
    return kind, size, head


_KINDS = {"file": NodeType.FILE, "symlink": NodeType.SYMLINK}


def _placed(specs: list[tuple[str, int, int]]) -> list[writer._Inode]:
    inodes = []
    for n, (kind, size, head) in enumerate(specs):
        node = Node(_KINDS.get(kind, NodeType.DIR if kind == "dir" else NodeType.FIFO))
        inode = writer._Inode(node, b"n", None, ino=n + 1)
        inode.size, inode.head_size = size, head
        inodes.append(inode)
    return inodes


class _Recording(writer._DataArea):
    """A data area that records the copies it is asked for instead of making them."""

    def __init__(self, next_block: int, inodes: list[writer._Inode]) -> None:
        super().__init__(-1, ContentReader(), next_block)
        self.index_of = {id(i.node): n for n, i in enumerate(inodes)}
        self.copies: list[tuple[int, int, int]] = []

    def _copy(self, node: Node, start: int, length: int, out_offset: int) -> None:
        assert start == 0
        self.copies.append((self.index_of[id(node)], out_offset, length))


_NEXT_BLOCKS = [1, 1 << 40, (1 << 63) // BLOCK - 2, (1 << 63) // BLOCK, 1 << 64]


@given(st.lists(placed_specs(), max_size=50), st.sampled_from(_NEXT_BLOCKS))
@settings(max_examples=400, deadline=None)
def test_place_plain_matches_the_reference(specs: list[tuple[str, int, int]], first: int) -> None:
    ours, theirs = _placed(specs), _placed(specs)
    data = _Recording(first, ours)
    data.place_all_plain(ours)
    assert (data.next_block, data.copies) == erofsmeta_ref.place_plain(theirs, first, BLOCK)
    assert _slots(ours) == _slots(theirs)


def test_place_plain_in_c_places_the_common_inodes() -> None:
    """Tails that just fit inline after their head, just do not, none, exact blocks."""
    specs = [
        ("file", size, head)
        for head in (32, 64, 32 + 12, BLOCK - 64)
        for size in (0, 1, BLOCK - head, BLOCK - head + 1, BLOCK, 3 * BLOCK, 3 * BLOCK + 7)
    ]
    specs += [("symlink", 5, 32), ("dir", 100, 32), ("fifo", 0, 32)]
    ours, theirs = _placed(specs), _placed(specs)
    stop, next_block, copies = _erofsmeta.place_plain(ours, 0, 1, *writer._PLAIN_ARGS)
    assert stop == len(ours)
    assert (next_block, copies) == erofsmeta_ref.place_plain(theirs, 1, BLOCK)
    assert _slots(ours) == _slots(theirs)
    layouts = [(i.datalayout, i.inline_len) for i in ours[:7]]
    assert layouts == [(0, 0), (2, 1), (2, BLOCK - 32), (0, 0), (0, 0), (0, 0), (2, 7)]


def test_place_plain_hands_back_what_it_cannot_read() -> None:
    inodes = _placed([("file", 5, 32), ("file", 1 << 63, 32), ("file", -1, 32), ("file", 1, 32)])
    assert _erofsmeta.place_plain(inodes, 0, 1, *writer._PLAIN_ARGS)[0] == 1
    assert _erofsmeta.place_plain(inodes, 2, 1, *writer._PLAIN_ARGS)[0] == 2
    assert _erofsmeta.place_plain(inodes, 3, 7, *writer._PLAIN_ARGS) == (4, 7, [])  # inline
    assert _erofsmeta.place_plain(inodes, 3, 1 << 64, *writer._PLAIN_ARGS) == (3, 1 << 64, [])
    assert _erofsmeta.place_plain(inodes, 3, -1, *writer._PLAIN_ARGS) == (3, -1, [])
    big = _placed([("file", (1 << 62), 32)])
    assert _erofsmeta.place_plain(big, 0, (1 << 63) // BLOCK - 1, *writer._PLAIN_ARGS)[0] == 0


def test_place_plain_refuses_bad_arguments() -> None:
    block, inode_f, node_f, data_types, layouts = writer._PLAIN_ARGS
    inodes = _placed([("file", 5, 32)])
    bad: list[tuple[type[Exception], tuple[object, ...]]] = [
        (ValueError, (inodes, 0, 1, 0, inode_f, node_f, data_types, layouts)),
        (ValueError, (inodes, 0, 1, 1 << 20, inode_f, node_f, data_types, layouts)),
        (ValueError, (inodes, 0, 1, block, inode_f, node_f, data_types, layouts[:1])),
        (ValueError, (inodes, -1, 1, block, inode_f, node_f, data_types, layouts)),
        (ValueError, (inodes, 0, 1, block, inode_f[:5], node_f, data_types, layouts)),
        (TypeError, (inodes, 0, 1, block, inode_f, (writer._Inode.path,), data_types, layouts)),
        (ValueError, (inodes, 0, 1, block, inode_f, (Node.type, Node.uid), data_types, layouts)),
        (TypeError, (inodes, 0, 1.0, block, inode_f, node_f, data_types, layouts)),
    ]
    for error, args in bad:
        with pytest.raises(error):
            _erofsmeta.place_plain(*args)  # type: ignore[arg-type]
    assert inodes[0].datalayout == fmt.INODE_FLAT_PLAIN and inodes[0].i_u == 0  # untouched
