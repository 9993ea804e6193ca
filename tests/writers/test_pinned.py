"""The ext4 and erofs writers' exact bytes, pinned.

The writers are rewritten for speed (compact tree, batched packing, a compiled core);
none of that may change a byte. Each case builds a varied tree from seeded data (no
randomness from the host), writes it, and compares the image's sha256 (and the warnings)
with the digest the writers produced before the rewrite. A deliberate format change bumps
WRITER_VERSIONS and updates the digests here in the same commit.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import layerkit as L
from vmimg.image.layers import Extent, LayerFile
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.flatten import flatten
from vmimg.rootfs.tree import NS_PER_S, Content, Node, NodeType, Tree
from vmimg.rootfs.writers import write_image
from vmimg.rootfs.writers.erofs import ErofsOptions
from vmimg.rootfs.writers.ext4 import Ext4Options

MiB = 1 << 20
T0 = 1_700_000_000_123_456_789


def _rng_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _text(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    head = (2).to_bytes(4, "little")
    return head + b"".join(
        t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little")
        for t, p, i in entries
    )


def kinds_tree(tmp: Path) -> Tree:
    """Every node type, hardlinks, xattrs of every kind, sparse files, odd sizes and times."""
    blob = tmp / "blob.bin"
    payload = _rng_bytes(1, 300_000) + _text(2, 700_000) + bytes(200_000) + _text(3, 100_000)
    blob.write_bytes(b"HEADER" + payload)
    tree = Tree(Node(NodeType.DIR, mode=0o755, mtime_ns=T0))
    template = Node(NodeType.DIR, mode=0o755, mtime_ns=T0)

    def add(path: bytes, node: Node) -> None:
        tree.add(path, node, make_dirs=template)

    add(
        b"/etc/empty", Node(NodeType.FILE, mode=0o600, mtime_ns=T0, content=Content.from_bytes(b""))
    )
    add(b"/etc/hello", Node(NodeType.FILE, content=Content.from_bytes(b"hi\n"), mtime_ns=5))
    for size in (1, 4095, 4096, 4097, 8192, 65536, 65537, 200_000):
        add(
            b"/sizes/%d" % size,
            Node(NodeType.FILE, mtime_ns=T0, content=Content.from_bytes(_text(size, size))),
        )
    add(b"/sizes/random", Node(NodeType.FILE, content=Content.from_bytes(_rng_bytes(9, 150_000))))
    add(
        b"/layer/whole",
        Node(NodeType.FILE, mtime_ns=T0, content=Content(len(payload), str(blob), 6)),
    )
    sparse = Content(
        9 * MiB,
        str(blob),
        6,
        extents=(Extent(5000, 70_000), Extent(3 * MiB, 300_000), Extent(9 * MiB - 9, 9)),
    )
    add(b"/layer/sparse", Node(NodeType.FILE, mode=0o640, content=sparse, mtime_ns=T0))
    zeros = Content(2 * MiB, str(blob), 6 + 1_000_000, extents=(Extent(MiB, 200_000),))
    add(b"/layer/zeros", Node(NodeType.FILE, content=zeros, mtime_ns=T0))
    runs = tuple(Extent(i * 8192, 100) for i in range(600))  # more extents than one block
    add(
        b"/layer/fragmented",
        Node(NodeType.FILE, mtime_ns=T0, content=Content(600 * 8192, str(blob), 6, extents=runs)),
    )
    cap = bytes.fromhex("01000002") + bytes(16)
    shared = Node(
        NodeType.FILE,
        mode=0o4755,
        uid=70_000,
        gid=80_000,
        mtime_ns=T0 + 1,
        content=Content.from_bytes(_text(7, 30_000)),
        xattrs={b"security.capability": cap, b"user.note": b"x" * 50},
    )
    for path in (b"/bin/ping", b"/bin/ping-again", b"/sbin/ping-link"):
        add(path, shared)
    add(
        b"/bin/other",
        Node(
            NodeType.FILE,
            content=Content.from_bytes(b"#!/bin/sh\n"),
            xattrs={b"user.note": b"x" * 50, b"trusted.t": b"own"},
        ),
    )
    big = {b"user.k%02d" % i: bytes([i]) * 120 for i in range(8)}
    for i in range(3):
        add(
            b"/srv/shared%d" % i,
            Node(NodeType.FILE, xattrs=dict(big), content=Content.from_bytes(b"%d" % i)),
        )
    acl = _acl(
        [
            (1, 7, 0xFFFFFFFF),
            (2, 5, 1000),
            (4, 5, 0xFFFFFFFF),
            (0x10, 7, 0xFFFFFFFF),
            (0x20, 0, 0xFFFFFFFF),
        ]
    )
    add(b"/srv/acl", Node(NodeType.DIR, mode=0o770, xattrs={b"system.posix_acl_access": acl}))
    add(b"/dev/null", Node(NodeType.CHAR, mode=0o666, rdev=(1, 3), mtime_ns=T0))
    add(b"/dev/sda", Node(NodeType.BLOCK, mode=0o660, gid=6, rdev=(8, 0), mtime_ns=T0))
    add(b"/dev/nvme", Node(NodeType.BLOCK, mode=0o660, rdev=(259, 70_000), mtime_ns=T0))
    add(b"/run/fifo", Node(NodeType.FIFO, mode=0o644, mtime_ns=T0))
    add(b"/run/sock", Node(NodeType.SOCKET, mode=0o755, mtime_ns=T0))
    add(b"/lib/link", Node(NodeType.SYMLINK, target=b"../etc/hello", mtime_ns=T0))
    add(b"/lib/edge59", Node(NodeType.SYMLINK, target=b"y" * 59, mtime_ns=T0))
    add(b"/lib/edge60", Node(NodeType.SYMLINK, target=b"z" * 60, mtime_ns=T0))
    add(b"/lib/long", Node(NodeType.SYMLINK, target=b"a/" * 1000 + b"z", mtime_ns=T0))
    add(b"/names/" + b"n" * 255, Node(NodeType.FILE, content=Content.from_bytes(b"long")))
    add(b"/names/\xff\xfe-not-utf8", Node(NodeType.FILE, content=Content.from_bytes(b"\0" * 5000)))
    add(b"/deep" + b"/d" * 300 + b"/leaf", Node(NodeType.FILE, content=Content.from_bytes(b"d")))
    add(b"/home/u", Node(NodeType.DIR, mode=0o1777, uid=65_536, gid=4_000_000_000, mtime_ns=-5))
    add(
        b"/times/1800",
        Node(NodeType.FILE, mtime_ns=-5_364_662_400 * NS_PER_S, content=Content.from_bytes(b"")),
    )
    add(
        b"/times/2500",
        Node(
            NodeType.FILE, mtime_ns=16_725_225_600 * NS_PER_S + 3, content=Content.from_bytes(b"")
        ),
    )
    add(
        b"/times/minus",
        Node(NodeType.FILE, mtime_ns=-1_500_000_001, content=Content.from_bytes(b"")),
    )
    return tree


def wide_tree(tmp: Path) -> Tree:
    """Directories past one block: 3,000 short names, 8,000 255-byte names (a two-level
    htree in ext4), and one of a few hundred names of every length."""
    tree = Tree(Node(NodeType.DIR, mode=0o755, mtime_ns=T0))
    empty = Content.from_bytes(b"")
    for path, names in (
        (b"/short", [b"entry-%06d.conf" % i for i in range(3000)]),
        (
            b"/long",
            [(b"%05d-" % i) + bytes([0x61 + i % 26, 0xE9]) * 124 + b"x" for i in range(8000)],
        ),
        (b"/mixed", [b"%d" % i + b"m" * (i % 250) for i in range(700)]),
    ):
        d = Node(NodeType.DIR, mtime_ns=T0)
        tree.add(path, d)
        assert d.children is not None
        for i, name in enumerate(names):
            if i % 97 == 0:
                d.children[name] = Node(NodeType.DIR, mtime_ns=T0 + i)
            elif i % 13 == 0:
                d.children[name] = Node(NodeType.SYMLINK, target=b"t%d" % i, mtime_ns=T0)
            else:
                d.children[name] = Node(NodeType.FILE, content=empty, mtime_ns=T0, uid=i % 3)
    return tree


def flattened_tree(tmp: Path) -> Tree:
    """Two layers through flatten: nested small files, whiteouts, an opaque directory,
    hardlinks, a symlinked parent, replaced entries."""
    lower = [L.dir("usr/", mtime=1_600_000_100), L.dir("usr/share/")]
    for i in range(2000):
        lower.append(
            L.file(
                f"data/{i % 10}/{i // 10 % 10}/f{i:05d}",
                b"file %d\n" % i * 3,
                mode=0o644 if i % 7 else 0o755,
                uid=i % 5,
                mtime=1_600_000_000 + i,
            )
        )
    lower += [
        L.file("usr/share/doc/a", b"a"),
        L.file("usr/share/doc/b", b"b"),
        L.dir("usr/share/locale/"),
        L.file("usr/share/locale/x", b"x"),
        L.symlink("lib", "usr/lib"),
        L.file("usr/lib/libc.so.6", b"\x7fELF" * 500),
        L.hardlink("usr/lib/libc-again", "usr/lib/libc.so.6"),
        L.chardev("dev/null", 1, 3),
        L.fifo("run/pipe"),
    ]
    upper = [
        L.whiteout("usr/share/doc/a"),
        L.opaque("usr/share/locale"),
        L.file("usr/share/locale/y", b"y"),
        L.file("lib/through-symlink", b"resolved inside the tree"),
        L.file("data/0/0/f00000", b"replaced"),
        L.dir("data/1/", mode=0o700),
        L.hardlink("data/link-to-libc", "usr/lib/libc.so.6"),
        L.file("etc/with-xattr", b"x", pax={"SCHILY.xattr.user.k": "v"}),
    ]
    layers = []
    for i, entries in enumerate((lower, upper)):
        path = tmp / f"layer{i}.tar"
        path.write_bytes(L.layer(*entries))
        layers.append(LayerFile(str(path), f"sha256:{i}"))
    return flatten(layers)


TREES: dict[str, Callable[[Path], Tree]] = {
    "kinds": kinds_tree,
    "wide": wide_tree,
    "flattened": flattened_tree,
}
OPTIONS: dict[str, tuple[str, object]] = {
    "ext4": ("ext4", Ext4Options(seed=b"pinned", headroom=MiB)),
    "ext4-unseeded": ("ext4", Ext4Options(headroom=0, journal=False, label="pinned")),
    "ext4-sized": ("ext4", Ext4Options(size=512 * MiB, extra_inodes=100, seed=b"s")),
    "erofs": ("erofs", ErofsOptions(seed=b"pinned")),
    "erofs-lz4": ("erofs", ErofsOptions(compress="lz4", seed=b"pinned")),
    "erofs-lz4hc": ("erofs", ErofsOptions(compress="lz4hc", seed=b"pinned", label="pinned")),
}

# sha256 of (image bytes, then each warning line) as the writers made them before the
# speed work; see the module's docstring.
PINNED: dict[tuple[str, str], str] = {
    ("flattened", "ext4"): "2450eca21d91d3f880ed0d313f523b385feb4a64ff540da217a3b083e90a7c43",
    (
        "flattened",
        "ext4-unseeded",
    ): "7666dd91b37838098fed6d98ce0d3409e3d8c952a58c8b3606d29e68523a3203",
    ("flattened", "ext4-sized"): "e1340580adbd7d726bf8617d7f8a7bbe77ca194e8429b0dae9748282f8167277",
    ("flattened", "erofs"): "3394252374a113b6cbab1c4f1e3d93dcdb1b9aed7c4778025b6a39e9d58d9ebd",
    ("flattened", "erofs-lz4"): "3394252374a113b6cbab1c4f1e3d93dcdb1b9aed7c4778025b6a39e9d58d9ebd",
    (
        "flattened",
        "erofs-lz4hc",
    ): "9ba474e0eff85b9502ed0036f38040d6e3cb4fcbacabebe70995b3fe486f8f15",
    ("kinds", "ext4"): "5babdc03623a03c1c19ce980a8f748f4b0fc39603df890dfa56e09bc9c1cecf1",
    ("kinds", "ext4-unseeded"): "e449a34281792f8520a7e83dc3a1f3dd44986f534af9ef14909605ba8b385f31",
    ("kinds", "ext4-sized"): "4a157a6a706e01f950fc096a1d5f6c9faa3a6e2a80603c52a6c06fb2b6f2027e",
    ("kinds", "erofs"): "fbde12f41bf10baa512bb4b395d145dbe42988a7c3c6a5dd199647bcb20574b3",
    ("kinds", "erofs-lz4"): "a71b41f583e059c4e4b70dfa97ecb952182df2963a625b66dc1c91abe691ab26",
    ("kinds", "erofs-lz4hc"): "1ffe129602e2d4babc1e68cad1dda822596db80abfb41214c3d38d5ca1dc9a44",
    ("wide", "ext4"): "2f5db3f05706011910d8ff1781554072762746683859c04757c83fe1363c5ad3",
    ("wide", "ext4-unseeded"): "d948c758197d4700d00f4a52295ab07afdac576ddb71c3bc7a2ccde4411a7c97",
    ("wide", "ext4-sized"): "4b30c311e5dc42074485ac2711075daf8514b6ea33705a260d94c9f2ded88c6a",
    ("wide", "erofs"): "2211f55ed35485c5e2a6aab5185f3911e6594600f7a881b9bbd6b44e20937b4c",
    ("wide", "erofs-lz4"): "2211f55ed35485c5e2a6aab5185f3911e6594600f7a881b9bbd6b44e20937b4c",
    ("wide", "erofs-lz4hc"): "e55c73b839bf713b72b7c38966134b5f65f5d7c7788cf9f835bb18fa5d71d99e",
}


def digest_of(tree: Tree, which: str, out: Path) -> str:
    fmt, options = OPTIONS[which]
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ContentReader() as reader:
            warnings = write_image(fmt, tree, reader, fd, options)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    for line in warnings:
        h.update(b"\0" + line.encode())
    return h.hexdigest()


# Trees whose four images take more than a few seconds: the slow tier pins them.
SLOW_TREES = frozenset({"wide"})


@pytest.mark.parametrize(
    "tree_name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TREES else n for n in sorted(TREES)],
)
def test_writers_give_the_pinned_bytes(tree_name: str, tmp_path: Path) -> None:
    tree = TREES[tree_name](tmp_path)
    got = {which: digest_of(tree, which, tmp_path / f"{which}.img") for which in OPTIONS}
    want = {which: PINNED.get((tree_name, which)) for which in OPTIONS}
    assert got == want
