"""Property tests: random layer stacks against a naive model of the OCI layer rules, and
the images written from them read back by the formats' own tools.

The model is a dict path -> inode that applies each rule literally (whiteouts
first, then entries; a directory over a directory keeps its children;
anything else replaces the whole subtree; missing parents become 0755
directories). Symlinks are generated only at leaf names (never a parent), so
the model need not resolve them.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, assume, given, settings

from tests import layerkit as L
from tests.conftest import need
from tests.treecheck import Checks, compare_tree_with_dir
from vmimg.errors import LayerError
from vmimg.image.layers import LayerFile
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.flatten import IMPLICIT_DIR_MODE, flatten
from vmimg.rootfs.tree import NodeType, Tree
from vmimg.rootfs.writers.erofs import ErofsOptions, write_erofs
from vmimg.rootfs.writers.ext4 import Ext4Options, write_ext4
from vmimg.rootfs.writers.tar import TarOptions, write_tar

NS = 1_000_000_000
NAMES = ("x", "y")  # names that may be files, directories, or parents
PLAIN = [a for a in NAMES] + [f"{a}/{b}" for a in NAMES for b in NAMES]
DIRS = ["", *NAMES]  # where leaf-only names (symlinks, hardlinks) go
SYMLINKS = [f"{d}/s".lstrip("/") for d in DIRS]
HARDLINKS = [f"{d}/h".lstrip("/") for d in DIRS]
MODES = (0o644, 0o600, 0o755, 0o750)
MTIMES = (1_500_000_000, 1_600_000_000, 1_700_000_000)
MODEL_EXAMPLES = 150
WRITER_EXAMPLES = 15

# -- operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # file, dir, symlink, hardlink, whiteout, opaque
    path: str
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    mtime: int = MTIMES[0]


def _op(kind: str, paths: list[str]) -> st.SearchStrategy[Op]:
    return st.builds(
        Op,
        kind=st.just(kind),
        path=st.sampled_from(paths),
        data=st.binary(max_size=600),
        target=st.sampled_from([*PLAIN, *SYMLINKS, "/x", "../../y", "missing"]),
        mode=st.sampled_from(MODES),
        uid=st.sampled_from((0, 1000)),
        mtime=st.sampled_from(MTIMES),
    )


OPS = st.one_of(
    _op("file", PLAIN),
    _op("file", PLAIN),
    _op("dir", PLAIN),
    _op("dir", PLAIN),
    _op("symlink", SYMLINKS),
    _op("hardlink", HARDLINKS),
    _op("whiteout", PLAIN + SYMLINKS + HARDLINKS),
    _op("opaque", DIRS + PLAIN),
)
STACKS = st.lists(st.lists(OPS, min_size=1, max_size=10), min_size=1, max_size=3)


def to_entry(op: Op) -> L.E:
    kw = {"mtime": op.mtime, "uid": op.uid, "gid": op.uid}
    if op.kind == "file":
        return L.file(op.path, op.data, mode=op.mode, **kw)
    if op.kind == "dir":
        return L.dir(op.path, mode=op.mode, **kw)
    if op.kind == "symlink":
        return L.symlink(op.path, op.target, **kw)
    if op.kind == "hardlink":
        return L.hardlink(op.path, op.target, **kw)
    if op.kind == "whiteout":
        return L.whiteout(op.path)
    return L.opaque(op.path) if op.path else L.file(".wh..wh..opq")


# -- the model -------------------------------------------------------------------------


@dataclass(eq=False)
class Inode:
    type: NodeType
    mode: int
    uid: int
    mtime: int
    data: bytes = b""
    target: bytes = b""


@dataclass
class Model:
    entries: dict[str, Inode] = field(default_factory=dict)  # "" is the root

    def __post_init__(self) -> None:
        self.entries[""] = Inode(NodeType.DIR, IMPLICIT_DIR_MODE, 0, 0)

    def remove_tree(self, path: str) -> None:
        for p in [p for p in self.entries if p == path or p.startswith(path + "/")]:
            if p:
                del self.entries[p]

    def clear_below(self, path: str) -> None:
        prefix = path + "/" if path else ""
        for p in [p for p in self.entries if p and p.startswith(prefix) and p != path]:
            del self.entries[p]

    def is_dir(self, path: str) -> bool:
        node = self.entries.get(path)
        return node is not None and node.type is NodeType.DIR

    def whiteout(self, op: Op) -> None:
        parent = op.path.rpartition("/")[0] if op.kind == "whiteout" else op.path
        if not self.is_dir(parent):
            return  # nothing there to hide
        if op.kind == "opaque":
            self.clear_below(parent)
        else:
            self.remove_tree(op.path)

    def make_parents(self, path: str, mtime: int) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if not self.is_dir(parent):
                self.remove_tree(parent)
                self.entries[parent] = Inode(NodeType.DIR, IMPLICIT_DIR_MODE, 0, mtime * NS)

    def add(self, op: Op) -> None:
        self.make_parents(op.path, op.mtime)
        if op.kind == "hardlink":
            target = self.entries.get(op.target.strip("/"))
            if target is None or op.target.startswith("..") or "../" in op.target:
                raise LayerError("hardlink to missing")
            if target.type is NodeType.DIR:
                raise LayerError("hardlink to directory")
            self.remove_tree(op.path)
            self.entries[op.path] = target
            return
        existing = self.entries.get(op.path)
        kind = {"file": NodeType.FILE, "dir": NodeType.DIR, "symlink": NodeType.SYMLINK}[op.kind]
        mode = 0o777 if kind is NodeType.SYMLINK else op.mode
        if kind is NodeType.DIR and existing is not None and existing.type is NodeType.DIR:
            existing.mode, existing.uid, existing.mtime = mode, op.uid, op.mtime * NS
            return
        self.remove_tree(op.path)
        self.entries[op.path] = Inode(
            kind, mode, op.uid, op.mtime * NS, op.data, op.target.encode()
        )


def model_of(stack: list[list[Op]]) -> Model:
    m = Model()
    for layer in stack:
        for op in layer:
            if op.kind in ("whiteout", "opaque"):
                m.whiteout(op)
        for op in layer:
            if op.kind not in ("whiteout", "opaque"):
                m.add(op)
    return m


def flatten_stack(stack: list[list[Op]], tmp: Path) -> Tree:
    layers = []
    for i, ops in enumerate(stack):
        path = tmp / f"layer{i}.tar"
        path.write_bytes(L.layer(*[to_entry(op) for op in ops]))
        layers.append(LayerFile(str(path), f"layer{i}"))
    return flatten(layers)


def differences(tree: Tree, model: Model) -> list[str]:
    problems = []
    seen: dict[str, tuple[int, Inode]] = {}
    with ContentReader() as reader:
        for path, node in tree.walk():
            key = path.decode().strip("/")
            want = model.entries.get(key)
            if want is None:
                problems.append(f"{key}: unexpected")
                continue
            seen[key] = (id(node), want)
            got = (node.type, node.mode, node.uid, node.mtime_ns)
            if got != (want.type, want.mode, want.uid, want.mtime):
                problems.append(f"{key}: {got} != {(want.type, want.mode, want.uid, want.mtime)}")
            if node.type is NodeType.FILE:
                assert node.content is not None
                if reader.read_all(node.content) != want.data:
                    problems.append(f"{key}: content")
            if node.type is NodeType.SYMLINK and node.target != want.target:
                problems.append(f"{key}: target {node.target!r} != {want.target!r}")
    problems += [f"{p}: missing" for p in model.entries if p not in seen]
    # Hardlinks: two paths share a node exactly when they share a model inode.
    for a, (node_a, inode_a) in seen.items():
        for b, (node_b, inode_b) in seen.items():
            if a < b and (node_a == node_b) != (inode_a is inode_b):
                problems.append(f"{a} and {b}: hardlink relation differs")
    return problems


@settings(max_examples=MODEL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STACKS)
def test_flatten_matches_the_naive_model(stack: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            expected: Model | None = model_of(stack)
        except LayerError:
            expected = None
        if expected is None:
            try:
                flatten_stack(stack, Path(tmp))
            except LayerError:
                return
            raise AssertionError("the model refused the stack, the flattener did not")
        tree = flatten_stack(stack, Path(tmp))
        assert differences(tree, expected) == []


# -- writers ------------------------------------------------------------------------------


def _write(tree: Tree, out: Path, fmt: str) -> None:
    with open(out, "w+b") as f, ContentReader() as r:
        if fmt == "tar":
            write_tar(tree, r, f.fileno(), TarOptions())
        elif fmt == "ext4":
            write_ext4(tree, r, f.fileno(), Ext4Options(headroom=1 << 20, seed=b"prop"))
        else:
            write_erofs(tree, r, f.fileno(), ErofsOptions(seed=b"prop"))


def _round_trip(tree: Tree, tmp: Path, fmt: str) -> list[str]:
    img = tmp / f"image.{fmt}"
    _write(tree, img, fmt)
    dest = tmp / f"x-{fmt}"
    dest.mkdir()
    if fmt == "tar":
        cmd = [need("tar"), "--numeric-owner", "-xpf", str(img), "-C", str(dest)]
        checks = Checks(mtime=True)
    elif fmt == "ext4":
        fsck = subprocess.run([need("e2fsck"), "-fn", str(img)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
        cmd = [need("debugfs"), "-R", f"rdump / {dest}", str(img)]
        # rdump neither links hardlinks nor chowns symlinks (the inodes are right:
        # tests/writers/test_ext4.py reads them with debugfs stat)
        checks = Checks(owner=False, xattrs=False, hardlinks=False)
    else:
        fsck = subprocess.run([need("fsck.erofs"), str(img)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stderr
        cmd = [need("fsck.erofs"), f"--extract={dest}", str(img)]
        checks = Checks(xattrs=False, hardlinks=False, mtime=True)
    subprocess.run(cmd, check=True, capture_output=True)
    if fmt == "ext4" and (dest / "lost+found").is_dir():
        os.rmdir(dest / "lost+found")
    with ContentReader() as reader:
        return compare_tree_with_dir(tree, reader, str(dest), checks)


# Most random stacks are refused (hardlinks to what is missing or a directory, names that
# climb out: about 65% of them) or flatten to almost nothing, and are filtered out here: the
# model test covers those. Hypothesis's filter_too_much check then trips now and then (9 kept
# against 50 filtered, once in a CI run), so it is off for this test.
@settings(
    max_examples=WRITER_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(STACKS)
def test_images_from_random_stacks_check_and_read_back(stack: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tree = flatten_stack(stack, Path(tmp))
        except LayerError:
            assume(False)  # the model test covers refused stacks
        assume(sum(1 for _ in tree.walk()) > 2)
        for fmt in ("tar", "ext4", "erofs"):
            assert _round_trip(tree, Path(tmp), fmt) == [], fmt
