"""Fuzzing: iter_entries and flatten on arbitrary and mutated tars raise only LayerError;
trees written by the cpio and tar writers read back equal (cpio -i, and our own reader)."""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from tests import layerkit as L
from tests.conftest import need
from tests.treecheck import Checks, compare_tree_with_dir
from vmimg.errors import LayerError
from vmimg.image.layers import LayerFile, iter_entries
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.flatten import flatten
from vmimg.rootfs.tree import Content, Node, NodeType, Tree
from vmimg.rootfs.writers.cpio import CpioOptions, write_cpio
from vmimg.rootfs.writers.tar import TarOptions, write_tar

EXAMPLES = int(os.environ.get("VMIMG_FUZZ_EXAMPLES", "300"))
ROUND_TRIPS = max(10, EXAMPLES // 20)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPARSE_PAX = {
    "GNU.sparse.major": "0",
    "GNU.sparse.minor": "1",
    "GNU.sparse.map": "0,2,100,2",
    "GNU.sparse.name": "sparse",
    "GNU.sparse.size": "200",
}
# Seeds: every kind of member and header the reader knows, to mutate from.
SEEDS = [
    L.layer(
        L.dir("etc"),
        L.file("etc/passwd", b"root:x:0:0\n", pax={"SCHILY.xattr.user.k": "v"}),
        L.symlink("lib", "usr/lib"),
        L.hardlink("etc/hard", "etc/passwd"),
        L.chardev("dev/null", 1, 3),
        L.fifo("run/p"),
        L.file("a/" + "n" * 200 + "/long", b"x", mtime=1.5, pax={"mtime": "1.5"}),
        L.file("sparse", b"abcd", pax=SPARSE_PAX),
        L.whiteout("gone"),
    ),
    L.layer(L.file("gnu/" + "g" * 150, b"gnu long name"), fmt=tarfile.GNU_FORMAT),
    L.layer(L.file("v7", b"old"), fmt=tarfile.USTAR_FORMAT),
]


def _read_all(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(data)
        f.flush()
        for _ in iter_entries(f.name, "layer fuzz"):
            pass
        flatten([LayerFile(f.name, "fuzz")])


def _only_layer_errors(data: bytes) -> None:
    try:
        _read_all(data)
    except LayerError as e:
        assert "\n" not in str(e)


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    _only_layer_errors(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(("flip", "set", "cut", "insert", "digits")))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if not data:
            break
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=600))
        else:  # numbers are where parsers break: overwrite with digits
            data[pos : pos + 12] = draw(st.from_regex(rb"\A[0-7 \x00-]{1,12}\Z"))
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_tars(data: bytes) -> None:
    _only_layer_errors(data)


# -- writers ---------------------------------------------------------------------------

# Not ".wh.*": read back as a layer, those would be whiteouts.
NAME = st.binary(min_size=1, max_size=20).filter(
    lambda b: (
        b"/" not in b and b"\0" not in b and b not in (b".", b"..") and not b.startswith(b".wh.")
    )
)


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    tree = Tree()
    dirs = [b""]
    files: list[Node] = []
    for _ in range(draw(st.integers(1, 12))):
        parent = draw(st.sampled_from(dirs))
        path = parent + b"/" + draw(NAME)
        existing = tree.get(path)
        if existing is not None:
            continue
        kind = draw(st.sampled_from(("file", "dir", "symlink", "hardlink")))
        mode = draw(st.sampled_from((0o644, 0o755, 0o600, 0o4755)))
        mtime = draw(st.integers(0, 2**32 - 1)) * 1_000_000_000
        uid = draw(st.integers(0, 65535))
        if kind == "hardlink" and files:
            tree.add(path, draw(st.sampled_from(files)))
        elif kind == "dir":
            tree.add(path, Node(NodeType.DIR, mode=mode | 0o700, uid=uid, mtime_ns=mtime))
            dirs.append(path)
        elif kind == "symlink":
            target = draw(NAME)
            tree.add(path, Node(NodeType.SYMLINK, mode=0o777, uid=uid, target=target))
        else:
            data = draw(st.binary(max_size=3000))
            node = Node(NodeType.FILE, mode=mode, uid=uid, gid=uid, mtime_ns=mtime)
            node.content = Content.from_bytes(data)
            tree.add(path, node)
            files.append(node)
    return tree


@settings(max_examples=ROUND_TRIPS, deadline=None)
@given(trees())
def test_cpio_round_trips_through_cpio_i(tree: Tree) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "root.cpio"
        with open(archive, "wb") as f, ContentReader() as r:
            write_cpio(tree, r, f.fileno(), CpioOptions(compression="none"))
        dest = Path(tmp) / "x"
        dest.mkdir()
        with open(archive, "rb") as f:
            subprocess.run(
                [need("cpio"), "-idmu", "--quiet", "--no-absolute-filenames"],
                stdin=f,
                cwd=dest,
                check=True,
                capture_output=True,
            )
        with ContentReader() as r:
            assert compare_tree_with_dir(tree, r, str(dest), Checks(xattrs=False)) == []


@settings(max_examples=ROUND_TRIPS, deadline=None)
@given(trees())
def test_tar_writer_output_reads_back_as_the_same_tree(tree: Tree) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "root.tar"
        with open(archive, "wb") as f, ContentReader() as r:
            write_tar(tree, r, f.fileno(), TarOptions())
        again = flatten([LayerFile(str(archive), "written")])
        dest = Path(tmp) / "x"
        dest.mkdir()
        subprocess.run(
            [need("tar"), "--numeric-owner", "-xpf", str(archive), "-C", str(dest)],
            check=True,
            capture_output=True,
        )
        with ContentReader() as r:
            assert compare_tree_with_dir(again, r, str(dest), Checks(mtime=True)) == []
            assert compare_tree_with_dir(tree, r, str(dest), Checks(mtime=True)) == []
