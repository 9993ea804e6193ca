"""tar and initramfs (newc cpio) writers, checked by extracting with GNU tar and cpio."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
import zstandard

from tests.conftest import need
from tests.test_flatten import LOWER, UPPER
from tests.treecheck import Checks, compare_tree_with_dir
from vmimg.image.layers import Extent, LayerFile
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.flatten import flatten
from vmimg.rootfs.tree import Content, Node, NodeType, Tree
from vmimg.rootfs.writers.cpio import CpioOptions, write_cpio
from vmimg.rootfs.writers.tar import TarOptions, write_tar


@pytest.fixture
def matrix(tmp_path: Path) -> Tree:
    paths = []
    for i, data in enumerate((LOWER, UPPER)):
        p = tmp_path / f"l{i}.tar"
        p.write_bytes(data)
        paths.append(LayerFile(str(p), f"l{i}"))
    return flatten(paths)


def write(tree: Tree, path: Path, fn, options) -> list[str]:  # type: ignore[no-untyped-def]
    with open(path, "wb") as f, ContentReader() as r:
        return fn(tree, r, f.fileno(), options)  # type: ignore[no-any-return]


def test_tar_round_trip_through_gnu_tar(matrix: Tree, tmp_path: Path) -> None:
    out = tmp_path / "root.tar"
    assert write(matrix, out, write_tar, TarOptions()) == []
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(
        [
            need("tar"),
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            str(out),
            "-C",
            str(dest),
        ],
        check=True,
    )
    with ContentReader() as r:
        assert compare_tree_with_dir(matrix, r, str(dest), Checks(mtime=True)) == []


def test_tar_is_deterministic(matrix: Tree, tmp_path: Path) -> None:
    write(matrix, tmp_path / "a.tar", write_tar, TarOptions())
    write(matrix, tmp_path / "b.tar", write_tar, TarOptions())
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_tar_sparse_file_keeps_holes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"A" * 4096 + b"B" * 10)
    tree = Tree()
    tree.add(
        b"/sparse",
        Node(
            NodeType.FILE,
            content=Content(
                size=1 << 30, path=str(data), extents=(Extent(0, 4096), Extent((1 << 30) - 10, 10))
            ),
        ),
    )
    out = tmp_path / "s.tar"
    write(tree, out, write_tar, TarOptions())
    assert out.stat().st_blocks * 512 < 1 << 20  # holes stay holes in the output file
    listing = subprocess.run(
        [need("tar"), "-tvf", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert str(1 << 30) in listing


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_initramfs_round_trip_through_cpio(matrix: Tree, tmp_path: Path, compression: str) -> None:
    out = tmp_path / "root.cpio"
    warnings = write(matrix, out, write_cpio, CpioOptions(compression=compression))
    assert any("xattrs are not stored" in w for w in warnings)
    raw = out.read_bytes()
    if compression == "gzip":
        raw = gzip.decompress(raw)
    elif compression == "zstd":
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(
        [need("cpio"), "-idmu", "--quiet", "--no-absolute-filenames"],
        input=raw,
        cwd=dest,
        check=True,
    )
    with ContentReader() as r:
        problems = compare_tree_with_dir(matrix, r, str(dest), Checks(xattrs=False))
    assert problems == []


def test_initramfs_is_deterministic(matrix: Tree, tmp_path: Path) -> None:
    write(matrix, tmp_path / "a", write_cpio, CpioOptions())
    write(matrix, tmp_path / "b", write_cpio, CpioOptions())
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_initramfs_with_a_file_named_like_the_trailer_keeps_what_follows(tmp_path: Path) -> None:
    """newc ends at the name TRAILER!!!: an image's /TRAILER!!! must not cut the archive
    short (the kernel would unpack nothing after it)."""
    tree = Tree()
    tree.add(b"/TRAILER!!!", Node(NodeType.DIR))
    tree.add(b"/zzz", Node(NodeType.SYMLINK, target=b"after-the-trailer-name"))
    out = tmp_path / "root.cpio"
    write(tree, out, write_cpio, CpioOptions(compression="none"))
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(
        [need("cpio"), "-idmu", "--quiet", "--no-absolute-filenames"],
        input=out.read_bytes(),
        cwd=dest,
        check=True,
    )
    assert (dest / "TRAILER!!!").is_dir()
    assert os.readlink(dest / "zzz") == "after-the-trailer-name"
