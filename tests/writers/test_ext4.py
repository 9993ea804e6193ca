"""The native ext4 writer, checked by e2fsprogs: e2fsck must accept every image,
debugfs reads the contents back (rdump for data, stat/ea_get for what rdump
does not preserve: setuid bits, xattrs, hardlinks, devices, nanoseconds)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.treecheck import Checks, compare_tree_with_dir
from vmimg.errors import WriterError
from vmimg.image.layers import Extent
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Content, Node, NodeType, Tree
from vmimg.rootfs.writers.ext4 import Ext4Options, write_ext4

MiB = 1 << 20
GiB = 1 << 30
T0 = 1_700_000_000_123_456_789  # a timestamp with nanoseconds


# --- Helpers -------------------------------------------------------------------------


def write_image(tree: Tree, path: Path, **options: object) -> Path:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with ContentReader() as reader:
            write_ext4(tree, reader, fd, Ext4Options(**options))  # type: ignore[arg-type]
    finally:
        os.close(fd)
    return path


def fsck(img: Path) -> str:
    proc = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def debugfs(img: Path, commands: list[str]) -> str:
    script = img.with_suffix(".debugfs")
    script.write_bytes(b"".join(os.fsencode(c) + b"\n" for c in commands))
    proc = subprocess.run(["debugfs", "-f", str(script), str(img)], capture_output=True, check=True)
    return proc.stdout.decode(errors="surrogateescape")


def superblock_field(img: Path, name: str) -> str:
    out = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True).stdout
    m = re.search(rf"^{re.escape(name)}:\s*(.*)$", out, re.M)
    assert m, f"{name} not in dumpe2fs output"
    return m.group(1).strip()


@dataclass
class Stat:
    """What `debugfs stat` says about one inode."""

    ino: int
    kind: str
    mode: int
    flags: int
    uid: int
    gid: int
    size: int
    links: int
    mtime_ns: int
    rdev: tuple[int, int] | None
    xattr_names: list[str]
    text: str


_KIND = {
    NodeType.FILE: "regular",
    NodeType.DIR: "directory",
    NodeType.SYMLINK: "symlink",
    NodeType.CHAR: "character special",
    NodeType.BLOCK: "block special",
    NodeType.FIFO: "FIFO",
    NodeType.SOCKET: "socket",
}


def _decode_time(sec_hex: str, extra_hex: str) -> int:
    sec = int(sec_hex, 16)
    sec = sec - (1 << 32) if sec & 0x80000000 else sec
    extra = int(extra_hex, 16)
    sec += (extra & 3) << 32
    return sec * 1_000_000_000 + (extra >> 2)


def parse_stat(text: str) -> Stat:
    head = re.search(r"Inode: (\d+)\s+Type: (.+?)\s+Mode:\s+(\d+)\s+Flags: (0x[0-9a-f]+)", text)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+).*?Size: (\d+)", text)
    links = re.search(r"Links: (\d+)", text)
    mtime = re.search(r" mtime: 0x([0-9a-f]+):([0-9a-f]+)", text)
    assert head and owner and links and mtime, text
    dev = re.search(r"Device major/minor number: (\d+):(\d+)", text)
    xattrs: list[str] = []
    if "Extended attributes:" in text:
        block = text.split("Extended attributes:", 1)[1]
        for line in block.splitlines()[1:]:
            m = re.match(r"  (\S+) \(\d+\)", line)
            if not m:
                break
            xattrs.append(m.group(1))
    return Stat(
        ino=int(head.group(1)),
        kind=head.group(2),
        mode=int(head.group(3), 8),
        flags=int(head.group(4), 16),
        uid=int(owner.group(1)),
        gid=int(owner.group(2)),
        size=int(owner.group(3)),
        links=int(links.group(1)),
        mtime_ns=_decode_time(mtime.group(1), mtime.group(2)),
        rdev=(int(dev.group(1)), int(dev.group(2))) if dev else None,
        xattr_names=sorted(xattrs),
        text=text,
    )


def xattr_block(st: Stat) -> int:
    m = re.search(r"File ACL: (\d+)", st.text)
    assert m
    return int(m.group(1))


def stat_paths(img: Path, paths: list[bytes]) -> dict[bytes, Stat]:
    out = debugfs(img, ["stat " + os.fsdecode(p) for p in paths])
    parts = out.split("debugfs: stat ")[1:]
    assert len(parts) == len(paths)
    return {p: parse_stat(part) for p, part in zip(paths, parts, strict=True)}


def xattr_values(img: Path, path: bytes, names: list[str], tmp: Path) -> dict[bytes, bytes]:
    files = [tmp / f"xattr{i}" for i in range(len(names))]
    debugfs(
        img, [f"ea_get -f {f} {os.fsdecode(path)} {n}" for f, n in zip(files, names, strict=True)]
    )
    return {n.encode(): f.read_bytes() for f, n in zip(files, names, strict=True)}


def _rdump_view(node: Node, memo: dict[int, Node | None]) -> Node | None:
    """The tree as `debugfs rdump` can reproduce it: no special files, no
    setuid/setgid/sticky bits (they do not survive its chmod/chown order)."""
    if id(node) in memo:
        return memo[id(node)]
    if node.type in (NodeType.CHAR, NodeType.BLOCK, NodeType.FIFO, NodeType.SOCKET):
        memo[id(node)] = None
        return None
    copy = Node(
        node.type,
        mode=node.mode & 0o777,
        uid=node.uid,
        gid=node.gid,
        mtime_ns=node.mtime_ns,
        target=node.target,
        content=node.content,
    )
    memo[id(node)] = copy
    if node.children is not None:
        assert copy.children is not None
        for name, child in node.children.items():
            viewed = _rdump_view(child, memo)
            if viewed is not None:
                copy.children[name] = viewed
    return copy


def check_image(tree: Tree, img: Path, tmp: Path, *, rdump: bool = True) -> dict[bytes, Stat]:
    """e2fsck, then compare every inode with the tree. Returns the stats by path."""
    fsck(img)
    reader = ContentReader()
    if rdump:
        out = tmp / "rdump"
        out.mkdir()
        debugfs(img, [f"rdump / {out}"])
        assert (out / "lost+found").is_dir()
        if tree.get(b"/lost+found") is None:
            (out / "lost+found").rmdir()
        view = _rdump_view(tree.root, {})
        assert view is not None
        differences = compare_tree_with_dir(
            Tree(view), reader, str(out), Checks(xattrs=False, hardlinks=False)
        )
        assert differences == []
        shutil.rmtree(out)

    first_path: dict[int, bytes] = {}
    all_paths: list[tuple[bytes, Node]] = list(tree.walk())
    for path, node in all_paths:
        first_path.setdefault(id(node), path)
    stats = stat_paths(img, [p for p, _ in all_paths])
    links = tree.link_counts()
    if tree.get(b"/lost+found") is None:
        links[id(tree.root)] += 1
    problems: list[str] = []
    for path, node in all_paths:
        st = stats[path]
        shown = os.fsdecode(path)
        if st.kind != _KIND[node.type]:
            problems.append(f"{shown}: type {st.kind}")
            continue
        if st.mode != node.mode:
            problems.append(f"{shown}: mode {st.mode:o} != {node.mode:o}")
        if (st.uid, st.gid) != (node.uid, node.gid):
            problems.append(f"{shown}: owner {st.uid}:{st.gid}")
        if st.mtime_ns != node.mtime_ns:
            problems.append(f"{shown}: mtime {st.mtime_ns} != {node.mtime_ns}")
        if st.links != links[id(node)]:
            problems.append(f"{shown}: links {st.links} != {links[id(node)]}")
        if st.ino != stats[first_path[id(node)]].ino:
            problems.append(f"{shown}: not a hardlink of {os.fsdecode(first_path[id(node)])}")
        if node.type in (NodeType.CHAR, NodeType.BLOCK) and st.rdev != node.rdev:
            problems.append(f"{shown}: rdev {st.rdev} != {node.rdev}")
        if node.type is NodeType.FILE and st.size != node.size:
            problems.append(f"{shown}: size {st.size} != {node.size}")
        if st.xattr_names != sorted(n.decode() for n in node.xattrs):
            problems.append(f"{shown}: xattrs {st.xattr_names}")
        elif node.xattrs and first_path[id(node)] == path:
            got = xattr_values(img, path, st.xattr_names, tmp)
            if _normal_acls(got) != _normal_acls(node.xattrs):
                problems.append(f"{shown}: xattr values {got} != {node.xattrs}")
    inos = [stats[p].ino for p, n in all_paths if first_path[id(n)] == p]
    if len(set(inos)) != len(inos):
        problems.append("two nodes share an inode")
    assert problems == []
    return stats


def _normal_acls(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """POSIX ACL values with the id of USER_OBJ, GROUP_OBJ, MASK and OTHER zeroed.

    Those ids are not stored on disk; the kernel reports them as -1 and
    debugfs as 0, so only the stored fields are compared.
    """
    out = dict(xattrs)
    for name in (b"system.posix_acl_access", b"system.posix_acl_default"):
        if name in out:
            value = bytearray(out[name])
            for off in range(4, len(value), 8):
                tag = struct.unpack_from("<H", value, off)[0]
                if tag not in (0x02, 0x08):
                    struct.pack_into("<I", value, off + 4, 0)
            out[name] = bytes(value)
    return out


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extents_of(stat_text: str) -> list[tuple[int, int, int]]:
    """(first logical block, last logical block, first physical block) from debugfs stat."""
    section = stat_text.split("EXTENTS:", 1)[1]
    out = []
    for m in re.finditer(r"\((\d+)(?:-(\d+))?\):(\d+)(?:-\d+)?", section):
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        out.append((first, last, int(m.group(3))))
    return out


def read_logical(img: Path, stat_text: str, offset: int, length: int) -> bytes:
    """Read file bytes through the extent map debugfs reports (no dump of holes)."""
    block = 4096
    out = bytearray()
    with open(img, "rb") as f:
        pos = offset
        while pos < offset + length:
            lblk = pos // block
            for first, last, phys in extents_of(stat_text):
                if first <= lblk <= last:
                    f.seek((phys + lblk - first) * block + pos % block)
                    n = min(block - pos % block, offset + length - pos)
                    out += f.read(n)
                    pos += n
                    break
            else:
                raise AssertionError(f"logical block {lblk} not mapped")
    return bytes(out)


def acl_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    """A POSIX ACL in its xattr form: version 2 header, (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


# --- Trees ---------------------------------------------------------------------------------


def every_type_tree(tmp: Path) -> Tree:
    blob = tmp / "layer.tar"
    blob.write_bytes(b"HEADER" + os.urandom(70000) + b"TRAILER")
    tree = Tree(Node(NodeType.DIR, mode=0o755, mtime_ns=T0))
    d = Node(NodeType.DIR, mode=0o750, uid=70000, gid=80000, mtime_ns=T0 + 1)
    tree.add(b"/d", d)
    tree.add(
        b"/d/empty",
        Node(
            NodeType.FILE,
            mode=0o600,
            mtime_ns=-1_500_000_000_000_000_001,
            content=Content.from_bytes(b""),
        ),
    )
    tree.add(
        b"/d/from-layer",
        Node(
            NodeType.FILE,
            mode=0o644,
            mtime_ns=T0,
            content=Content(size=70000, path=str(blob), offset=6),
        ),
    )
    tree.add(b"/d/small", Node(NodeType.FILE, content=Content.from_bytes(b"hello\n"), mtime_ns=5))
    tree.add(b"/d/fast", Node(NodeType.SYMLINK, mode=0o777, target=b"small", mtime_ns=T0))
    tree.add(b"/d/slow", Node(NodeType.SYMLINK, mode=0o777, target=b"/x" * 100, mtime_ns=T0))
    tree.add(b"/d/edge59", Node(NodeType.SYMLINK, mode=0o777, target=b"y" * 59))
    tree.add(b"/d/edge60", Node(NodeType.SYMLINK, mode=0o777, target=b"z" * 60))
    tree.add(b"/d/null", Node(NodeType.CHAR, mode=0o666, rdev=(1, 3)))
    tree.add(b"/d/nvme", Node(NodeType.BLOCK, mode=0o660, gid=6, rdev=(259, 70000)))
    tree.add(b"/d/fifo", Node(NodeType.FIFO, mode=0o620))
    tree.add(b"/d/sock", Node(NodeType.SOCKET, mode=0o755))
    tree.add(b"/d/suid", Node(NodeType.FILE, mode=0o4755, content=Content.from_bytes(b"#!")))
    tree.add(b"/d/sgid", Node(NodeType.FILE, mode=0o2711, content=Content.from_bytes(b"#!")))
    tree.add(b"/d/sticky", Node(NodeType.DIR, mode=0o1777))
    tree.add(b"/d/\xff\xfe-not-utf8", Node(NodeType.FILE, content=Content.from_bytes(b"\0" * 5000)))
    return tree


def layered_tree(tmp: Path) -> Tree:
    """What a flattened distro image looks like: shared binaries, capabilities,
    ACLs, big xattrs, setuid helpers, a sticky /tmp."""
    tree = Tree(Node(NodeType.DIR, mode=0o755, mtime_ns=T0))
    tree.add(b"/usr/bin", Node(NodeType.DIR, mtime_ns=T0), make_dirs=Node(NodeType.DIR))
    coreutils = Node(
        NodeType.FILE, mode=0o755, mtime_ns=T0, content=Content.from_bytes(b"\x7fELF" * 3000)
    )
    for name in (b"ls", b"cat", b"cp", b"mv"):
        tree.add(b"/usr/bin/" + name, coreutils)
    cap = b"\x01\x00\x00\x02" + b"\x00\x20\x00\x00" * 4
    for name in (b"ping", b"arping", b"clockdiff"):
        tree.add(
            b"/usr/bin/" + name,
            Node(
                NodeType.FILE,
                mode=0o755,
                content=Content.from_bytes(name * 100),
                xattrs={b"security.capability": cap},
            ),
        )
    big = {b"user.k%02d" % i: bytes([i]) * 120 for i in range(8)}
    big[b"trusted.overlay.opaque"] = b"y"
    for i in range(3):  # identical big xattr sets share one block
        tree.add(
            b"/srv/shared%d" % i,
            Node(NodeType.FILE, xattrs=dict(big), content=Content.from_bytes(b"%d" % i)),
            make_dirs=Node(NodeType.DIR),
        )
    tree.add(
        b"/srv/acl",
        Node(
            NodeType.DIR,
            mode=0o770,
            xattrs={
                b"system.posix_acl_access": acl_xattr(
                    [
                        (1, 7, 0xFFFFFFFF),
                        (2, 5, 1000),
                        (4, 5, 0xFFFFFFFF),
                        (0x10, 7, 0xFFFFFFFF),
                        (0x20, 0, 0xFFFFFFFF),
                    ]
                ),
            },
        ),
    )
    tree.add(b"/usr/bin/sudo", Node(NodeType.FILE, mode=0o4755, content=Content.from_bytes(b"s")))
    tree.add(
        b"/usr/bin/wall", Node(NodeType.FILE, mode=0o2755, gid=5, content=Content.from_bytes(b"w"))
    )
    tree.add(b"/tmp", Node(NodeType.DIR, mode=0o1777, mtime_ns=T0))
    tree.add(b"/var/tmp", Node(NodeType.DIR, mode=0o1777), make_dirs=Node(NodeType.DIR))
    tree.add(
        b"/etc/shadow",
        Node(NodeType.FILE, mode=0o640, gid=42, content=Content.from_bytes(b"root:*:\n")),
        make_dirs=Node(NodeType.DIR),
    )
    tree.add(
        b"/usr/lib/libc.so.6",
        Node(NodeType.FILE, content=Content.from_bytes(bytes(range(256)) * 1200)),
        make_dirs=Node(NodeType.DIR),
    )
    tree.add(b"/usr/lib/libc.so", Node(NodeType.SYMLINK, target=b"libc.so.6"))
    return tree


# --- Tests ---------------------------------------------------------------------------------


def test_every_file_type(tmp_path: Path) -> None:
    tree = every_type_tree(tmp_path)
    img = write_image(tree, tmp_path / "img", headroom=MiB, seed=b"t")
    stats = check_image(tree, img, tmp_path)
    assert "Fast link dest" in stats[b"/d/edge59"].text
    assert "Fast link dest" not in stats[b"/d/edge60"].text
    assert "(New-style)" in stats[b"/d/nvme"].text


def test_layered_tree_with_hardlinks_xattrs_and_special_bits(tmp_path: Path) -> None:
    tree = layered_tree(tmp_path)
    img = write_image(tree, tmp_path / "img", headroom=MiB)
    stats = check_image(tree, img, tmp_path)
    assert stats[b"/usr/bin/ls"].links == 4
    blocks = {xattr_block(stats[b"/srv/shared%d" % i]) for i in range(3)}
    assert len(blocks) == 1 and blocks != {0}, "identical xattr blocks should be shared"
    assert xattr_block(stats[b"/usr/bin/ping"]) == 0, "small xattrs stay in the inode"


def test_hardlinks_wherever_their_names_fall(tmp_path: Path) -> None:
    """A directory's entries find their inodes by walking its run of new inodes again:
    names of one node in the same directory, across directories in either order, in a
    hashed directory and in the tree's own lost+found all name that node's one inode."""
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    shared = Node(NodeType.FILE, mtime_ns=T0, content=Content.from_bytes(b"shared\n"))
    lone = Node(NodeType.FILE, mtime_ns=T0, content=Content.from_bytes(b"lone\n"))
    dirs = Node(NodeType.DIR, mtime_ns=T0)
    for path in (b"/a/x", b"/a/y", b"/b/first", b"/lost+found/kept", b"/z"):
        tree.add(path, shared, make_dirs=dirs)
    tree.add(b"/a/lone", lone)
    for i in range(400):  # more than one block: hash-indexed
        tree.add(b"/big/name-%04d" % i, shared if i % 100 == 0 else lone, make_dirs=dirs)
    img = write_image(tree, tmp_path / "img", headroom=MiB)
    stats = check_image(tree, img, tmp_path)
    assert stats[b"/z"].links == 9
    assert stats[b"/big/name-0001"].links == 397
    assert stats[b"/big"].flags & 0x1000  # EXT4_INDEX_FL


def test_error_names_the_first_path(tmp_path: Path) -> None:
    tree = Tree()
    bad = Node(NodeType.FILE, uid=1 << 32)
    tree.add(b"/b/c/bad", bad, make_dirs=Node(NodeType.DIR))
    tree.add(b"/a/later", bad, make_dirs=Node(NodeType.DIR))  # numbered first: /a is first
    with pytest.raises(WriterError, match=r"^/a/later: uid/gid"):
        write_image(tree, tmp_path / "img")


@pytest.mark.slow
def test_100k_entry_directory_uses_htree(tmp_path: Path) -> None:
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    big = Node(NodeType.DIR, mtime_ns=T0)
    tree.add(b"/big", big)
    assert big.children is not None
    empty = Content(size=0)
    for i in range(100_000):
        big.children[b"entry-%06d.conf" % i] = Node(NodeType.FILE, content=empty)
    img = write_image(tree, tmp_path / "img", headroom=0, journal=False)
    out = fsck(img)
    assert "100012/" in out  # 100000 files, the directory, root and the 10 reserved inodes
    # 28-byte entries, 145 per leaf: about 690 leaves, more than the dx_root's 507.
    assert "Indirect levels: 1" in debugfs(img, ["htree /big"])
    names = debugfs(img, ["ls /big"]).split()
    assert sum(1 for n in names if n.startswith("entry-")) == 100_000
    stats = stat_paths(img, [b"/big", b"/big/entry-000000.conf", b"/big/entry-099999.conf"])
    assert stats[b"/big"].flags & 0x1000  # EXT4_INDEX_FL


@pytest.mark.slow
def test_255_byte_names_two_level_htree(tmp_path: Path) -> None:
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    d = Node(NodeType.DIR, mtime_ns=T0)
    tree.add(b"/long", d)
    assert d.children is not None
    for i in range(8000):  # 15 such entries per leaf: more leaves than one dx_root indexes
        name = (b"%05d-" % i) + bytes([0x61 + i % 26, 0xE9]) * 124  # non-ASCII bytes too
        assert len(name) == 254
        d.children[name + b"x"] = Node(NodeType.FILE, content=Content.from_bytes(b"%d" % i))
    img = write_image(tree, tmp_path / "img", headroom=0)
    fsck(img)
    assert "Indirect levels: 1" in debugfs(img, ["htree /long"])
    # Every name and content back (a stat per name would make debugfs scan 8000 entries each).
    out = tmp_path / "out"
    out.mkdir()
    debugfs(img, [f"rdump / {out}"])
    (out / "lost+found").rmdir()
    problems = compare_tree_with_dir(
        tree, ContentReader(), str(out), Checks(xattrs=False, hardlinks=False)
    )
    assert problems == []


def test_5gib_sparse_file(tmp_path: Path) -> None:
    src = tmp_path / "layer"
    # 129 MiB of stored data (more than one 32768-block extent) plus a few bytes near the end.
    with open(src, "wb") as f:
        f.write(b"START")
        f.truncate(129 * MiB)
        f.seek(129 * MiB - 3)
        f.write(b"END")
        f.write(b"tail-bytes")
    runs = (Extent(0, 129 * MiB), Extent(5 * GiB - 100, 10))
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    tree.add(
        b"/disk.img",
        Node(
            NodeType.FILE, mtime_ns=T0, content=Content(size=5 * GiB, path=str(src), extents=runs)
        ),
    )
    img = write_image(tree, tmp_path / "img", headroom=0, journal=False)
    stats = check_image(tree, img, tmp_path, rdump=False)
    st = stats[b"/disk.img"]
    assert st.size == 5 * GiB
    assert img.stat().st_size < 140 * MiB
    ext = extents_of(st.text)
    assert ext[0][:2] == (0, 32767) and ext[1][:2] == (32768, 33023)
    assert ext[-1][0] == (5 * GiB - 100) // 4096
    assert read_logical(img, st.text, 0, 5) == b"START"
    assert read_logical(img, st.text, 129 * MiB - 3, 3) == b"END"
    assert read_logical(img, st.text, 5 * GiB - 100, 10) == b"tail-bytes"
    assert "large_file" in superblock_field(img, "Filesystem features")


@pytest.mark.parametrize("runs", [200, 1500])
def test_fragmented_sparse_file(tmp_path: Path, runs: int) -> None:
    stride = 3 * 4096  # data, hole, hole: every run is its own extent
    data = b"".join(bytes([i % 251]) * 5000 for i in range(runs))
    extents = tuple(Extent(i * stride + 100, 5000) for i in range(runs))
    tree = Tree(Node(NodeType.DIR))
    tree.add(
        b"/frag",
        Node(NodeType.FILE, content=Content(size=runs * stride, data=data, extents=extents)),
    )
    img = write_image(tree, tmp_path / "img", headroom=0)
    stats = check_image(tree, img, tmp_path)
    st = stats[b"/frag"]
    # Each run spans two blocks (offset 100 + 5000 bytes): 200 extents need index blocks.
    assert len(extents_of(st.text)) == runs
    levels = debugfs(img, ["dump_extents /frag"])
    depth = max(int(m) for m in re.findall(r"^\s*(\d+)/", levels, re.M))
    assert depth == (1 if runs == 200 else 2)


def test_deep_tree(tmp_path: Path) -> None:
    tree = Tree(Node(NodeType.DIR))
    path = b""
    for i in range(200):
        path += b"/d%d" % i
        tree.add(path, Node(NodeType.DIR, mode=0o700 + i % 8, mtime_ns=T0 + i))
    tree.add(path + b"/leaf", Node(NodeType.FILE, content=Content.from_bytes(b"deep")))
    img = write_image(tree, tmp_path / "img", headroom=0)
    check_image(tree, img, tmp_path, rdump=False)
    assert "deep" in debugfs(img, ["cat " + os.fsdecode(path + b"/leaf")])


@pytest.mark.parametrize("journal", [True, False])
def test_journal_option(tmp_path: Path, journal: bool) -> None:
    tree = every_type_tree(tmp_path)
    img = write_image(tree, tmp_path / "img", journal=journal, headroom=4 * MiB)
    check_image(tree, img, tmp_path, rdump=False)
    features = superblock_field(img, "Filesystem features")
    assert ("has_journal" in features) is journal
    assert "metadata_csum" in features
    if journal:
        assert superblock_field(img, "Journal inode") == "8"
        assert superblock_field(img, "Total journal blocks") == "1024"
        assert superblock_field(img, "Journal start") == "0"  # clean, nothing to replay


def test_reproducible(tmp_path: Path) -> None:
    a = write_image(layered_tree(tmp_path), tmp_path / "a", seed=b"sha256:abc", headroom=MiB)
    b = write_image(layered_tree(tmp_path), tmp_path / "b", seed=b"sha256:abc", headroom=MiB)
    c = write_image(layered_tree(tmp_path), tmp_path / "c", seed=b"sha256:def", headroom=MiB)
    assert sha256_file(a) == sha256_file(b)
    assert superblock_field(a, "Filesystem UUID") != superblock_field(c, "Filesystem UUID")
    # Without a seed, identity derives from the tree: still reproducible.
    d = write_image(layered_tree(tmp_path), tmp_path / "d", headroom=MiB)
    e = write_image(layered_tree(tmp_path), tmp_path / "e", headroom=MiB)
    assert sha256_file(d) == sha256_file(e)
    created = superblock_field(a, "Filesystem created")
    assert "2023" in created  # the tree's newest mtime, not the clock


def test_exact_size_and_too_small(tmp_path: Path) -> None:
    tree = layered_tree(tmp_path)
    img = write_image(tree, tmp_path / "exact", size=64 * MiB + 1000, label="rootfs")
    assert img.stat().st_size == 64 * MiB + 1000
    fsck(img)
    assert superblock_field(img, "Block count") == str(64 * MiB // 4096)
    assert superblock_field(img, "Filesystem volume name") == "rootfs"

    small = tmp_path / "small"
    with pytest.raises(
        WriterError, match=r"image too small: needs \d+ bytes, --size gives 1000000"
    ):
        write_image(tree, small, size=1_000_000)
    assert small.stat().st_size == 0  # nothing written
    needed = int(re.search(r"needs (\d+)", str(_error(tree, tmp_path))).group(1))  # type: ignore[union-attr]
    fsck(write_image(tree, tmp_path / "just", size=needed))


def _error(tree: Tree, tmp_path: Path) -> WriterError:
    try:
        write_image(tree, tmp_path / "err", size=4096)
    except WriterError as e:
        return e
    raise AssertionError("no error")


def test_automatic_size_bound(tmp_path: Path) -> None:
    tree = Tree(Node(NodeType.DIR))
    content = 0
    for i in range(400):
        size = (i * 7919) % 150_000 + 1
        content += size
        tree.add(
            b"/data/dir%02d/file%04d" % (i % 20, i),
            Node(NodeType.FILE, content=Content.from_bytes(bytes([i % 256]) * size)),
            make_dirs=Node(NodeType.DIR),
        )
    headroom = 32 * MiB
    img = write_image(tree, tmp_path / "img", headroom=headroom)
    check_image(tree, img, tmp_path)
    size = img.stat().st_size
    assert size - headroom <= 1.10 * content + 8 * MiB
    free = int(superblock_field(img, "Free blocks")) * 4096
    assert free >= headroom


def test_extra_inodes(tmp_path: Path) -> None:
    tree = every_type_tree(tmp_path)
    img = write_image(tree, tmp_path / "img", headroom=0, extra_inodes=50_000)
    fsck(img)
    assert int(superblock_field(img, "Free inodes")) >= 50_000


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (Node(NodeType.FILE, xattrs={b"bogus.x": b"1"}), "unsupported namespace"),
        (Node(NodeType.SYMLINK, target=b""), "symlink target"),
        (Node(NodeType.FILE, uid=1 << 32), "does not fit in 32 bits"),
        (Node(NodeType.FILE, xattrs={b"user.x": b"v" * 5000}), "do not fit"),
    ],
)
def test_unrepresentable_nodes(tmp_path: Path, node: Node, message: str) -> None:
    tree = Tree()
    tree.add(b"/bad", node)
    with pytest.raises(WriterError, match=message):
        write_image(tree, tmp_path / "img")


def test_label_too_long(tmp_path: Path) -> None:
    with pytest.raises(WriterError, match="longer than 16 bytes"):
        write_image(Tree(), tmp_path / "img", label="x" * 17)


def _host_kernel() -> tuple[str, str] | None:
    """A bootable kernel and initramfs of this host (Debian's carry ext4 and virtio_blk)."""
    for kernel in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        initrd = kernel.with_name(kernel.name.replace("vmlinuz-", "initrd.img-"))
        if os.access(kernel, os.R_OK) and initrd.exists():
            return str(kernel), str(initrd)
    return None


BOOT_SCRIPT = b"""#!/bin/busybox sh
B=/bin/busybox
echo MARK-BEGIN
$B cat /big/name-01234 /big/name-19999 /long/$($B ls /long | $B head -n 4000 | $B tail -n 1)
$B ls /big | $B wc -l
$B stat -c 'stat %n %a %u %g %h' /suid /hl1
$B dd if=/sparse bs=1 skip=4294967296 count=5 2>/dev/null; echo
echo new > /big/created && $B rm /big/name-00007 && $B mkdir /long/newdir && $B sync
$B mount -o remount,ro / && echo MARK-END
$B poweroff -f
"""


@pytest.mark.boot
@pytest.mark.slow
def test_linux_mounts_reads_and_writes_the_image(tmp_path: Path) -> None:
    """The guest kernel as the oracle: boot the host's kernel with the image as root,
    look names up through the htrees, read data, write, then e2fsck what it left."""
    host = _host_kernel()
    busybox = shutil.which("busybox")
    if host is None or busybox is None or shutil.which("qemu-system-x86_64") is None:
        pytest.fail("needs a host kernel with initrd, busybox and qemu: run the README set-up")
    tree = Tree(Node(NodeType.DIR, mtime_ns=T0))
    tree.add(
        b"/bin/busybox",
        Node(NodeType.FILE, content=Content(size=os.path.getsize(busybox), path=busybox)),
        make_dirs=Node(NodeType.DIR),
    )
    tree.add(b"/check", Node(NodeType.FILE, content=Content.from_bytes(BOOT_SCRIPT)))
    for d in (b"/proc", b"/dev", b"/sys"):
        tree.add(d, Node(NodeType.DIR))
    cap = {b"security.capability": b"\x01\x00\x00\x02" + bytes(16), b"user.big": b"v" * 300}
    tree.add(
        b"/suid",
        Node(NodeType.FILE, mode=0o4755, uid=100000, gid=200000, xattrs=cap),
    )
    hl = Node(NodeType.FILE, content=Content.from_bytes(b"hl\n"))
    tree.add(b"/hl1", hl)
    tree.add(b"/hl2", hl)
    tree.add(
        b"/sparse",
        Node(
            NodeType.FILE,
            content=Content(size=5 * GiB, data=b"HELLO", extents=(Extent(4 * GiB, 5),)),
        ),
    )
    big = Node(NodeType.DIR)
    tree.add(b"/big", big)
    long_names = Node(NodeType.DIR)
    tree.add(b"/long", long_names)
    assert big.children is not None and long_names.children is not None
    for i in range(20_000):
        big.children[b"name-%05d" % i] = Node(
            NodeType.FILE, content=Content.from_bytes(b"%d\n" % i)
        )
    for i in range(8000):
        name = (b"%05d-" % i) + b"L" * 249
        long_names.children[name] = Node(NodeType.FILE, content=Content.from_bytes(b"L%d\n" % i))
    img = write_image(tree, tmp_path / "img", headroom=16 * MiB, seed=b"boot")
    fsck(img)
    kernel, initrd = host
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "512", "-nographic",
        "-no-reboot", "-kernel", kernel, "-initrd", initrd,
        "-append", "console=ttyS0 root=/dev/vda rootfstype=ext4 rw init=/check quiet",
        "-drive", f"file={img},if=virtio,format=raw",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=300)
    console = proc.stdout.decode(errors="replace")
    assert "MARK-BEGIN" in console, console[-3000:]
    out = console.split("MARK-BEGIN", 1)[1].split("MARK-END", 1)[0].replace("\r", "")
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert lines[:3] == ["1234", "19999", "L3999"], out
    assert "20000" in lines
    assert "stat /suid 4755 100000 200000 1" in lines
    assert "stat /hl1 755 0 0 2" in lines
    assert "HELLO" in lines
    assert "EXT4-fs error" not in console
    assert "MARK-END" in console, console[-3000:]
    fsck(img)  # what the kernel wrote into our structures is consistent
    assert "new" in debugfs(img, ["cat /big/created"])
