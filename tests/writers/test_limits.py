"""Hostile metadata in every writer: deep paths, symlink modes, times past what a format
holds, files past what a format sizes. Each output is read back with its own tool
(python tarfile and GNU tar, cpio, debugfs, dump.erofs)."""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from tests import layerkit as L
from tests.writers.test_erofs import dump, mtime_text, raw_mode, superblock
from tests.writers.test_ext4 import fsck, stat_paths
from vmimg.errors import WriterError
from vmimg.image.cache import Cache
from vmimg.image.layers import Extent, LayerFile
from vmimg.image.oci import Platform
from vmimg.image.sources import SourceOptions, open_image
from vmimg.rootfs import writers
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.convert import conversion_key
from vmimg.rootfs.flatten import flatten
from vmimg.rootfs.tree import MAX_TIME_NS, NS_PER_S, Content, Node, NodeType, Tree
from vmimg.rootfs.writers import write_image
from vmimg.rootfs.writers.cpio import CpioOptions
from vmimg.rootfs.writers.erofs import ErofsOptions
from vmimg.rootfs.writers.ext4 import Ext4Options
from vmimg.rootfs.writers.ext4.writer import MAX_TIME_NS as EXT4_MAX_NS
from vmimg.rootfs.writers.ext4.writer import MIN_TIME_NS as EXT4_MIN_NS
from vmimg.rootfs.writers.tar import TarOptions

MiB = 1 << 20
GiB = 1 << 30
OPTIONS = {
    "tar": TarOptions(),
    "initramfs": CpioOptions(compression="none"),
    "ext4": Ext4Options(seed=b"limits", headroom=MiB),
    "erofs": ErofsOptions(seed=b"limits"),
}


def write(fmt: str, tree: Tree, out: Path) -> list[str]:
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ContentReader() as reader:
            return write_image(fmt, tree, reader, fd, OPTIONS[fmt])
    finally:
        os.close(fd)


def flatten_one(tmp_path: Path, *entries: L.E) -> Tree:
    path = tmp_path / "layer.tar"
    path.write_bytes(L.layer(*entries))
    return flatten([LayerFile(str(path), "sha256:test")])


def newc_entries(archive: bytes) -> dict[bytes, dict[str, int]]:
    """Every entry of an uncompressed newc archive: name -> header fields."""
    fields = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize")
    out = {}
    pos = 0
    while True:
        head = archive[pos : pos + 110]
        assert head[:6] == b"070701"
        values = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize = values[11]
        name = archive[pos + 110 : pos + 110 + namesize - 1]
        if name == b"TRAILER!!!":
            return out
        out[name] = dict(zip(fields, values[:7], strict=True))
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + values[6] + 3) & ~3


# --- paths ------------------------------------------------------------------------------


def deep_tree(depth: int, files: int) -> Tree:
    """`files` files at the bottom of a chain of `depth` one-letter directories."""
    tree = Tree()
    bottom = tree.root
    for _ in range(depth):
        assert bottom.children is not None
        bottom = bottom.children.setdefault(b"d", Node(NodeType.DIR))
    assert bottom.children is not None
    for i in range(files):
        bottom.children[b"f%05d" % i] = Node(NodeType.FILE)
    return tree


def test_walk_holds_one_path_per_level_not_one_per_entry() -> None:
    # 5,000 files 4 KiB deep: a walk that queued their paths would hold 20 MB.
    tree = deep_tree(2000, 5000)
    tracemalloc.start()
    try:
        count = sum(1 for _ in tree.walk())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 1 + 2000 + 5000
    assert peak < 12 * MiB, peak


@pytest.mark.parametrize("fmt", [pytest.param("ext4", marks=pytest.mark.slow), "erofs"])
def test_writers_hold_names_not_paths(fmt: str, tmp_path: Path) -> None:
    # 5,000 inodes whose paths are 4 KiB: a writer keeping each inode's path holds 20 MB
    # more than one keeping names (what both did for error messages).
    tree = deep_tree(2000, 5000)
    tracemalloc.start()
    try:
        write(fmt, tree, tmp_path / f"deep.{fmt}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, peak


def test_deep_entry_refused_before_any_directory_is_made(tmp_path: Path) -> None:
    from vmimg.errors import LayerError

    layer = tmp_path / "layer.tar"
    layer.write_bytes(L.layer(L.file("d/" * 40_000 + "f", b"x")))
    tracemalloc.start()
    try:
        with pytest.raises(LayerError) as err:
            flatten([LayerFile(str(layer), "sha256:deep")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value).endswith("(80001 bytes): path longer than 4096 bytes")
    assert len(str(err.value)) < 400
    assert peak < 32 * MiB, peak


def test_flatten_time_follows_entries_not_their_depth(tmp_path: Path) -> None:
    """2,000 files under one parent 2,000 levels deep (4 KiB paths) flatten in a small
    multiple of the time 2,000 files under a shallow parent take: the deep parent is
    resolved once, not once per entry (which cost depth x entries: 2 minutes for a
    680 KB gzip layer of 20,000 such files)."""
    import time

    def seconds(prefix: str) -> float:
        layer = tmp_path / f"{len(prefix)}.tar"
        layer.write_bytes(L.layer(*(L.file(f"{prefix}f{i:05d}", b"x") for i in range(2000))))
        start = time.process_time()
        tree = flatten([LayerFile(str(layer), "sha256:wide")])
        spent = time.process_time() - start
        assert sum(1 for _ in tree.walk()) == 1 + prefix.count("/") + 2000
        return spent

    shallow, deep = seconds("d/"), seconds("d/" * 2000)
    assert deep < 20 * shallow, (shallow, deep)  # was 58 times


# --- symlinks -------------------------------------------------------------------------------


def test_symlinks_are_0777_in_every_output(tmp_path: Path) -> None:
    import tarfile as tf

    tree = flatten_one(
        tmp_path,
        L.file("target", b"t"),
        L.E("link", tf.SYMTYPE, mode=0o640, linkname="target"),
        L.E("setuid-link", tf.SYMTYPE, mode=0o4755, linkname="target"),
    )
    for name in ("link", "setuid-link"):
        out = {fmt: tmp_path / f"root.{fmt}" for fmt in OPTIONS}
        for fmt, path in out.items():
            write(fmt, tree, path)
        with tarfile.open(out["tar"]) as t:
            assert t.getmember(name).mode == 0o777
        assert newc_entries(out["initramfs"].read_bytes())[name.encode()]["mode"] == 0o120777
        assert stat_paths(out["ext4"], [b"/" + name.encode()])[b"/" + name.encode()].mode == 0o777
        assert raw_mode(out["erofs"], "/" + name) == 0o120777


# --- times --------------------------------------------------------------------------------

TAR_TIMES = {
    b"minus-1.5": -1_500_000_000,
    b"minus-0.5": -500_000_000,
    b"minus-3": -3 * NS_PER_S,
    b"minus-1ns": -1,
    b"plus-1.25": 1_250_000_000,
    b"year-3000": 32_503_680_000 * NS_PER_S + 7,
    b"far": MAX_TIME_NS,
}


def times_tree(times: dict[bytes, int]) -> Tree:
    tree = Tree()
    for name, ns in times.items():
        tree.add(b"/" + name, Node(NodeType.FILE, mtime_ns=ns))
    return tree


def _pax_seconds(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    whole, frac = divmod(abs(ns), NS_PER_S)
    return f"{sign}{whole}.{frac:09d}".rstrip("0").rstrip(".")


def test_tar_writes_exact_signed_times(tmp_path: Path) -> None:
    out = tmp_path / "t.tar"
    write("tar", times_tree(TAR_TIMES), out)
    with tarfile.open(out) as t:
        for name, ns in TAR_TIMES.items():
            member = t.getmember(name.decode())
            assert member.pax_headers.get("mtime", str(member.mtime)) == _pax_seconds(ns)
    # read back by vmimg's own layer reader too: every nanosecond and the sign survive
    again = flatten([LayerFile(str(out), "sha256:again")])
    for name, ns in TAR_TIMES.items():
        node = again.get(b"/" + name)
        assert node is not None and node.mtime_ns == ns, name
    # GNU tar extracts the same instants (the host file system holds these five)
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(dest)], capture_output=True)
    for name in (b"minus-1.5", b"minus-0.5", b"minus-3", b"minus-1ns", b"plus-1.25"):
        assert os.stat(os.fsencode(dest) + b"/" + name).st_mtime_ns == TAR_TIMES[name], name


EXT4_TIMES = {
    b"1800": -5_364_662_400 * NS_PER_S,  # before 1901-12-13: wrapped into the 2300s before
    b"1901-edge": EXT4_MIN_NS,
    b"1969": -NS_PER_S + 5,
    b"2300": 10_413_792_000 * NS_PER_S + 9,
    b"2446-edge": EXT4_MAX_NS,
    b"2500": 16_725_225_600 * NS_PER_S,
    b"far": MAX_TIME_NS,
}


def test_ext4_clamps_times_to_its_range_with_warnings(tmp_path: Path) -> None:
    out = tmp_path / "t.ext4"
    warnings = write("ext4", times_tree(EXT4_TIMES), out)
    fsck(out)
    stats = stat_paths(out, [b"/" + name for name in EXT4_TIMES])
    for name, ns in EXT4_TIMES.items():
        want = min(max(ns, EXT4_MIN_NS), EXT4_MAX_NS)
        assert stats[b"/" + name].mtime_ns == want, name
    assert sorted(w.split(":")[0] for w in warnings) == ["/1800", "/2500", "/far"]
    assert all(w.endswith("mtime outside what ext4 stores (1901..2446); clamped") for w in warnings)


def test_ext4_counts_clamped_times_past_the_first_twenty(tmp_path: Path) -> None:
    warnings = write("ext4", times_tree({b"f%03d" % i: -(1 << 40) * NS_PER_S for i in range(50)}),
                     tmp_path / "t.ext4")  # fmt: skip
    assert len(warnings) == 21
    assert warnings[-1] == "30 more paths: mtime outside what ext4 stores (1901..2446); clamped"


def _erofs_raw_mtime(image: Path, name: str) -> tuple[int, int]:
    """i_mtime and i_mtime_nsec of the extended inode of /name (offsets 32 and 40 in
    erofs.rst). Its nid comes from the root's listing: dump.erofs --path crashes
    formatting a time this far out."""
    m = re.search(r"inode metadata start block:\s+(\d+)", superblock(image))
    assert m
    ls = subprocess.run(
        ["dump.erofs", "--ls", "--path=/", str(image)], capture_output=True, text=True, check=True
    ).stdout
    nid = re.search(rf"^\s*(\d+)\s+1\s+{name}$", ls, re.M)
    assert nid, ls
    with open(image, "rb") as f:
        f.seek(int(m.group(1)) * 4096 + int(nid.group(1)) * 32 + 32)
        raw = f.read(12)
    return int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little")


def test_far_times_from_a_layer_reach_every_format(tmp_path: Path) -> None:
    """A layer time past 2262 (past 64-bit nanoseconds) no longer fails the image:
    tar and erofs store it, ext4 and initramfs clamp it with a warning."""
    tree = flatten_one(
        tmp_path,
        L.file("future", b"f", pax={"mtime": "99999999999.5"}),
        L.file("past", b"p", pax={"mtime": "-99999999999.25"}),
        L.file("absurd", b"a", pax={"mtime": "9" * 5000}),
    )
    out = {fmt: tmp_path / f"root.{fmt}" for fmt in OPTIONS}
    warned = {fmt: write(fmt, tree, path) for fmt, path in out.items()}
    with tarfile.open(out["tar"]) as t:
        assert t.getmember("future").pax_headers["mtime"] == "99999999999.5"
        assert t.getmember("past").pax_headers["mtime"] == "-99999999999.25"
        assert t.getmember("absurd").pax_headers["mtime"] == _pax_seconds(MAX_TIME_NS)
    assert _erofs_raw_mtime(out["erofs"], "future") == (99_999_999_999, 500_000_000)
    shown = dump(out["erofs"], "/future").timestamp  # dump.erofs says the year 5138 too
    assert shown == mtime_text(99_999_999_999_500_000_000)
    assert _erofs_raw_mtime(out["erofs"], "past") == (-100_000_000_000, 750_000_000)
    assert _erofs_raw_mtime(out["erofs"], "absurd") == ((1 << 63) - 1, 999_999_999)
    subprocess.run(["fsck.erofs", str(out["erofs"])], check=True, capture_output=True)
    stats = stat_paths(out["ext4"], [b"/future", b"/past"])
    assert stats[b"/future"].mtime_ns == EXT4_MAX_NS
    assert stats[b"/past"].mtime_ns == EXT4_MIN_NS
    assert len(warned["ext4"]) == 3
    entries = newc_entries(out["initramfs"].read_bytes())
    assert entries[b"future"]["mtime"] == 0xFFFFFFFF
    assert entries[b"past"]["mtime"] == 0
    assert sorted(w.split(":")[0] for w in warned["initramfs"]) == ["/absurd", "/future", "/past"]
    assert warned["tar"] == [] and warned["erofs"] == []


# --- initramfs sizes ----------------------------------------------------------------------------


def test_initramfs_refuses_a_file_of_4_gib_naming_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"tail")
    tree = Tree()
    tree.add(b"/big", Node(NodeType.FILE, content=Content(
        size=4 * GiB, path=str(data), extents=(Extent(4 * GiB - 4, 4),))))  # fmt: skip
    with pytest.raises(WriterError) as err:
        write("initramfs", tree, tmp_path / "out.cpio")
    assert str(err.value) == (
        "/big: 4294967296 bytes; an initramfs (newc cpio) stores files of at most 4294967295 bytes"
    )


@pytest.mark.slow
def test_initramfs_streams_a_large_sparse_file(tmp_path: Path) -> None:
    """A 300 MiB sparse file (over what the writer used to read whole) is written in
    bounded chunks: the archive holds its size and its data at the right place."""
    data = tmp_path / "data"
    data.write_bytes(b"head" + b"tail")
    size = 300 * MiB
    tree = Tree()
    tree.add(b"/sparse", Node(NodeType.FILE, content=Content(
        size=size, path=str(data), extents=(Extent(0, 4), Extent(size - 4, 4)))))  # fmt: skip
    out = tmp_path / "out.cpio"
    tracemalloc.start()
    try:
        write("initramfs", tree, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB, peak
    listing = subprocess.run(["cpio", "-itv", "-F", str(out)], capture_output=True, text=True)
    assert re.search(rf"\s{size}\s.*sparse$", listing.stdout, re.M), listing.stdout
    with open(out, "rb") as f:
        archive = f.read()
    start = archive.index(b"head")
    assert archive[start + size - 4 : start + size] == b"tail"
    assert archive[start + 4 : start + size - 4].count(0) == size - 8


# --- ext4 directory memory ------------------------------------------------------------------

_SUBDIRS_SCRIPT = """
import os, sys
from vmimg.rootfs import writers
from vmimg.image.cache import Cache
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.convert import conversion_key
from vmimg.rootfs.tree import Node, NodeType, Tree
from vmimg.rootfs.writers.ext4 import Ext4Options, write_ext4
tree = Tree()
parent = Node(NodeType.DIR)
tree.add(b"/d", parent)
for i in range(int(sys.argv[1])):
    parent.children[b"sub%06d" % i] = Node(NodeType.DIR)
fd = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
with ContentReader() as reader:
    write_ext4(tree, reader, fd, Ext4Options(seed=b"subdirs"))
# VmHWM is this program's own peak: ru_maxrss would count the forking parent's memory
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
def test_ext4_many_subdirectories_in_bounded_memory(tmp_path: Path) -> None:
    """Directory blocks are written as they are built: 65,000 subdirectories (one block
    each, 254 MiB if all were held) peak under 120 MiB, tree and interpreter included."""
    import sys

    out = tmp_path / "dirs.ext4"
    run = subprocess.run(
        [sys.executable, "-c", _SUBDIRS_SCRIPT, "65000", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_kib = int(run.stdout.split()[-1])
    assert peak_kib < 120 * 1024, f"peak RSS {peak_kib} KiB"
    fsck(out)


# --- the conversion cache ------------------------------------------------------------------


def test_writer_version_is_part_of_the_conversion_key(
    sample_ref: str, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached images made by an older writer are not reused once its bytes change."""
    image = open_image(sample_ref, cache, SourceOptions(Platform()))
    try:
        keys = {fmt: conversion_key(image, fmt, OPTIONS[fmt], None) for fmt in OPTIONS}
        monkeypatch.setitem(writers.WRITER_VERSIONS, "erofs", writers.WRITER_VERSIONS["erofs"] + 1)
        again = {fmt: conversion_key(image, fmt, OPTIONS[fmt], None) for fmt in OPTIONS}
    finally:
        image.close()
    assert [fmt for fmt in OPTIONS if keys[fmt] != again[fmt]] == ["erofs"]
