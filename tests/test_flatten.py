"""Flattening: the OCI layer rules, checked by hand and against umoci unpack."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tarfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from tests import layerkit as L
from tests.conftest import need
from tests.treecheck import Checks, compare_tree_with_dir
from vmimg.errors import LayerError, TreeError
from vmimg.image.cache import Cache
from vmimg.image.layers import Entry, Extent, LayerFile
from vmimg.image.oci import Platform
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout
from vmimg.image.sources import SourceOptions, open_image
from vmimg.rootfs import flatten as flatten_module
from vmimg.rootfs import tree as tree_module
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.convert import build_tree
from vmimg.rootfs.flatten import flatten
from vmimg.rootfs.tree import PATH_MAX, Content, Node, NodeType, Tree

CAP = "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
LONG = "n" * 200

LOWER = L.layer(
    L.dir("etc"),
    L.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    L.file("etc/motd", b"old motd\n"),
    L.file("etc/removed", b"to be whited out\n"),
    L.dir("opt/app"),
    L.file("opt/app/a", b"a"),
    L.dir("opt/app/sub"),
    L.file("opt/app/sub/c", b"c"),
    L.file("bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000),
    L.dir("tmp", mode=0o1777),
    L.dir("usr/lib"),
    L.file(
        "usr/lib/data",
        b"data",
        pax={"SCHILY.xattr.user.test": "v", "SCHILY.xattr.security.capability": CAP},
    ),
    L.hardlink("usr/lib/data_link", "usr/lib/data"),
    L.symlink("lib", "usr/lib"),
    L.chardev("dev/null", 1, 3, mode=0o666),
    L.blockdev("dev/sda", 8, 0, mode=0o660, gid=6),
    L.fifo("run/fifo", mode=0o600),
    L.file("typechange/f", b"a file, later a dir"),
    L.dir("typechange/d"),
    L.file("typechange/d/child", b"goes away with its dir"),
    L.file(
        f"deep/{LONG}/{LONG}/file",
        b"long names",
        mtime=1_600_000_000.123456789,
        pax={"mtime": "1600000000.123456789"},
    ),
    L.file("setgid", b"", mode=0o2755),
)

UPPER = L.layer(
    L.file("opt/app/new", b"added before the opaque marker"),
    L.opaque("opt/app"),
    L.whiteout("etc/removed"),
    L.dir("etc", mode=0o700, uid=5, gid=6),
    L.file("typechange/d", b"now a file"),
    L.dir("typechange/f"),
    L.file("typechange/f/inner", b"inside"),
    L.file("lib/viasymlink", b"written through the symlink"),
    L.hardlink("bin/tool2", "bin/tool"),
    L.file("etc/motd", b"new motd\n", uid=7),
    L.file("newdir/sub/file", b"parents implied"),
)


@pytest.fixture(scope="module")
def matrix_layout(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("matrix") / "layout")
    write_layout(
        root,
        {
            "v1": ImageSpec([LayerSpec(LOWER, "gzip"), LayerSpec(UPPER, "zstd")]),
            # Debian's umoci reads no zstd layers: the same image, gzip only, for it.
            "gz": ImageSpec([LayerSpec(LOWER, "gzip"), LayerSpec(UPPER, "gzip")]),
        },
    )
    return root


@pytest.fixture
def matrix_tree(matrix_layout: str, cache: Cache) -> Tree:
    image = open_image(f"oci:{matrix_layout}:v1", cache, SourceOptions(Platform()))
    return build_tree(image, cache)


def _fields(tree: Tree) -> list[tuple[bytes, list[object]]]:
    """Every entry with every field of its node (a directory's children by name)."""
    out = []
    for path, node in tree.walk():
        values = [getattr(node, f.name) for f in dataclasses.fields(node)]
        values[[f.name for f in dataclasses.fields(node)].index("children")] = (
            None if node.children is None else sorted(node.children)
        )
        out.append((path, values))
    return out


def test_nodes_made_in_c_are_those_init_makes(
    matrix_layout: str, matrix_tree: Tree, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree_module, "_new_slotted", None)
    image = open_image(f"oci:{matrix_layout}:v1", cache, SourceOptions(Platform()))
    by_init = build_tree(image, cache)
    assert _fields(by_init) == _fields(matrix_tree)
    file = matrix_tree.get(b"/etc/motd")
    assert file is not None and file.content is not None
    assert type(file) is Node and type(file.content) is Content
    with pytest.raises(dataclasses.FrozenInstanceError):
        file.content.size = 0  # type: ignore[misc]


def names(tree: Tree, path: bytes) -> list[bytes]:
    node = tree.get(path)
    assert node is not None and node.children is not None
    return sorted(node.children)


def read(tree: Tree, path: bytes) -> bytes:
    node = tree.get(path)
    assert node is not None and node.content is not None
    with ContentReader() as r:
        return r.read_all(node.content)


def test_whiteouts_and_opaque_dirs(matrix_tree: Tree) -> None:
    assert names(matrix_tree, b"/opt/app") == [b"new"]  # opaque applied first, new kept
    assert matrix_tree.get(b"/etc/removed") is None
    assert not any(b".wh." in p for p, _ in matrix_tree.walk())


def test_directory_attributes_replaced_children_kept(matrix_tree: Tree) -> None:
    etc = matrix_tree.get(b"/etc")
    assert etc is not None and (etc.mode, etc.uid, etc.gid) == (0o700, 5, 6)
    assert names(matrix_tree, b"/etc") == [b"motd", b"passwd"]
    assert read(matrix_tree, b"/etc/motd") == b"new motd\n"


def test_type_changes(matrix_tree: Tree) -> None:
    d = matrix_tree.get(b"/typechange/d")
    f = matrix_tree.get(b"/typechange/f")
    assert d is not None and d.type is NodeType.FILE
    assert read(matrix_tree, b"/typechange/d") == b"now a file"
    assert f is not None and f.type is NodeType.DIR
    assert names(matrix_tree, b"/typechange/f") == [b"inner"]


def test_links_devices_and_modes(matrix_tree: Tree) -> None:
    t = matrix_tree
    assert t.get(b"/usr/lib/data") is t.get(b"/usr/lib/data_link")
    assert t.get(b"/bin/tool2") is t.get(b"/bin/tool")  # hardlink across layers
    tool = t.get(b"/bin/tool")
    assert tool is not None and (tool.mode, tool.uid, tool.gid) == (0o4755, 1000, 1000)
    assert t.link_counts()[id(tool)] == 2
    lib = t.get(b"/lib")
    assert lib is not None and lib.type is NodeType.SYMLINK and lib.target == b"usr/lib"
    assert read(t, b"/usr/lib/viasymlink") == b"written through the symlink"
    null = t.get(b"/dev/null")
    assert null is not None and null.type is NodeType.CHAR and null.rdev == (1, 3)
    sda = t.get(b"/dev/sda")
    assert sda is not None and sda.type is NodeType.BLOCK and sda.rdev == (8, 0)
    fifo = t.get(b"/run/fifo")
    assert fifo is not None and fifo.type is NodeType.FIFO
    tmp = t.get(b"/tmp")
    assert tmp is not None and tmp.mode == 0o1777
    data = t.get(b"/usr/lib/data")
    assert data is not None and data.xattrs[b"user.test"] == b"v"
    assert data.xattrs[b"security.capability"] == CAP.encode("latin-1")


def test_long_names_nanoseconds_and_implied_parents(matrix_tree: Tree) -> None:
    path = f"/deep/{LONG}/{LONG}/file".encode()
    node = matrix_tree.get(path)
    assert node is not None and node.mtime_ns == 1_600_000_000_123_456_789
    assert read(matrix_tree, b"/newdir/sub/file") == b"parents implied"
    implied = matrix_tree.get(b"/newdir")
    assert implied is not None and implied.is_dir and implied.mode == 0o755


def test_matches_umoci_unpack(matrix_layout: str, matrix_tree: Tree, tmp_path: Path) -> None:
    """umoci, an independent implementation of the layer rules, must agree entry by entry."""
    bundle = tmp_path / "bundle"
    subprocess.run(
        [need("umoci"), "unpack", "--image", f"{matrix_layout}:gz", str(bundle)],
        check=True,
        capture_output=True,
    )
    with ContentReader() as reader:
        problems = compare_tree_with_dir(matrix_tree, reader, str(bundle / "rootfs"), Checks())
    assert problems == []


def _flatten_one(tmp_path: Path, data: bytes) -> Tree:
    p = tmp_path / "layer.tar"
    p.write_bytes(data)
    return flatten([LayerFile(str(p), "sha256:test")])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([L.file("../escape", b"x")], "entry '../escape': path leaves the root"),
        ([L.file("a/../../b", b"x")], "path leaves the root"),
        ([L.hardlink("x", "missing")], "entry 'x': hardlink to missing 'missing'"),
        ([L.file(".wh.", b"")], "entry '.wh.': invalid whiteout"),
        ([L.dir("d"), L.hardlink("h", "d")], "hardlink to directory 'd'"),
    ],
)
def test_bad_entries_name_layer_and_entry(tmp_path: Path, entries: list[L.E], message: str) -> None:
    with pytest.raises(LayerError) as err:
        _flatten_one(tmp_path, L.layer(*entries))
    assert "layer sha256:test" in str(err.value)
    assert message in str(err.value)


def test_absolute_paths_stay_inside_and_symlinks_resolve_inside(tmp_path: Path) -> None:
    tree = _flatten_one(
        tmp_path,
        L.layer(
            L.file("/etc/abs", b"absolute"),
            L.symlink("escape", "/../../../../tmp"),
            L.file("escape/through", b"stays in the root"),
        ),
    )
    assert tree.get(b"/etc/abs") is not None
    # The symlink points "outside"; writing through it lands inside the tree's /tmp.
    assert tree.get(b"/tmp/through") is not None
    assert not os.path.exists("/tmp/through")


def test_invalid_utf8_names_survive(tmp_path: Path) -> None:
    tree = _flatten_one(
        tmp_path,
        L.layer(
            L.file(
                "bad\udcff",
                b"x",
            ),
            fmt=tarfile.PAX_FORMAT,
        ),
    )
    assert tree.get(b"/bad\xff") is not None


# -- the C fast path (_flatten.apply_files) against apply_entry -----------------------------

# Entry names: mostly plain files in a few directories (what the C path takes), among
# directories, links, whiteouts and names that climb, fail NAME_MAX or PATH_MAX, or go
# through a symlink ("s") or a file ("a/f" as a directory).
DEEP = b"/".join([b"d" * 250] * 16)  # 4015 bytes: a name of 100 more is past PATH_MAX
# Each hostile choice is rarer than the plain ones, and half the layers have none, so that
# many stacks flatten (and the C path has long runs to take).
PLAIN_HEADS = (b"", b"a", b"a/b", b"./a", b"/a/b", b"a//b", b"a/./b", b"s", b"s/b", b"e")
HEADS = (*PLAIN_HEADS * 6, b"a/f", b"a/b/", DEEP, b"a/..", b"../a")
PLAIN_LEAVES = (b"f", b"g", b"h", b"b", b"s")
LEAVES = (*PLAIN_LEAVES * 12, b".wh.f", b".wh..wh..opq", b".wh.", b".", b"", b"\xff",
          b"n" * 100, b"..", b"n" * 256)  # fmt: skip
PLAIN_TYPES = (*[b"0"] * 12, b"\0", b"7", b"S", b"5", b"5", b"5", b"2", b"2", b"3", b"6")
FLAT_TYPES = (*PLAIN_TYPES, b"1", b"1", b"9")
LINK_TARGETS = (b"a", b"a/b", b"a/f", b"/a/b/g", b"a/b/f", b"s", b"e", b"../a", b"missing", b"")


def _name(head: bytes, leaf: bytes) -> bytes:
    return head + b"/" + leaf if head else leaf


@st.composite
def _entries(draw: st.DrawFn) -> list[Entry]:
    out = []
    hostile = draw(st.booleans())
    heads = st.sampled_from(HEADS if hostile else PLAIN_HEADS)
    leaves = st.sampled_from(LEAVES if hostile else PLAIN_LEAVES)
    types = st.sampled_from(FLAT_TYPES if hostile else PLAIN_TYPES)
    for i in range(draw(st.integers(1, 30))):
        kind = draw(types)
        link = draw(st.sampled_from(LINK_TARGETS)) if kind in (b"1", b"2") else b""
        out.append(
            Entry(
                _name(draw(heads), draw(leaves)),
                kind,
                draw(st.sampled_from((0o644, 0o644, 0o104755, -1, 1 << 70))),
                draw(st.sampled_from((0, 1000))),
                0,
                draw(st.sampled_from((0, 10**18, -(10**9)))),
                draw(st.sampled_from((0, 5))),
                link,
                1,
                3,
                512 * (i + 1),
                draw(st.sampled_from(({}, {}, {}, {b"user.a": b"1"}))),
                (Extent(0, 5),) if kind == b"S" else None,
            )
        )
    return out


def _tree_dump(tree: Tree) -> list[tuple[bytes, int, list[object]]]:
    """_fields, and which earlier path holds the same node (hardlinks are shared nodes)."""
    first: dict[int, int] = {}
    dump = []
    for i, ((path, node), (_, values)) in enumerate(zip(tree.walk(), _fields(tree), strict=True)):
        dump.append((path, first.setdefault(id(node), i), values))
    return dump


def _flattened(stack: list[list[Entry]]) -> object:
    """The tree flatten makes of the layers' entries (copies: flatten consumes its lists),
    or the error it raises."""
    layers = [LayerFile(f"/layer{i}.tar", f"l{i}", list(es)) for i, es in enumerate(stack)]
    try:
        return _tree_dump(flatten(layers))
    except LayerError as e:
        return str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_entries(), min_size=1, max_size=3))
def test_c_fast_path_makes_the_tree_and_errors_apply_entry_makes(
    stack: list[list[Entry]],
) -> None:
    """The reference: apply_entry alone, each entry's parent found by _place, as before
    directories were remembered for the entries inside them (_remember_dir)."""
    with_c = _flattened(stack)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flatten_module, "_apply_files", None)
        remembering = _flattened(stack)
        mp.setattr(flatten_module._Flattener, "_remember_dir", lambda *_: None)
        assert _flattened(stack) == remembering == with_c


@pytest.mark.parametrize("over", [0, 1])
@pytest.mark.parametrize("head", [b"", b"./", b"s/"])
def test_a_remembered_directory_bounds_paths_as_placing_its_entries_would(
    over: int, head: bytes
) -> None:
    """Directory entries, then a file in the deepest whose path is PATH_MAX bytes long, or
    one more: the same tree or the same error as the reference (every parent found by
    _place), through a symlinked directory too ("s" -> "a")."""
    parts = [b"d" * 250] * 16
    dirs = [head + b"/".join(parts[: i + 1]) for i in range(len(parts))]
    written = len(b"/".join(parts)) + 1  # the file's directory part and its "/"
    leaf = b"n" * (PATH_MAX - written + over)
    plain = (0o755, 0, 0, 0, 0, b"", 0, 0, 512, {}, None)
    entries = [Entry(b"a", b"5", *plain), Entry(b"s", b"2", *plain[:5], b"a", *plain[6:])]
    entries += [Entry(d, b"5", *plain) for d in dirs]
    entries.append(Entry(dirs[-1] + b"/" + leaf, b"0", *plain))
    result = _flattened([entries])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flatten_module, "_apply_files", None)
        mp.setattr(flatten_module._Flattener, "_remember_dir", lambda *_: None)
        assert _flattened([entries]) == result
    assert isinstance(result, str) == (over > 0 or head == b"s/"), result


def _applied(f: flatten_module._Flattener, *in_order: Entry) -> list[bytes]:
    """What apply_files applies of `in_order` into `f`: the names it leaves, in order."""
    entries = list(reversed(in_order))
    assert flatten_module._apply_files is not None
    taken = flatten_module._apply_files(entries, f.parents, f.times, "t", flatten_module._SHAPES)
    assert taken == len(in_order) - len(entries)
    return [e.name for e in reversed(entries)]


def test_c_fast_path_takes_plain_files_and_hands_back_the_rest() -> None:
    def file(name: bytes, **kw: object) -> Entry:
        return dataclasses.replace(Entry(name, b"0", 0o100644, 0, 0, 7, 1, b"", 0, 0, 512), **kw)

    f = flatten_module._Flattener()
    f.apply_entry(file(b"d/first"), "t")  # Python: the parent is made and remembered
    f.apply_entry(file(DEEP + b"/f"), "t")
    rest = [file(b"d/.wh.x"), file(b"d/h", type=b"1", linkname=b"d/first"), file(b"d/y")]
    assert _applied(f, file(b"d/second"), file(b"d/first", mode=0o4755), *rest) == [
        b"d/.wh.x", b"d/h", b"d/y"]  # fmt: skip
    handed_back = [file(b"d/x", xattrs={b"user.a": b""}), file(b"e/x"), file(b"d/.."),
                   file(b"d/" + b"n" * 256), file(b"d/s", type=b"2"),
                   file(b"d/", type=b"5"), file(DEEP + b"/" + b"n" * 100)]  # fmt: skip
    for e in handed_back:
        assert _applied(f, e) == [e.name]
    with pytest.raises(TreeError, match="path longer than 4096 bytes"):
        f.apply_entry(handed_back[-1], "t")  # Python raises what C handed back
    d = f.tree.get(b"/d")
    assert d is not None and d.children is not None and sorted(d.children) == [b"first", b"second"]
    node = d.children[b"first"]
    assert node.mode == 0o4755 and node.content == Content(1, "t", 512)
    assert node.xattrs is flatten_module._NO_XATTRS and node.rdev is tree_module.NO_RDEV
    for bad in ((), flatten_module._SHAPES[:-1], (int, *flatten_module._SHAPES[1:])):
        with pytest.raises(TypeError):
            flatten_module._apply_files([], {}, {}, "t", bad)


# -- directories through the C path --------------------------------------------------------

N255 = b"n" * flatten_module.NAME_MAX
M40 = DEEP + b"/" + b"m" * 40  # 4056 bytes: a name of 39 more under it is at PATH_MAX
# Directory entry names: nested short ones (some first met as a file, "f", or through a
# symlink, "s" -> "a"), heads written in other ways ("./a", "a//b", "/a", "a/b/"), names at
# NAME_MAX, and ones ending at PATH_MAX from the root; in hostile layers, one byte past.
DIR_NAMES = (b"a", b"a/b", b"a/b/c", b"a/b/c/d", b"a/c", b"b", b"b/a", b"f", b"a/f", b"f/a",
             b"s", b"s/b", b"s/b/c", b"./a/b", b"a//b/c", b"/a/b", b"a/./b", b"a/b/",
             b"a/" + N255, b"a/" + N255 + b"/c", M40, M40 + b"/" + b"k" * 39,
             DEEP + b"/" + b"x" * 80)  # fmt: skip
PAST_LIMITS = (b"a/" + N255 + b"n", M40 + b"/" + b"k" * 40, DEEP + b"/" + b"x" * 81)
# Whole chains of directory entries, each after its parent: the C path's deep runs.
DIR_CHAINS = (M40 + b"/" + b"k" * 39, b"/".join([b"d"] * 40), b"a/b/c/d", b"s/b/c",
              b"a/" + N255 + b"/c")  # fmt: skip
# Mostly directories; files and symlinks over them (and hardlinks, in hostile layers);
# whiteouts that clear parents.
DIR_TYPES = (*[b"5"] * 10, b"0", b"0", b"2")
DIR_WHITEOUTS = (b".wh.a", b"a/.wh.b", b"a/.wh..wh..opq", b"a/b/.wh.c")


@st.composite
def _dir_layer(draw: st.DrawFn) -> list[Entry]:
    def entry(name: bytes, kind: bytes) -> Entry:
        target = draw(st.sampled_from((b"a", b"a/b", b"b", b"f"))) if kind in (b"1", b"2") else b""
        return Entry(
            name,
            kind,
            draw(st.sampled_from((0o755, 0o40755, 0o1777, 0o700, -1, 1 << 70))),
            draw(st.sampled_from((0, 1000, 1 << 40))),
            draw(st.sampled_from((0, 7))),
            # a new int object per entry, as the tar scanner makes: `times` shares them
            int(str(draw(st.sampled_from((0, 10**18, 1_600_000_000_123_456_789))))),
            0,
            target,
            0,
            0,
            512 * len(out),
            draw(st.sampled_from(({}, {}, {}, {}, {b"user.a": b"1"}))),
            None,
        )

    out: list[Entry] = []
    # Half the layers stay within the limits (an error ends the flatten, and the comparison)
    hostile = draw(st.booleans())
    names = st.sampled_from(DIR_NAMES * 3 + PAST_LIMITS if hostile else DIR_NAMES)
    types = st.sampled_from((*DIR_TYPES * 4, b"1") if hostile else DIR_TYPES)
    for _ in range(draw(st.integers(1, 25))):
        what = draw(st.integers(0, 9))
        if what == 0:
            chain = draw(st.sampled_from(DIR_CHAINS)).split(b"/")
            out += [entry(b"/".join(chain[: i + 1]), b"5") for i in range(len(chain))]
        elif what == 1:
            out.append(entry(draw(st.sampled_from(DIR_WHITEOUTS)), b"0"))
        else:
            out.append(entry(draw(names), draw(types)))
    return out


def _flattened_state(stack: list[list[Entry]]) -> object:
    """_flattened, with how the nodes share their mtime objects, the empty xattrs dict and
    their children dicts, and what the flattener's `parents` ends up holding (each directory
    by the first path that holds it, and its bound)."""
    made: list[flatten_module._Flattener] = []

    class Recording(flatten_module._Flattener):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    layers = [LayerFile(f"/layer{i}.tar", f"l{i}", list(es)) for i, es in enumerate(stack)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flatten_module, "_Flattener", Recording)
        try:
            tree = flatten(layers)
        except LayerError as e:
            return str(e)
    paths: dict[int, bytes] = {}
    firsts: dict[int, int] = {}
    sharing = []
    for i, (path, node) in enumerate(tree.walk()):
        paths.setdefault(id(node), path)
        sharing.append(
            (
                firsts.setdefault(id(node.mtime_ns), i),
                node.xattrs is flatten_module._NO_XATTRS,
                None if node.children is None else firsts.setdefault(id(node.children), i),
            )
        )
    (f,) = made
    parents = {head: (paths.get(id(node)), bound) for head, (node, bound) in f.parents.items()}
    return _tree_dump(tree), sharing, parents


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_dir_layer(), min_size=1, max_size=3))
def test_c_directories_make_the_tree_parents_and_errors_apply_entry_makes(
    stack: list[list[Entry]],
) -> None:
    """Directory entries, new, over directories (in later layers and the same one), over
    files and symlinks, with xattrs, at NAME_MAX and PATH_MAX and one past, in long chains
    and under heads not met yet: with the C path, the same tree (every field, which nodes
    share mtimes, the empty xattrs and children dicts), the same `parents` and the same
    errors as apply_entry alone; and the same tree as the reference that remembers no
    directory (every parent found by _place)."""
    with_c = _flattened_state(stack)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flatten_module, "_apply_files", None)
        assert _flattened_state(stack) == with_c
        mp.setattr(flatten_module._Flattener, "_remember_dir", lambda *_: None)
        reference = _flattened_state(stack)
    if isinstance(with_c, str):
        assert reference == with_c
    else:
        assert isinstance(reference, tuple) and reference[:2] == with_c[:2]


def test_c_fast_path_applies_plain_directories_and_hands_back_the_rest() -> None:
    def entry(name: bytes, **kw: object) -> Entry:
        return dataclasses.replace(Entry(name, b"5", 0o40750, 5, 6, 7, 0, b"", 0, 0, 512), **kw)

    f = flatten_module._Flattener()
    f.apply_entry(entry(b"d"), "t")  # Python: the root remembered by _place, d by _remember_dir
    f.apply_entry(entry(b"d/file", type=b"0"), "t")
    f.apply_entry(entry(b"d/link", type=b"2", linkname=b"x"), "t")
    f.apply_entry(entry(DEEP), "t")
    d = f.tree.get(b"/d")
    assert d is not None and d.children is not None and f.parents[b"d"] == (d, 2)
    first, second = int("1000000000000000001"), int("1000000000000000001")  # `times` shares
    assert first is not second
    rest = [entry(b"d/file"), entry(b"d/x", type=b"0")]
    assert _applied(f, entry(b"d/e", mtime_ns=first), entry(b"d/e/f", uid=1 << 40),
                   entry(b"d/e", mode=0o104700, uid=8, gid=9, mtime_ns=second),
                   entry(b"d/" + N255), entry(DEEP + b"/" + b"x" * 80), *rest) == [
        b"d/file", b"d/x"]  # fmt: skip
    e = d.children[b"e"]
    assert type(e) is Node and e.type is NodeType.DIR and (e.mode, e.uid, e.gid) == (0o4700, 8, 9)
    assert e.mtime_ns is f.times[first] is first  # the first one met, as setdefault keeps
    assert e.xattrs is flatten_module._NO_XATTRS
    assert (e.target, e.rdev, e.content) == (None, (0, 0), None)
    assert e.children is not None and sorted(e.children) == [b"f"]  # kept over the second
    ef = e.children[b"f"]
    assert ef.uid == 1 << 40 and ef.children == {}
    assert len({id(n.children) for n in (d, e, ef)}) == 3  # a dict of its own each
    deep = f.tree.get(b"/" + DEEP)
    assert deep is not None and f.parents[DEEP] == (deep, len(DEEP) + 1)
    assert f.parents[b"d/e"] == (e, 4) and f.parents[b"d/e/f"] == (ef, 6)
    assert f.parents[b"d/" + N255] == (d.children[N255], 2 + 255 + 1)
    assert f.parents[DEEP + b"/" + b"x" * 80][1] == PATH_MAX + 1  # a name under it is past
    # Handed back unchanged: over a file, a symlink; with xattrs; an unknown head; names not
    # plain or past a limit; a mode past 64 bits; a type flag not one byte
    handed_back = [entry(b"d/file"), entry(b"d/link"), entry(b"d/y", xattrs={b"user.a": b""}),
                   entry(b"unknown/y"), entry(b"d/"), entry(b"d/."), entry(b"d/.."),
                   entry(b"d/.wh.y"), entry(b"d/" + N255 + b"n"),
                   entry(DEEP + b"/" + b"x" * 81), entry(b"d/y", mode=1 << 70)]  # fmt: skip
    before = _tree_dump(f.tree), dict(f.parents), dict(f.times)
    for h in handed_back:
        assert _applied(f, h) == [h.name]
    assert _applied(f, dataclasses.replace(entry(b"d/y"), type=b"5 ")) == [b"d/y"]
    assert (_tree_dump(f.tree), f.parents, f.times) == before
    # What Python makes of them all, applied one by one: the same tree and parents
    g = flatten_module._Flattener()
    for h in (entry(b"d"), entry(b"d/file", type=b"0"), entry(b"d/link", type=b"2", linkname=b"x"),
              entry(DEEP), entry(b"d/e", mtime_ns=first), entry(b"d/e/f", uid=1 << 40),
              entry(b"d/e", mode=0o104700, uid=8, gid=9, mtime_ns=second),
              entry(b"d/" + N255), entry(DEEP + b"/" + b"x" * 80)):  # fmt: skip
        g.apply_entry(h, "t")
    assert _tree_dump(g.tree) == _tree_dump(f.tree)
    assert {k: v[1] for k, v in g.parents.items()} == {k: v[1] for k, v in f.parents.items()}
    shapes = flatten_module._SHAPES
    dir_at = shapes.index(NodeType.DIR)
    for bad in ((*shapes[:dir_at], NodeType.FILE, *shapes[dir_at + 1 :]), shapes[:dir_at]):
        with pytest.raises(TypeError):
            flatten_module._apply_files([], {}, {}, "t", bad)


def test_directories_in_known_directories_take_the_c_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only what C hands back reaches apply_entry: the first entry (the root not yet
    remembered), a directory with xattrs, one under a head written otherwise ("./a") and
    one under that directory written plainly, and a directory over a file."""
    seen: list[bytes] = []
    apply_entry = flatten_module._Flattener.apply_entry

    def counting(self: flatten_module._Flattener, e: Entry, tar_path: str) -> None:
        seen.append(e.name)
        apply_entry(self, e, tar_path)

    monkeypatch.setattr(flatten_module._Flattener, "apply_entry", counting)
    chain = [L.dir("/".join(["d"] * (i + 1))) for i in range(30)]
    tree = _flatten_one(
        tmp_path,
        L.layer(
            L.dir("a"),
            *chain,
            L.dir("a/b"),
            L.dir("a/b/c"),
            L.dir("a/b", mode=0o700),
            L.dir("a/x", pax={"SCHILY.xattr.user.a": "1"}),
            L.dir("./a/y"),
            L.dir("a/y/z"),
            L.file("a/f"),
            L.dir("a/f"),
            L.dir("a/f/g"),
        ),
    )
    assert seen == [b"a", b"a/x", b"./a/y", b"a/y/z", b"a/f"]
    b = tree.get(b"/a/b")
    assert b is not None and b.mode == 0o700 and names(tree, b"/a/b") == [b"c"]
    assert names(tree, b"/a") == [b"b", b"f", b"x", b"y"]
    assert tree.get(b"/" + "/".join(["d"] * 30).encode()) is not None
