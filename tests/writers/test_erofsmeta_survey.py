"""The erofs writer's other passes over every inode in C (_erofsmeta.survey, meta_sizes,
plan_dirents, with what they leave handled by the writer's Python) against the writer's
passes as they were in Python (tests/erofsmeta_ref.py): the same counts, file types, xattr
ibodies and shared table, meta sizes and directory plans, the same errors naming the same
paths, for any inodes, hostile values included."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import erofsmeta_ref
from vmimg.errors import WriterError
from vmimg.rootfs.tree import Node, NodeType
from vmimg.rootfs.writers.dirent import FILE_TYPES
from vmimg.rootfs.writers.erofs import _erofsmeta, writer
from vmimg.rootfs.writers.erofs import format as fmt

BLOCK = fmt.BLOCK_SIZE
NS = 1_000_000_000


class _Int(int):
    """An int of another class: C leaves it to Python."""


class _Dict(dict[bytes, bytes]):
    """A dict of another class: C lists its inode for _assign_xattrs to look at."""


def _mostly(
    common: st.SearchStrategy[Any], rare: list[Any], one_in: int = 25
) -> st.SearchStrategy[Any]:
    """Ordinary values, else (one time in `one_in`) a hostile one."""
    return st.integers(1, one_in).flatmap(lambda k: st.sampled_from(rare) if k == 1 else common)


def _outcome(call: Callable[[], object]) -> tuple[object, object]:
    """What a call returns, or the type and message of what it raised."""
    try:
        return call(), None
    except Exception as e:  # whatever it is, the other side must raise it too
        return None, (type(e), str(e))


def _typed(values: Any) -> list[tuple[type, Any]]:
    """Values with their types: True and 1, 1.0 and 1 are equal but not the same."""
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return [(type(k), k, type(v), v) for k, v in items]


# --- survey ---------------------------------------------------------------------------

# A few shared times (runs of equal ones, as in a layer), before 1970, past 64 bits.
plain_mtimes = st.one_of(st.sampled_from([7, 7, 7, 1700000000 * NS, 0, 3, -1]), st.integers())
mtimes = _mostly(
    plain_mtimes,
    [-1, -NS - 1, (1 << 63) - 1, 1 << 63, 1 << 64, 1 << 100, -(1 << 100), True, False,
     1.0, 7.0, -0.5, float("nan"), _Int(7), _Int(-3)],
)  # fmt: skip
plain_types = st.sampled_from(list(NodeType))
node_types = _mostly(plain_types, ["file", None], one_in=300)  # KeyError: rarely
plain_xattrs = st.sampled_from([{}, {}, {}, {b"user.a": b"v"}])
xattrs = _mostly(
    plain_xattrs,
    [None, [], [(b"user.a", b"v")], _Dict(), _Dict({b"user.a": b"v"}), "", 0, {b"user.b": b""}],
)
# The rest: an mtime nothing can compare, slots unset, inodes and nodes of other classes.
# (Unset xattrs are _assign_xattrs's to find: test_xattrs_assigned_as_before.)
odd = ["no mtime", "bad mtime", "no type", "other inode", "other node"]


@st.composite
def survey_inodes(draw: st.DrawFn, hostile: bool = True) -> list[Any]:
    inodes: list[Any] = []
    for ino in range(1, draw(st.integers(0, 30)) + 1):
        node = Node(
            draw(node_types if hostile else plain_types),
            mtime_ns=draw(mtimes if hostile else plain_mtimes),
            xattrs=draw(xattrs if hostile else plain_xattrs),
        )
        inode: Any = writer._Inode(node, b"n", None, ino)
        kind = draw(st.integers(0, 200 * len(odd) - 1)) if hostile else -1
        if kind == 0:
            del node.mtime_ns
        elif kind == 1:
            node.mtime_ns = object()  # type: ignore[assignment]
        elif kind == 2:
            del node.type
        elif kind == 3:
            inode = types.SimpleNamespace(node=node)
        elif kind == 4:
            inode.node = types.SimpleNamespace(
                type=node.type, mtime_ns=node.mtime_ns, xattrs=node.xattrs
            )
        inodes.append(inode)
    return inodes


def _ordinary(inodes: list[Any]) -> bool:
    """Whether every inode is one C surveys itself."""
    return _erofsmeta.survey(
        inodes, 0, writer._SURVEY_SHAPES, {}, bytearray(len(inodes)), []
    ) == len(inodes)


@given(survey_inodes())
@settings(max_examples=500, deadline=None)
def test_survey_is_the_references(inodes: list[Any]) -> None:
    ours, ours_error = _outcome(lambda: writer._survey(inodes))
    ref, ref_error = _outcome(lambda: erofsmeta_ref.survey(inodes, FILE_TYPES))
    assert ours_error == ref_error
    if ref_error is not None:
        return
    assert isinstance(ours, tuple) and isinstance(ref, tuple)
    (counts, file_types, with_xattrs), (ref_counts, ref_types, ref_with) = ours, ref
    assert _typed(counts) == _typed(ref_counts)  # the same keys, in the same order
    assert file_types == ref_types
    # all the reference lists, and the inodes C leaves to Python (whatever their xattrs)
    assert with_xattrs == sorted(set(with_xattrs)) and set(ref_with) <= set(with_xattrs)
    if _ordinary(inodes):
        assert with_xattrs == ref_with
    build_time = writer._most_common_mtime(counts)
    assert _typed([build_time]) == _typed([erofsmeta_ref.most_common_mtime(inodes)])


@given(survey_inodes(hostile=False))
@settings(max_examples=200, deadline=None)
def test_survey_does_ordinary_inodes_in_c(inodes: list[Any]) -> None:
    """Ints, NodeTypes and dicts: C surveys every inode itself, as the reference would."""
    counts: dict[int, int] = {}
    file_types, with_xattrs = bytearray(b"\xee" * len(inodes)), []
    stop = _erofsmeta.survey(inodes, 0, writer._SURVEY_SHAPES, counts, file_types, with_xattrs)
    assert stop == len(inodes)
    ref = erofsmeta_ref.survey(inodes, FILE_TYPES)
    assert (_typed(counts), bytes(file_types), with_xattrs) == (_typed(ref[0]), *ref[1:])


def test_most_common_mtime_breaks_ties_to_the_smallest() -> None:
    def nodes(*times: Any) -> list[Any]:
        return [writer._Inode(Node(NodeType.FILE, mtime_ns=t), b"f", None, 1) for t in times]

    for times, best in [
        ((), 0),
        ((-5, -5), 0),  # none after 1970: the superblock's time is unsigned
        ((9, 9, 3, 3, 5), 3),  # tied: the smallest
        ((1 << 70, 1 << 70, 2), 1 << 70),
        ((7, True, 1, 7), 1),  # True counts as 1, its key the first given: True
    ]:
        inodes = nodes(*times)
        ours = writer._most_common_mtime(writer._survey(inodes)[0])
        assert ours == best and type(ours) is type(erofsmeta_ref.most_common_mtime(inodes))
    ours = writer._most_common_mtime(writer._survey(nodes(True, 1, 1, 7))[0])
    assert ours is True


def test_survey_counts_keys_python_counted_first() -> None:
    """A run C counts adds to a key the Python side counted (an int equal to a bool), and a
    key whose __eq__ runs code is compared safely."""
    counts: dict[Any, int] = {True: 2}
    inodes = [writer._Inode(Node(NodeType.FILE, mtime_ns=1), b"f", None, 1) for _ in range(3)]
    stop = _erofsmeta.survey(inodes, 0, writer._SURVEY_SHAPES, counts, bytearray(3), [])
    assert stop == 3 and _typed(counts) == [(bool, True, int, 5)]

    first = 10**12

    class Rude:
        def __hash__(self) -> int:
            return hash(first)

        def __eq__(self, other: object) -> bool:
            rude.clear()  # the list shrinks under the loop, its inodes and mtimes go
            return False

    counts = {Rude(): 1}
    times = (first, first + 1, first + 2)
    rude = [writer._Inode(Node(NodeType.FILE, mtime_ns=t), b"f", None, 1) for t in times]
    del times
    stop = _erofsmeta.survey(rude, 0, writer._SURVEY_SHAPES, counts, bytearray(3), [])
    # the run of `first` ends at the second inode: its flush empties the list
    assert stop == 2 and sorted(c for c in counts if type(c) is int) == [first, first + 1]


def test_survey_refuses_bad_input() -> None:
    inodes = [writer._Inode(Node(NodeType.FILE), b"f", None, 1)]
    shapes = writer._SURVEY_SHAPES
    counts: dict[int, int] = {}
    file_types, with_xattrs = bytearray(1), []
    bad: list[tuple[type[Exception], tuple[object, ...]]] = [
        (ValueError, (inodes, 0, shapes, counts, bytearray(2), with_xattrs)),  # one per inode
        (ValueError, (inodes, -1, shapes, counts, file_types, with_xattrs)),
        (ValueError, (inodes, 2, shapes, counts, file_types, with_xattrs)),
        (TypeError, (inodes, 0, shapes, counts, bytes(1), with_xattrs)),  # not writable
        (TypeError, (inodes, 0, shapes, [], file_types, with_xattrs)),
        (TypeError, (inodes, 0, shapes[1:], counts, file_types, with_xattrs)),
        (TypeError, (inodes, 0, (shapes[1], *shapes[1:]), counts, file_types, with_xattrs)),
        (TypeError, (inodes, 0, (*shapes[:2], ((NodeType.FILE, 256),)), counts, file_types, [])),
        (TypeError, (inodes, 0, (*shapes[:2], ((NodeType.FILE, True),)), counts, file_types, [])),
        (TypeError, (tuple(inodes), 0, shapes, counts, file_types, with_xattrs)),
    ]
    for error, args in bad:
        with pytest.raises(error):
            _erofsmeta.survey(*args)  # type: ignore[arg-type]
    assert (counts, file_types, with_xattrs) == ({}, bytearray(1), [])


# --- xattrs ------------------------------------------------------------------------------

xattr_names = _mostly(
    st.sampled_from([b"user.a", b"user.b", b"trusted.t", b"security.selinux",
                     b"system.posix_acl_access", b"user." + b"n" * 255, b"user."]),
    [b"user." + b"n" * 256, b"bogus.x"],  # WriterError
    one_in=60,
)  # fmt: skip
xattr_values = st.sampled_from([b"", b"v", b"w" * 100, b"x" * 1000])
xattr_dicts = _mostly(
    st.one_of(st.just({}), st.dictionaries(xattr_names, xattr_values, max_size=3)),
    [None, [], [(b"user.a", b"v")], _Dict(), _Dict({b"user.a": b"v"}),
     {b"user.%d" % i: b"v" * 200 for i in range(300)},  # an ibody too large
     {b"user.a": b"x" * (fmt.XATTR_VALUE_SIZE_MAX + 1)}],
    one_in=60,
)  # fmt: skip


@st.composite
def xattr_inodes(draw: st.DrawFn) -> list[writer._Inode]:
    """Inodes under one root, each named (its path names it in an error)."""
    root = writer._Inode(Node(NodeType.DIR), b"/", None, 1)
    inodes = [root]
    for ino in range(2, draw(st.integers(1, 20)) + 2):
        mtime = draw(_mostly(st.just(7), [True, 1.0]))  # now and then left to Python
        node = Node(NodeType.FILE, mtime_ns=mtime, xattrs=draw(xattr_dicts))
        if draw(st.integers(0, 199)) == 0:
            del node.xattrs  # what was an AttributeError still is
        inodes.append(writer._Inode(node, b"f%d" % ino, root, ino))
    return inodes


def _xattrs_outcome(assign: Callable[[], bytes], inodes: list[writer._Inode]) -> object:
    table, error = _outcome(assign)
    return table, error, [i.xattr_ibody for i in inodes]


@given(xattr_inodes())
@settings(max_examples=300, deadline=None)
def test_xattrs_assigned_as_before(inodes: list[writer._Inode]) -> None:
    """Only the inodes survey lists are looked at: the same ibodies and shared table, the
    same error naming the same inode first, as when every inode was looked at."""
    _counts, _types, with_xattrs = writer._survey(inodes)
    ours = _xattrs_outcome(lambda: writer._assign_xattrs(inodes, with_xattrs), inodes)
    for inode in inodes:
        inode.xattr_ibody = b""
    ref = _xattrs_outcome(lambda: erofsmeta_ref.assign_xattrs(inodes, writer._xattr_key), inodes)
    assert ours == ref


def test_xattr_errors_name_the_first_inode_in_order() -> None:
    root = writer._Inode(Node(NodeType.DIR), b"/", None, 1)
    inodes = [root]
    for ino, x in enumerate([{}, {b"user.a": b"v"}, {b"bogus.1": b""}, {b"bogus.2": b""}], 2):
        inodes.append(writer._Inode(Node(NodeType.FILE, xattrs=x), b"f%d" % ino, root, ino))
    inodes[4].node.mtime_ns = True  # type: ignore[assignment]  # left to Python
    _counts, _types, with_xattrs = writer._survey(inodes)
    assert with_xattrs == [2, 3, 4]
    with pytest.raises(WriterError, match=r"b'bogus.1' of '/f4'"):
        writer._assign_xattrs(inodes, with_xattrs)


# --- meta sizes -----------------------------------------------------------------------------

parts = _mostly(
    st.integers(0, 2 * BLOCK),
    [-1, (1 << 62) - 1, 1 << 62, -(1 << 62) + 1, -(1 << 62), (1 << 63) - 1, 1 << 63, 1 << 70,
     True, False, 1.5, _Int(3), None],
    one_in=15,
)  # fmt: skip


class _FakeCompressed:
    """What meta_size asks of a compressed file: the bytes of its indexes."""

    def __init__(self, size: int) -> None:
        self.size = size

    def metadata_size(self, head_size: int) -> int:
        return head_size + self.size


@st.composite
def sized_inodes(draw: st.DrawFn) -> list[Any]:
    inodes: list[Any] = []
    for ino in range(1, draw(st.integers(0, 30)) + 1):
        inode: Any = writer._Inode(Node(NodeType.FILE), b"f", None, ino)
        inode.head_size, inode.inline_len = draw(parts), draw(parts)
        kind = draw(st.integers(0, 199))
        if kind < 20:
            inode.compressed = _FakeCompressed(draw(st.integers(0, 5 * BLOCK)))
        elif kind == 4:
            del inode.inline_len
        elif kind == 5:
            inode = types.SimpleNamespace(meta_size=draw(parts), compressed=None)
        elif kind == 6:
            inode.compressed = 0  # not None: meta_size asks it, and it cannot answer
        inodes.append(inode)
    return inodes


@given(sized_inodes())
@settings(max_examples=500, deadline=None)
def test_meta_sizes_are_the_references(inodes: list[Any]) -> None:
    ours, ours_error = _outcome(lambda: writer._meta_sizes(inodes))
    ref, ref_error = _outcome(lambda: erofsmeta_ref.meta_sizes(inodes))
    assert ours_error == ref_error
    if ref_error is None:
        assert isinstance(ours, tuple) and isinstance(ref, tuple)
        assert _typed(ours[0]) == _typed(ref[0]) and ours[1] is ref[1]


def test_meta_sizes_does_plain_inodes_in_c() -> None:
    E = 1 << 62  # C sums head_size and inline_len below it in size
    inodes = [writer._Inode(Node(NodeType.FILE), b"f", None, ino) for ino in range(4)]
    for inode, (head, inline) in zip(
        inodes, [(32, 0), (64, 4000), (E - 1, E - 1), (1 - E, 5)], strict=True
    ):
        inode.head_size, inode.inline_len = head, inline
    sizes, left = _erofsmeta.meta_sizes(inodes, writer._META_SIZE_SLOTS)
    assert sizes == [32, 4064, 2 * E - 2, 6 - E] and left == []
    inodes[1].compressed = _FakeCompressed(8)  # type: ignore[assignment]
    inodes[2].head_size = E  # with E - 1, past 64 bits: Python's
    inodes[3].inline_len = E + 1
    sizes, left = _erofsmeta.meta_sizes(inodes, writer._META_SIZE_SLOTS)
    assert sizes == [32, None, None, None] and left == [1, 2, 3]
    assert writer._meta_sizes(inodes) == ([32, 72, 2 * E - 1, 2], True)


def test_meta_sizes_refuses_bad_input() -> None:
    inodes = [writer._Inode(Node(NodeType.FILE), b"f", None, 1)]
    for fields in [
        writer._META_SIZE_SLOTS[:2],
        writer._META_SIZE_SLOTS[::-1],
        (writer._Inode.head_size, writer._Inode.inline_len, Node.mode),
        _erofsmeta,
    ]:
        with pytest.raises(TypeError):
            _erofsmeta.meta_sizes(inodes, fields)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _erofsmeta.meta_sizes(tuple(inodes), writer._META_SIZE_SLOTS)  # type: ignore[arg-type]


# --- directory plans ------------------------------------------------------------------------

dir_names = st.one_of(
    st.binary(min_size=1, max_size=fmt.NAME_LEN_MAX),
    st.sampled_from([b".", b"..", b"x" * fmt.NAME_LEN_MAX, b"y" * (BLOCK - 11), b"z" * BLOCK]),
)
odd_names = st.sampled_from(["str", b"", bytearray(b"ba"), None])


@st.composite
def planned_directories(draw: st.DrawFn, hostile: bool = True) -> list[Any]:
    """Directories of few to many entries (a block boundary anywhere), now and then a name
    that is no bytes."""
    directories: list[Any] = []
    for ino in range(1, draw(st.integers(0, 8)) + 1):
        inode: Any = writer._Inode(Node(NodeType.DIR), b"d", None, ino)
        pool = draw(st.lists(dir_names, min_size=1, max_size=6))
        count = draw(st.integers(0, draw(st.sampled_from([2, 5, 40, 300, 700]))))
        seed = draw(st.integers(0, 99))
        names: list[Any] = [pool[(k * k + seed) % len(pool)] for k in range(count)]
        if hostile and names and draw(st.integers(0, 14)) == 0:
            names[draw(st.integers(0, len(names) - 1))] = draw(odd_names)
        inode.names = names
        kind = draw(st.integers(0, 99)) if hostile else -1
        if kind == 0:
            inode.names = tuple(inode.names)
        elif kind == 1:
            del inode.names
        elif kind == 2:
            inode = types.SimpleNamespace(names=inode.names, block_starts=[], size=0)
        directories.append(inode)
    return directories


def _plans(directories: list[Any]) -> list[object]:
    return [
        (_typed(getattr(d, "block_starts", [])), _typed([getattr(d, "size", None)]))
        for d in directories
    ]


@given(planned_directories())
@settings(max_examples=300, deadline=None)
def test_directories_planned_as_the_reference_plans_them(directories: list[Any]) -> None:
    ours = _outcome(lambda: writer._plan_directories(directories)), _plans(directories)
    for d in directories:
        d.block_starts, d.size = writer._NO_LIST, 0
    ref = (
        _outcome(lambda: erofsmeta_ref.plan_dirents(directories, fmt.DIRENT_SIZE, BLOCK)),
        _plans(directories),
    )
    assert ours == ref


@given(planned_directories(hostile=False), st.sampled_from([(12, 64), (12, 512), (16, 4096)]))
@settings(max_examples=200, deadline=None)
def test_plan_dirents_other_geometries(directories: list[Any], geometry: tuple[int, int]) -> None:
    """Bytes names in lists: C plans every directory itself, as the reference does."""
    dirent, block = geometry
    stop = _erofsmeta.plan_dirents(directories, 0, writer._PLAN_SLOTS, dirent, block)
    ours = _plans(directories)
    erofsmeta_ref.plan_dirents(directories, dirent, block)
    assert stop == len(directories) and ours == _plans(directories)


def test_plan_dirents_refuses_bad_input() -> None:
    directories = [writer._Inode(Node(NodeType.DIR), b"d", None, 1)]
    slots = writer._PLAN_SLOTS
    bad: list[tuple[type[Exception], tuple[object, ...]]] = [
        (ValueError, (directories, 0, slots, 12, 0)),
        (ValueError, (directories, 0, slots, 12, 1 << 17)),
        (ValueError, (directories, 0, slots, 0, BLOCK)),
        (ValueError, (directories, 0, slots, BLOCK + 1, BLOCK)),
        (ValueError, (directories, -1, slots, 12, BLOCK)),
        (ValueError, (directories, 2, slots, 12, BLOCK)),
        (TypeError, (directories, 0, slots[:2], 12, BLOCK)),
        (TypeError, (directories, 0, (slots[0], slots[2], slots[1]), 12, BLOCK)),
        (TypeError, (tuple(directories), 0, slots, 12, BLOCK)),
    ]
    for error, args in bad:
        with pytest.raises(error):
            _erofsmeta.plan_dirents(*args)  # type: ignore[arg-type]
    assert directories[0].block_starts is writer._NO_LIST
