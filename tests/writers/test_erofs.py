"""The native erofs writer, checked with erofs-utils 1.5 (fsck.erofs, dump.erofs).

Every image must pass `fsck.erofs`; its `--extract` output must match the
tree (as root it keeps owner, mode and mtime). What 1.5 cannot extract
(hardlinks, xattrs) is checked through `dump.erofs`: equal nids and link
counts, xattr ibody sizes, timestamps.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.treecheck import Checks, compare_tree_with_dir
from vmimg.errors import WriterError
from vmimg.image.layers import Extent
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Content, Node, NodeType, Tree
from vmimg.rootfs.writers.erofs import ErofsOptions, write_erofs
from vmimg.rootfs.writers.erofs import writer as erofs_writer

AS_ROOT = os.geteuid() == 0
# fsck.erofs 1.5 --extract neither links hardlinks nor writes xattrs
EXTRACT_CHECKS = Checks(owner=AS_ROOT, mode=True, mtime=AS_ROOT, xattrs=False, hardlinks=False)
T0 = 1_700_000_000 * 10**9
GiB = 1 << 30
# ContentReader cannot read the default Content(size=0) (no data, no path)
EMPTY = Content.from_bytes(b"")


# --- helpers -------------------------------------------------------------------


def write_image(tree: Tree, path: Path, **options: object) -> Path:
    with ContentReader() as reader:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_erofs(tree, reader, fd, ErofsOptions(**options))  # type: ignore[arg-type]
        finally:
            os.close(fd)
    return path


def fsck(image: Path, *args: str) -> None:
    proc = subprocess.run(["fsck.erofs", *args, str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def extract_and_compare(tree: Tree, image: Path, tmp_path: Path) -> None:
    out = tmp_path / "extracted"
    fsck(image, f"--extract={out}")
    with ContentReader() as reader:
        problems = compare_tree_with_dir(tree, reader, str(out), EXTRACT_CHECKS)
    # fsck.erofs 1.5 chowns after chmod, which drops setuid/setgid: those bits
    # are checked in the image itself (raw_mode)
    assert [p for p in problems if not _lost_setid(p)] == []
    shutil.rmtree(out)


def _lost_setid(problem: str) -> bool:
    m = re.search(r": mode ([0-7]+) != ([0-7]+)$", problem)
    return m is not None and int(m.group(2), 8) & ~0o6000 == int(m.group(1), 8)


def raw_mode(image: Path, path: str) -> int:
    """i_mode read from the inode that dump.erofs locates (dump masks it to 0777):
    at meta_blkaddr * 4096 + nid * 32, 4 bytes into the inode."""
    m = re.search(r"inode metadata start block:\s+(\d+)", superblock(image))
    assert m
    with open(image, "rb") as f:
        f.seek(int(m.group(1)) * 4096 + dump(image, path).nid * 32 + 4)
        return int.from_bytes(f.read(2), "little")


@dataclass(frozen=True)
class Dumped:
    """What `dump.erofs --path` says about one inode."""

    size: int
    nid: int
    links: int
    layout: int
    inode_size: int
    xattr_size: int
    uid: int
    gid: int
    timestamp: str
    on_disk: int


def dump(image: Path, path: str) -> Dumped:
    text = subprocess.run(
        ["dump.erofs", f"--path={path}", str(image)], capture_output=True, text=True, check=True
    ).stdout

    def num(label: str) -> int:
        m = re.search(rf"{label}:\s+(\d+)", text)
        assert m, f"{label} missing in {text}"
        return int(m.group(1))

    stamp = re.search(r"Timestamp: (.+)", text)
    assert stamp
    return Dumped(
        size=num("Size"),
        nid=num("NID"),
        links=num("Links"),
        layout=num("Layout"),
        inode_size=num("Inode size"),
        xattr_size=num("Xattr size"),
        uid=num("Uid"),
        gid=num("Gid"),
        timestamp=stamp.group(1).strip(),
        on_disk=num("On-disk size"),
    )


def superblock(image: Path) -> str:
    return subprocess.run(
        ["dump.erofs", "-s", str(image)], capture_output=True, text=True, check=True
    ).stdout


def physical_extents(image: Path, path: str) -> list[tuple[int, int, int]]:
    """(logical offset, physical offset, length) per extent from `dump.erofs -e`."""
    text = subprocess.run(
        ["dump.erofs", "-e", f"--path={path}", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.findall(r"^\s*\d+:\s+(\d+)\.\.\s*\d+ \|\s+(\d+) :\s+(\d+)\.\.", text, re.M)
    return [(int(lo), int(phys), int(n)) for lo, n, phys in found]


def xattr_ibody_size(shared: int, inline: dict[bytes, bytes]) -> int:
    """Size erofs.rst gives an xattr ibody: 12-byte header, 4 bytes per shared
    id, per inline entry a 4-byte header + name suffix + value padded to 4."""
    if not shared and not inline:
        return 0
    prefixes = (b"user.", b"trusted.", b"security.")
    size = 12 + 4 * shared
    for name, value in inline.items():
        suffix = next(name[len(p) :] for p in prefixes if name.startswith(p))
        size += -(-(4 + len(suffix) + len(value)) // 4) * 4
    return size


def mtime_text(ns: int) -> str:
    import datetime

    sec, frac = divmod(ns, 10**9)
    stamp = datetime.datetime.fromtimestamp(sec, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp}.{frac:09d}"


def compressible(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def rich_tree(tmp_path: Path) -> Tree:
    """Every file type, hardlinks, xattrs (shared and inline), big ids, odd sizes."""
    cap = bytes.fromhex("01000002") + bytes(16)  # a VFS_CAP_REVISION_2 security.capability
    on_disk = tmp_path / "layer.bin"
    blob = os.urandom(300_000) + compressible(700_000, 1)
    on_disk.write_bytes(b"HEADER" + blob)
    tree = Tree(Node(NodeType.DIR, mode=0o755, mtime_ns=T0))
    d = Node(NodeType.DIR, mode=0o755, mtime_ns=T0)

    def add(path: bytes, node: Node) -> None:
        tree.add(path, node, make_dirs=d)

    add(b"/etc/empty", Node(NodeType.FILE, mode=0o600, mtime_ns=T0, content=EMPTY))
    add(b"/etc/hello", Node(NodeType.FILE, mode=0o644, content=Content.from_bytes(b"hi\n")))
    for size in (4095, 4096, 4097, 8192, 65536, 65537, 200_000):
        data = compressible(size, size)
        add(f"/sizes/{size}".encode(), Node(NodeType.FILE, content=Content.from_bytes(data)))
    add(b"/sizes/random", Node(NodeType.FILE, content=Content.from_bytes(os.urandom(150_000))))
    add(b"/layer/whole", Node(NodeType.FILE, content=Content(len(blob), str(on_disk), 6)))
    sparse = Content(300_000, str(on_disk), 6, extents=(Extent(5000, 70_000), Extent(200_000, 9)))
    add(b"/layer/sparse", Node(NodeType.FILE, mode=0o640, content=sparse))
    shared_node = Node(
        NodeType.FILE,
        mode=0o4755,
        uid=70_000,
        gid=80_000,
        mtime_ns=T0 + 123_456_789,
        content=Content.from_bytes(compressible(30_000, 7)),
        xattrs={b"security.capability": cap, b"user.note": b"x" * 50},
    )
    add(b"/bin/ping", shared_node)
    add(b"/bin/ping-again", shared_node)
    add(b"/sbin/ping-link", shared_node)
    add(
        b"/bin/other",
        Node(
            NodeType.FILE,
            content=Content.from_bytes(b"#!/bin/sh\n"),
            xattrs={b"user.note": b"x" * 50, b"trusted.t": b"own"},
        ),
    )
    add(b"/dev/null", Node(NodeType.CHAR, mode=0o666, rdev=(1, 3), mtime_ns=T0))
    add(b"/dev/sda", Node(NodeType.BLOCK, mode=0o660, gid=6, rdev=(8, 0), mtime_ns=T0))
    add(b"/dev/big", Node(NodeType.CHAR, mode=0o600, rdev=(300, 70_000), mtime_ns=T0))
    add(b"/run/fifo", Node(NodeType.FIFO, mode=0o644, mtime_ns=T0))
    add(b"/run/sock", Node(NodeType.SOCKET, mode=0o755, mtime_ns=T0))
    add(b"/lib/link", Node(NodeType.SYMLINK, mode=0o777, target=b"../etc/hello", mtime_ns=T0))
    add(b"/lib/long", Node(NodeType.SYMLINK, mode=0o777, target=b"a/" * 2000 + b"z"))
    add(b"/names/" + b"n" * 255, Node(NodeType.FILE, content=Content.from_bytes(b"long")))
    add(b"/names/-dash", Node(NodeType.FILE, mode=0o644, content=EMPTY))
    add(b"/names/\xff\xfe", Node(NodeType.FILE, mode=0o644, content=EMPTY))
    deep = b"/deep" + b"/d" * 60 + b"/leaf"
    add(deep, Node(NodeType.FILE, content=Content.from_bytes(b"deep\n")))
    add(b"/home/u", Node(NodeType.DIR, mode=0o1777, uid=65_536, gid=4_000_000_000, mtime_ns=-5))
    return tree


# --- tests ----------------------------------------------------------------------


@pytest.mark.parametrize("compress", ["none", "lz4", "lz4hc"])
def test_every_kind_of_entry_round_trips(tmp_path: Path, compress: str) -> None:
    tree = rich_tree(tmp_path)
    image = write_image(tree, tmp_path / "img", compress=compress)
    fsck(image)
    extract_and_compare(tree, image, tmp_path)

    ping = dump(image, "/bin/ping")
    assert raw_mode(image, "/bin/ping") == 0o104755
    assert ping.links == 3
    assert dump(image, "/bin/ping-again").nid == ping.nid == dump(image, "/sbin/ping-link").nid
    assert dump(image, "/bin/other").nid != ping.nid
    assert (ping.uid, ping.gid) == (70_000, 80_000)
    assert ping.timestamp == mtime_text(T0 + 123_456_789)
    assert ping.inode_size == 64  # ids above 65535: extended inode
    assert dump(image, "/dev/null").inode_size == 32  # build-time mtime, small ids: compact
    home = dump(image, "/home/u")
    assert (home.uid, home.gid, home.links) == (65_536, 4_000_000_000, 2)
    assert home.timestamp == mtime_text(-5)
    assert tree.root.children is not None
    subdirs = sum(1 for c in tree.root.children.values() if c.is_dir)
    assert dump(image, "/").links == 2 + subdirs  # ".", "..", and each subdirectory's ".."
    # user.note is on two inodes, so shared; the capability is ping's own
    assert ping.xattr_size == xattr_ibody_size(1, {b"security.capability": bytes(20)})
    assert dump(image, "/bin/other").xattr_size == xattr_ibody_size(1, {b"trusted.t": b"own"})
    assert dump(image, "/etc/hello").xattr_size == 0
    # lookups binary-search the sorted dirents; "-" sorts before "." and ".."
    assert dump(image, "/names/-dash").size == 0
    assert dump(image, "/names/" + "n" * 255).size == 4
    assert "shared xattr metadata start block" in superblock(image)


@pytest.mark.parametrize("compress", ["none", "lz4"])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_the_meta_area_rendered_a_few_inodes_at_a_time_is_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compress: str, group: int
) -> None:
    """Inodes are rendered META_GROUP at a time into the blocks they touch, read back from
    the image: groups that share a block (first-fit leaves blocks open) must not clobber
    each other's inodes, tails or directory tails. Tiny groups give the same bytes."""
    tree = rich_tree(tmp_path)
    d = Node(NodeType.DIR, mode=0o755, mtime_ns=T0)
    for i in range(300):  # many inodes with inline tails of many sizes, packed together
        tail = Content.from_bytes(bytes([i % 251]) * (i * 13 % 1500))
        tree.add(f"/many/f{i:03}".encode(), Node(NodeType.FILE, content=tail), make_dirs=d)
    whole = write_image(tree, tmp_path / "whole", compress=compress).read_bytes()
    monkeypatch.setattr(erofs_writer, "META_GROUP", group)
    image = write_image(tree, tmp_path / "grouped", compress=compress)
    assert image.read_bytes() == whole
    fsck(image)
    extract_and_compare(tree, image, tmp_path)


def test_compression_shrinks_compressible_and_keeps_random_plain(tmp_path: Path) -> None:
    tree = rich_tree(tmp_path)
    plain = write_image(tree, tmp_path / "plain", compress="none")
    packed = write_image(tree, tmp_path / "packed", compress="lz4hc")
    fast = write_image(tree, tmp_path / "fast", compress="lz4")
    assert dump(packed, "/sizes/200000").layout == 1  # EROFS_INODE_COMPRESSED_FULL
    assert dump(packed, "/sizes/200000").on_disk < 200_000 // 2
    assert dump(fast, "/sizes/200000").layout == 1
    assert dump(packed, "/sizes/random").layout in (0, 2)  # flat: it does not shrink
    assert dump(packed, "/etc/hello").layout == 2  # tiny files stay inline
    assert os.path.getsize(packed) < os.path.getsize(plain) * 0.8
    assert "0padding" in superblock(packed) and "big_pcluster" in superblock(packed)
    assert "0padding" not in superblock(plain)


def test_sparse_file_whose_compression_does_not_pay(tmp_path: Path) -> None:
    # One chunk saves a block (its 8 KiB hole compresses away) but 1024 index
    # entries cost more than that block: the writer takes the attempt back and
    # stores the file plain, and the hole must not keep the abandoned bytes.
    size = 4 << 20
    on_disk = tmp_path / "layer.bin"
    on_disk.write_bytes(os.urandom(size))
    content = Content(size, str(on_disk), 0, extents=(Extent(0, 8192), Extent(16384, size - 16384)))
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    tree.add(b"/f", Node(NodeType.FILE, mode=0o644, mtime_ns=T0, content=content))
    tree.add(b"/g", Node(NodeType.FILE, mode=0o644, mtime_ns=T0, content=Content.from_bytes(b"g")))
    image = write_image(tree, tmp_path / "img", compress="lz4hc")
    fsck(image)
    assert dump(image, "/f").layout in (0, 2)
    extract_and_compare(tree, image, tmp_path)


def zero_heavy_tree(tmp_path: Path, sparse_size: int, zero_size: int) -> Tree:
    """A sparse file (three runs of text, holes between), a file of real zeros, and a file
    whose zeros sit between text, as layers bring them."""
    runs = [compressible(1 << 20, 1), compressible(1 << 20, 2), compressible(1 << 20, 3)]
    stored = tmp_path / "runs.bin"
    stored.write_bytes(b"".join(runs))
    offsets = [0, sparse_size // 2 + 12_345, sparse_size - (1 << 20)]
    extents = tuple(Extent(o, len(r)) for o, r in zip(offsets, runs, strict=True))
    zeros = tmp_path / "zeros.bin"
    with open(zeros, "wb") as f:
        f.truncate(zero_size)  # real zeros to the reader: a layer's file is not sparse
    mixed = compressible(3 << 20, 4) + bytes(5 << 20) + compressible(2 << 20, 5) + bytes(100_000)
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    for name, content in (
        (b"/sparse", Content(sparse_size, str(stored), 0, extents=extents)),
        (b"/zeros", Content(zero_size, str(zeros), 0)),
        (b"/zeros-again", Content(zero_size, str(zeros), 0)),
        (b"/mixed", Content.from_bytes(mixed)),
    ):
        tree.add(name, Node(NodeType.FILE, mode=0o644, mtime_ns=T0, content=content))
    return tree


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line.split()[1] for line in f if line.startswith("rchar:")))


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["lz4", "lz4hc"])
def test_zeros_and_holes_cost_no_data_blocks(tmp_path: Path, compress: str) -> None:
    """Holes are not read and zeros are not stored: every 64 KiB of zeros points at one
    shared block. The image is no larger than mkfs.erofs makes of the same files (less:
    mkfs.erofs 1.5 spends a block per ~1 MiB of zeros), and reads back exactly."""
    sparse_size, zero_size = 512 << 20, 16 << 20
    tree = zero_heavy_tree(tmp_path, sparse_size, zero_size)
    before = _rchar()
    image = write_image(tree, tmp_path / "img", compress=compress)
    assert _rchar() - before < 2 * zero_size + (32 << 20)  # the zeros file twice, no holes
    fsck(image)
    for path in ("/sparse", "/zeros", "/zeros-again"):
        assert dump(image, path).layout == 1  # compressed
    assert dump(image, "/zeros").on_disk == 0  # only the shared zero blocks
    assert dump(image, "/sparse").on_disk < 3 << 20
    hole = {lo: phys for lo, phys, _ in physical_extents(image, "/sparse")}[64 << 20]
    assert {phys for _, phys, _ in physical_extents(image, "/zeros")} == {hole}
    extract_and_compare(tree, image, tmp_path)

    source = tmp_path / "source"
    fsck(image, f"--extract={source}")
    theirs = tmp_path / "mkfs.img"
    subprocess.run(["mkfs.erofs", f"-z{compress}", "-T0", str(theirs), str(source)],
                   check=True, capture_output=True)  # fmt: skip
    assert os.path.getsize(image) <= os.path.getsize(theirs) * 1.1


def test_output_is_reproducible_and_seeded(tmp_path: Path) -> None:
    tree = rich_tree(tmp_path)
    a = write_image(tree, tmp_path / "a", compress="lz4hc", seed=b"s", label="root")
    b = write_image(tree, tmp_path / "b", compress="lz4hc", seed=b"s", label="root")
    c = write_image(tree, tmp_path / "c", compress="lz4hc", seed=b"t", label="root")
    assert a.read_bytes() == b.read_bytes()
    uuid_a = re.search(r"UUID:\s+(\S+)", superblock(a))
    uuid_c = re.search(r"UUID:\s+(\S+)", superblock(c))
    assert uuid_a and uuid_c and uuid_a.group(1) != uuid_c.group(1)


@pytest.mark.slow
def test_large_directory(tmp_path: Path) -> None:
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    big = Node(NodeType.DIR, mtime_ns=T0)
    tree.add(b"/many", big)
    assert big.children is not None
    for i in range(100_000):
        big.children[f"entry-{i:06d}-{zlib.crc32(str(i).encode()):08x}".encode()] = Node(
            NodeType.FIFO, mode=0o600, mtime_ns=T0
        )
    image = write_image(tree, tmp_path / "img")
    fsck(image)
    extract_and_compare(tree, image, tmp_path)
    many = dump(image, "/many")
    assert many.size > 100_000 * 12 and many.links == 2
    # a lookup by name needs the sorted per-block binary search to work
    last = max(big.children)
    assert dump(image, "/many/" + last.decode()).links == 1


def test_file_over_4gib(tmp_path: Path) -> None:
    on_disk = tmp_path / "layer.bin"
    head, tail = os.urandom(10_000), os.urandom(5_000)
    on_disk.write_bytes(head + tail)
    size = 5 * GiB + 123
    content = Content(
        size, str(on_disk), 0, extents=(Extent(0, 10_000), Extent(size - 5_000, 5_000))
    )
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    tree.add(b"/huge", Node(NodeType.FILE, mode=0o644, mtime_ns=T0, content=content))
    image = write_image(tree, tmp_path / "img")
    fsck(image)
    info = dump(image, "/huge")
    assert info.size == size and info.inode_size == 64
    # the bytes sit where dump.erofs says (the last 123 inline after the inode)
    extents = physical_extents(image, "/huge")
    assert sum(n for _, _, n in extents) == size

    def read_at(logical: int, length: int) -> bytes:
        start, physical, n = next(e for e in extents if e[0] <= logical < e[0] + e[2])
        assert logical + length <= start + n
        with open(image, "rb") as f:
            f.seek(physical + logical - start)
            return f.read(length)

    assert read_at(0, 10_000) == head
    assert read_at(size - 5_000, 4877) + read_at(size - 123, 123) == tail
    assert read_at(3 * GiB, 4096) == bytes(4096)
    assert os.stat(image).st_blocks * 512 < GiB  # the image file itself stays sparse


def test_terabyte_sparse_file_with_compression_is_stored_plain(tmp_path: Path) -> None:
    """A file claiming 1 TB would need 2 GiB of lcluster indexes compressed, holes
    included: past 32 GiB a file is stored plain, where holes cost nothing."""
    import tracemalloc

    on_disk = tmp_path / "layer.bin"
    on_disk.write_bytes(b"head" + b"tail")
    size = 1 << 40
    content = Content(size, str(on_disk), 0, extents=(Extent(0, 4), Extent(size - 4, 4)))
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    tree.add(b"/big", Node(NodeType.FILE, mode=0o644, mtime_ns=T0, content=content))
    tree.add(b"/small", Node(NodeType.FILE, content=Content.from_bytes(compressible(99_999, 9))))
    tracemalloc.start()
    try:
        image = write_image(tree, tmp_path / "img", compress="lz4")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak
    assert dump(image, "/big").layout in (0, 2) and dump(image, "/big").size == size
    assert dump(image, "/small").layout == 1  # the others are still compressed
    assert os.stat(image).st_blocks * 512 < 1 << 20


def test_times_before_1970(tmp_path: Path) -> None:
    old = -86_400 * 10**9 + 1
    tree = Tree(Node(NodeType.DIR, mtime_ns=old))
    tree.add(b"/f", Node(NodeType.FILE, mtime_ns=old, content=Content.from_bytes(b"1969")))
    image = write_image(tree, tmp_path / "img")
    fsck(image)
    extract_and_compare(tree, image, tmp_path)
    assert dump(image, "/f").timestamp == mtime_text(old)


def test_unrepresentable_trees_fail_with_writer_errors(tmp_path: Path) -> None:
    tree = Tree()
    tree.add(b"/f", Node(NodeType.FILE, xattrs={b"system.weird": b"1"}))
    with pytest.raises(WriterError, match=r"system\.weird"):
        write_image(tree, tmp_path / "img")
    dev = Tree()
    dev.add(b"/d", Node(NodeType.CHAR, rdev=(5000, 1)))
    with pytest.raises(WriterError, match="5000:1"):
        write_image(dev, tmp_path / "img")
    with pytest.raises(WriterError, match="label"):
        write_image(Tree(), tmp_path / "img", label="x" * 16)
    owner = Tree()
    owner.add(b"/o", Node(NodeType.FILE, uid=1 << 32))
    with pytest.raises(WriterError, match=f"owner {1 << 32}:0 of '/o'"):
        write_image(owner, tmp_path / "img")
    # names a layer cannot spell, but a Tree can hold: each refused with its directory
    for bad in (b"n" * 256, b"", b"a/b", b"a\0b"):
        named = Tree()
        named.add(b"/sub/ok", Node(NodeType.FILE), make_dirs=Node(NodeType.DIR))
        sub = named.get(b"/sub")
        assert sub is not None and sub.children is not None
        sub.children[bad] = Node(NodeType.FILE)
        with pytest.raises(
            WriterError, match=f"cannot store the name {re.escape(repr(bad))} in '/sub'"
        ):
            write_image(named, tmp_path / "img")
    with pytest.raises(WriterError, match="lz4hc level"):
        write_image(Tree(), tmp_path / "img", compress="lz4hc", compress_level=99)
    with pytest.raises(WriterError, match="compression"):
        write_image(Tree(), tmp_path / "img", compress="zstd")


# --- the real oracle: Linux 6.1 mounts the images --------------------------------

# Debian 12's kernel (linux-image-amd64), the version the guest runs
_RELEASES = sorted(p.name.removeprefix("vmlinuz-") for p in Path("/boot").glob("vmlinuz-6.1.*"))
_RELEASE = _RELEASES[-1] if _RELEASES else "6.1-missing"
KERNEL = Path(f"/boot/vmlinuz-{_RELEASE}")
MODULES = Path(f"/lib/modules/{_RELEASE}/kernel")
# insmod order: erofs needs libcrc32c, which needs a crc32c implementation
GUEST_MODULES = ("crypto/crc32c_generic.ko", "lib/libcrc32c.ko", "fs/erofs/erofs.ko")
GUEST_MODULES += ("drivers/block/loop.ko",)

# Prints one line per entry under argv[1]: everything stat, readlink and the
# xattr calls say, and a crc32 of regular files' bytes (hex for names/values).
WALKER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

static uint32_t table[256];
static size_t rootlen;
static unsigned char buf[1 << 16];

static void hex(const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", ((const unsigned char *)p)[i]);
}

static uint32_t crc_file(const char *path) {
    uint32_t c = 0xFFFFFFFFu;
    ssize_t n;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++) c = table[(c ^ buf[i]) & 0xff] ^ (c >> 8);
    close(fd);
    return n < 0 ? 0 : c ^ 0xFFFFFFFFu;
}

static int visit(const char *p, const struct stat *st, int flag, struct FTW *f) {
    static char names[1 << 16], target[8192];
    const char *rel = p[rootlen] ? p + rootlen : "/";
    printf("E ");
    hex(rel, strlen(rel));
    printf(" %o %u %u %lu %lld %lld %ld %u %u %lu", st->st_mode, st->st_uid, st->st_gid,
           (unsigned long)st->st_nlink, (long long)st->st_size, (long long)st->st_mtim.tv_sec,
           st->st_mtim.tv_nsec, major(st->st_rdev), minor(st->st_rdev),
           (unsigned long)st->st_ino);
    if (S_ISREG(st->st_mode)) printf(" %08x", crc_file(p)); else printf(" -");
    printf(" :");
    if (S_ISLNK(st->st_mode)) {
        ssize_t n = readlink(p, target, sizeof target);
        hex(target, n > 0 ? n : 0);
    }
    ssize_t len = llistxattr(p, names, sizeof names);
    for (ssize_t i = 0; i < len; i += strlen(names + i) + 1) {
        ssize_t vl = lgetxattr(p, names + i, buf, sizeof buf);
        printf(" ");
        hex(names + i, strlen(names + i));
        printf("=");
        hex(buf, vl > 0 ? vl : 0);
    }
    printf("\n");
    return 0;
}

int main(int argc, char **argv) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[i] = c;
    }
    rootlen = strlen(argv[1]);
    return nftw(argv[1], visit, 64, FTW_PHYS);
}
"""

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod $m; done
mkdir -p /mnt
for img in /images/*; do
  echo "VMIMG-BEGIN $(basename $img)"
  losetup -r /dev/loop0 $img
  if mount -t erofs -o ro /dev/loop0 /mnt; then
    /walker /mnt
    umount /mnt
  else
    echo "VMIMG-MOUNT-FAILED"
  fi
  dmesg | grep -i erofs | grep -iv "mounted with\\|experimental" | sed 's/^/VMIMG-DMESG /'
  dmesg -c > /dev/null
  losetup -d /dev/loop0
  echo "VMIMG-END"
done
poweroff -f
"""


@dataclass(frozen=True)
class Seen:
    """One entry as the guest kernel presents it."""

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int
    rdev: tuple[int, int]
    ino: int
    crc: int | None
    target: bytes
    xattrs: dict[bytes, bytes]


def _guest_ready() -> str | None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("musl-gcc") is None:
        return "qemu or musl-gcc missing"
    if not KERNEL.exists() or not all((MODULES / m).exists() for m in GUEST_MODULES):
        return f"no {KERNEL} with erofs modules"
    if not Path("/bin/busybox").exists():
        return "no static busybox"
    return None


def mount_in_guest(images: dict[str, Path], tmp_path: Path) -> dict[str, dict[bytes, Seen]]:
    """Boot Linux 6.1 on an initramfs holding the images; mount each and walk it."""
    root = tmp_path / "initramfs"
    for sub in ("bin", "proc", "sys", "dev", "modules", "images"):
        (root / sub).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for i, module in enumerate(GUEST_MODULES):
        shutil.copy(MODULES / module, root / f"modules/{i}-{Path(module).name}")
    for name, image in images.items():
        shutil.copy(image, root / "images" / name)
    (tmp_path / "walker.c").write_text(WALKER_C)
    subprocess.run(
        ["musl-gcc", "-static", "-O2", "-o", str(root / "walker"), str(tmp_path / "walker.c")],
        check=True,
    )
    (root / "init").write_text(GUEST_INIT)
    (root / "init").chmod(0o755)
    cpio = tmp_path / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(cpio, "wb") as out:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=out, check=True
        )
    # TCG by default: nested KVM on CI-like hosts can hang the guest silently
    kvm = os.environ.get("VMIMG_TEST_KVM") == "1"
    console = subprocess.run(
        ["qemu-system-x86_64", "-accel", "kvm" if kvm else "tcg", "-m", "512", "-nographic",
         "-no-reboot", "-kernel", str(KERNEL), "-initrd", str(cpio),
         "-append", "console=ttyS0 quiet panic=-1 rdinit=/init"],
        capture_output=True, timeout=300, check=False,
    ).stdout.decode(errors="replace")  # fmt: skip
    return _parse_console(console)


def _parse_console(console: str) -> dict[str, dict[bytes, Seen]]:
    result: dict[str, dict[bytes, Seen]] = {}
    current: dict[bytes, Seen] | None = None
    for line in console.replace("\r", "").splitlines():
        if "VMIMG-" in line:  # the firmware's escape codes may precede a marker
            line = line[line.index("VMIMG-") :]
        if line.startswith("VMIMG-BEGIN "):
            current = result.setdefault(line.split()[1], {})
        elif line.startswith(("VMIMG-MOUNT-FAILED", "VMIMG-DMESG")):
            raise AssertionError(f"guest: {line}")
        elif line.startswith("E ") and current is not None:
            head, _, tail = line.partition(" :")
            f = head.split()
            target, *pairs = tail.split(" ")
            xattrs = {}
            for pair in pairs:
                name, _, value = pair.partition("=")
                xattrs[bytes.fromhex(name)] = bytes.fromhex(value)
            current[bytes.fromhex(f[1])] = Seen(
                mode=int(f[2], 8), uid=int(f[3]), gid=int(f[4]), nlink=int(f[5]),
                size=int(f[6]), mtime_ns=int(f[7]) * 10**9 + int(f[8]),
                rdev=(int(f[9]), int(f[10])), ino=int(f[11]),
                crc=None if f[12] == "-" else int(f[12], 16),
                target=bytes.fromhex(target), xattrs=xattrs,
            )  # fmt: skip
    return result


def kernel_differences(tree: Tree, seen: dict[bytes, Seen]) -> list[str]:
    """Everything the kernel shows that differs from the tree, by path."""
    problems = []
    counts = tree.link_counts()
    ino_of: dict[int, int] = {}
    node_of: dict[int, int] = {}
    with ContentReader() as reader:
        for path, node in tree.walk():
            got = seen.pop(path, None)
            if got is None:
                problems.append(f"{path!r}: missing")
                continue
            want = {
                "mode": node.st_mode,
                "owner": (node.uid, node.gid),
                "nlink": counts[id(node)],
                "mtime": node.mtime_ns,
                "xattrs": node.xattrs,
            }
            have = {
                "mode": got.mode,
                "owner": (got.uid, got.gid),
                "nlink": got.nlink,
                "mtime": got.mtime_ns,
                "xattrs": got.xattrs,
            }
            if node.type is NodeType.FILE:
                assert node.content is not None
                want["data"] = (node.size, zlib.crc32(reader.read_all(node.content)))
                have["data"] = (got.size, got.crc)
            if node.type is NodeType.SYMLINK:
                want["target"], have["target"] = node.target, got.target
            if node.type in (NodeType.CHAR, NodeType.BLOCK):
                want["rdev"], have["rdev"] = node.rdev, got.rdev
            problems += [
                f"{path!r}: {k} {have[k]!r} != {want[k]!r}" for k in want if have[k] != want[k]
            ]
            if ino_of.setdefault(id(node), got.ino) != got.ino or node_of.setdefault(
                got.ino, id(node)
            ) != id(node):
                problems.append(f"{path!r}: inode number does not match the hardlinks")  # fmt: skip
    problems += [f"{path!r}: unexpected" for path in seen]
    return problems


@pytest.mark.boot
def test_linux_6_1_mounts_the_images(tmp_path: Path) -> None:
    reason = _guest_ready()
    if reason:
        pytest.fail(f"{reason}: run the README set-up")
    tree = rich_tree(tmp_path)
    many = Node(NodeType.DIR, mode=0o755, mtime_ns=T0)
    tree.add(b"/many", many)
    assert many.children is not None
    for i in range(3000):
        many.children[f"{zlib.crc32(str(i).encode()):08x}-{i}".encode()] = Node(
            NodeType.FILE, mode=0o644, mtime_ns=T0 + i, content=Content.from_bytes(b"%d" % i)
        )
    # zero chunks of several files share pclusters: the kernel must read them all back
    zero_heavy = zero_heavy_tree(tmp_path, 24 << 20, 4 << 20).root.children
    assert zero_heavy is not None
    for name, node in zero_heavy.items():
        tree.add(b"/zero-heavy/" + name, node, make_dirs=many)
    images = {
        c: write_image(tree, tmp_path / f"{c}.img", compress=c) for c in ("none", "lz4", "lz4hc")
    }
    results = mount_in_guest(images, tmp_path)
    assert sorted(results) == sorted(images)
    for name, seen in results.items():
        assert kernel_differences(tree, seen) == [], name
