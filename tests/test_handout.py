"""Cache hits hand the cached image out without copying it: a hardlink to the read-only
cache entry for what nobody writes in place (erofs, a verity root, the kernel, the
manifest), a copy (or a reflink, where the file system has them) for a writable ext4 root;
and neither a later write to the output nor `cache prune` harms the other side."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.hostile.cli import run_vmimg
from tests.test_cache import mounted_tmpfs
from vmimg.bundle.format import KERNEL_FILE, MANIFEST_FILE, VM_JSON, load_bundle
from vmimg.guest.kernel import BZ_HEADER_MAGIC, BZ_HEADER_MAGIC_OFFSET
from vmimg.rootfs.handout import COPY, HARDLINK, REFLINK, hand_out

MIB = 1 << 20
XFS_SIZE = "512M"  # above mkfs.xfs's minimum
WRITE_BITS = 0o222


def _fake_bzimage(path: Path) -> str:
    """Bytes `vmimg build --kernel` takes for an x86 bzImage (never booted here)."""
    data = bytearray(MIB)
    data[BZ_HEADER_MAGIC_OFFSET : BZ_HEADER_MAGIC_OFFSET + len(BZ_HEADER_MAGIC)] = BZ_HEADER_MAGIC
    path.write_bytes(bytes(data))
    return str(path)


def _json(work: Path, *args: str) -> dict[str, object]:
    r = run_vmimg(work, *args, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def _entries(work: Path, name: str) -> list[Path]:
    return list((work / "cache" / "outputs").glob(f"*/{name}"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_warm_erofs_conversion_is_a_hardlink_to_the_read_only_entry(
    sample_ref: str, tmp_path: Path
) -> None:
    cold, warm = tmp_path / "cold.erofs", tmp_path / "warm.erofs"
    first = _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(cold))
    assert first["cached"] is False and first["handed_out"] is None
    second = _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(warm))
    assert second["cached"] is True and second["handed_out"] == HARDLINK
    [entry] = _entries(tmp_path, "rootfs.erofs")
    assert warm.stat().st_ino == entry.stat().st_ino and entry.stat().st_nlink >= 2
    assert stat.S_IMODE(entry.stat().st_mode) & WRITE_BITS == 0  # the entry invites no writes
    assert warm.read_bytes() == cold.read_bytes()
    # Again onto the same name (already a link to the entry): no temporary file left over.
    third = _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(warm))
    assert third["handed_out"] == HARDLINK
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    human = run_vmimg(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(warm))
    assert human.stdout.rstrip().endswith("from cache (hardlink)"), human.stdout


def test_a_cold_conversion_is_made_in_the_cache_and_handed_out_from_there(
    sample_ref: str, tmp_path: Path
) -> None:
    ro, rw = tmp_path / "cold.erofs", tmp_path / "cold.ext4"
    assert (
        _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(ro))["cached"] is False
    )
    [entry] = _entries(tmp_path, "rootfs.erofs")
    assert ro.stat().st_ino == entry.stat().st_ino  # the entry itself, under a second name
    _json(tmp_path, "rootfs", sample_ref, "--format", "ext4", "-o", str(rw))
    [entry] = _entries(tmp_path, "rootfs.ext4")
    assert rw.stat().st_ino != entry.stat().st_ino and rw.stat().st_mode & stat.S_IWUSR
    assert _sha(rw) == _sha(entry)
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    # Without the cache, straight to the destination: no entry, and the same bytes.
    direct = tmp_path / "direct.ext4"
    _json(tmp_path, "rootfs", sample_ref, "--format", "ext4", "-o", str(direct), "--no-cache")
    assert _sha(direct) == _sha(rw) and len(_entries(tmp_path, "rootfs.ext4")) == 1


@pytest.mark.slow
def test_a_warm_ext4_conversion_is_a_copy_the_user_may_write(
    sample_ref: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.ext4"
    _json(tmp_path, "rootfs", sample_ref, "--format", "ext4", "-o", str(out))
    warm = _json(tmp_path, "rootfs", sample_ref, "--format", "ext4", "-o", str(out))
    assert warm["handed_out"] == COPY  # ext4 here: no reflink, and no hardlink for ext4
    [entry] = _entries(tmp_path, "rootfs.ext4")
    before = _sha(entry)
    assert out.stat().st_ino != entry.stat().st_ino and out.stat().st_mode & stat.S_IWUSR
    with open(out, "r+b") as f:
        f.write(b"\xff" * 4096)
    assert _sha(entry) == before


def test_a_hardlink_across_file_systems_falls_back_to_a_copy(
    sample_ref: str, tmp_path: Path
) -> None:
    _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(tmp_path / "a.erofs"))
    [entry] = _entries(tmp_path, "rootfs.erofs")
    with mounted_tmpfs(tmp_path / "other", "16m") as other:
        dest = other / "b.erofs"
        assert hand_out(str(entry), str(dest), linkable=True) == COPY
        assert dest.read_bytes() == entry.read_bytes()
        assert stat.S_IMODE(dest.stat().st_mode) == 0o644
        assert os.listdir(other) == ["b.erofs"]


def _build(work: Path, sample_ref: str, out: Path, *extra: str) -> dict[str, object]:
    kernel = work / "bzImage"
    if not kernel.exists():
        _fake_bzimage(kernel)
    return _json(work, "build", sample_ref, "--kernel", str(kernel), "-o", str(out), *extra)


def test_a_warm_erofs_build_links_its_big_files_and_still_loads(
    sample_ref: str, tmp_path: Path
) -> None:
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    assert _build(tmp_path, sample_ref, cold)["handed_out"] is None
    result = _build(tmp_path, sample_ref, warm)
    assert result["cached"] is True and result["handed_out"] == HARDLINK
    [cached] = [p.parent for p in _entries(tmp_path, f"bundle/{VM_JSON}")]
    bundle = load_bundle(str(warm))  # every file checked against vm.json
    rootfs = bundle.vm.rootfs.file
    for name in (rootfs, KERNEL_FILE, MANIFEST_FILE):
        assert (warm / name).stat().st_ino == (cached / name).stat().st_ino, name
        assert (cached / name).stat().st_nlink >= 2
    # Small files users may edit are their own: vm.json, the launchers.
    assert (warm / VM_JSON).stat().st_ino != (cached / VM_JSON).stat().st_ino
    assert os.access(warm / "launch" / "qemu.sh", os.X_OK)
    for path in cold.rglob("*"):
        if path.is_file():
            assert (warm / path.relative_to(cold)).read_bytes() == path.read_bytes(), path


@pytest.mark.slow
def test_a_write_to_a_warm_ext4_bundle_leaves_the_cache_intact(
    sample_ref: str, tmp_path: Path
) -> None:
    out = tmp_path / "b"
    _build(tmp_path, sample_ref, out, "--fs", "ext4")
    result = _build(tmp_path, sample_ref, out, "--fs", "ext4")
    assert result["handed_out"] == COPY
    [cached] = [p.parent for p in _entries(tmp_path, f"bundle/{VM_JSON}")]
    assert (out / KERNEL_FILE).stat().st_ino == (cached / KERNEL_FILE).stat().st_ino
    before = _sha(cached / "rootfs.ext4")
    with open(out / "rootfs.ext4", "r+b") as f:  # what `vmimg run --persist` does
        f.seek(2 * MIB)
        f.write(b"\xff" * 4096)
    assert _sha(cached / "rootfs.ext4") == before
    load_bundle(str(cached))
    again = tmp_path / "again"
    _build(tmp_path, sample_ref, again, "--fs", "ext4")
    load_bundle(str(again))


def test_prune_leaves_hardlinked_outputs_whole_and_counts_only_what_it_frees(
    sample_ref: str, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.erofs", tmp_path / "b.erofs"
    _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(a))
    _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(b))
    data = a.read_bytes()
    freed = _json(tmp_path, "cache", "prune")
    assert _entries(tmp_path, "rootfs.erofs") == []
    assert a.read_bytes() == data and b.read_bytes() == data and a.stat().st_nlink == 2
    # The entry's blocks stay in use by the outputs: prune does not claim them.
    assert isinstance(freed["bytes"], int) and freed["bytes"] < len(data)


@contextlib.contextmanager
def mounted_xfs(work: Path) -> Iterator[Path]:
    """A loop-mounted XFS with reflink on (a file system that clones files), unmounted after."""
    image, mnt = work / "xfs.img", work / "xfs"
    subprocess.run(["truncate", "-s", XFS_SIZE, str(image)], check=True)
    subprocess.run([need("mkfs.xfs"), "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.slow
def test_where_the_file_system_clones_files_a_warm_hit_is_a_reflink(
    sample_ref: str, tmp_path: Path
) -> None:
    with mounted_xfs(tmp_path) as work:
        for fmt in ("erofs", "ext4"):  # a clone is the user's own: no need for a hardlink
            a, b = work / f"a.{fmt}", work / f"b.{fmt}"
            _json(work, "rootfs", sample_ref, "--format", fmt, "-o", str(a))
            assert (
                _json(work, "rootfs", sample_ref, "--format", fmt, "-o", str(b))["handed_out"]
                == REFLINK
            )
            [entry] = _entries(work, f"rootfs.{fmt}")
            assert b.stat().st_ino != entry.stat().st_ino and b.read_bytes() == a.read_bytes()
            before = _sha(entry)
            with open(b, "r+b") as f:
                f.write(b"\xff" * 4096)
            assert _sha(entry) == before
        out = work / "bundle"
        _build(work, sample_ref, out, "--fs", "ext4")
        assert _build(work, sample_ref, out, "--fs", "ext4")["handed_out"] == REFLINK
        load_bundle(str(out))


def test_a_hardlinked_output_written_in_place_by_root_is_not_handed_out_again(
    sample_ref: str, tmp_path: Path
) -> None:
    """Root may write to the 0444 output, which is the cache entry itself: the next build
    notices the changed entry, makes the image again and hands out the right bytes."""
    cold, warm, again = (tmp_path / f"{n}.erofs" for n in ("cold", "warm", "again"))
    _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(cold))
    assert (
        _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(warm))["handed_out"]
        == HARDLINK
    )
    good = _sha(cold)
    with open(warm, "r+b") as f:  # as root: the mode does not stop it
        f.seek(1024)
        f.write(b"damaged")
    [entry] = _entries(tmp_path, "rootfs.erofs")
    assert _sha(entry) != good  # the same inode: the cache entry changed too
    third = _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(again))
    assert third["cached"] is False
    assert _sha(again) == good
    [entry] = _entries(tmp_path, "rootfs.erofs")
    assert _sha(entry) == good
    fourth = _json(tmp_path, "rootfs", sample_ref, "--format", "erofs", "-o", str(again))
    assert fourth["cached"] is True and _sha(again) == good
