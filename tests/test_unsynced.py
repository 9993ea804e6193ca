"""Cache entries committed without fsync (image/unsynced.py): marked with the boot that wrote
them, trusted in that boot, and checked again in any other (the machine crashed, say: its
bytes may never have reached the disk)."""

from __future__ import annotations

import errno
import gzip
import io
import os
import random
from pathlib import Path

import pytest

from tests import layerkit as L
from tests.hostile.cli import run_vmimg
from tests.test_quick import CLICK_IMPORTED, IMPORT_LOG, _copy_layout
from vmimg import netstrings
from vmimg.digest import digest_bytes
from vmimg.image import unsynced
from vmimg.image.cache import Cache
from vmimg.image.layers import load_entries, unpack_layer_to_cache
from vmimg.image.oci import Descriptor
from vmimg.image.ocilayout import LAYER_MEDIA_TYPES
from vmimg.rootfs.handout import SEAL_MAGIC, SEAL_RECORD, entry_untouched

OTHER_BOOT = b"00000000-0000-4000-8000-000000000000"  # never a real boot's id


def _layer(count: int = 30) -> tuple[bytes, bytes, Descriptor]:
    """A gzip layer of `count` random files: its tar, its blob and the blob's descriptor."""
    tar = L.layer(*(L.file(f"f{i}", random.randbytes(5000)) for i in range(count)))
    blob = gzip.compress(tar, compresslevel=1)
    return tar, blob, Descriptor(LAYER_MEDIA_TYPES["gzip"], digest_bytes(blob), len(blob))


def _as_after_a_crash(path: Path | str, damage: bool = False) -> None:
    """Make the entry at `path` look written in another boot; with `damage`, its bytes
    zeroed too (`_zero`)."""
    os.setxattr(path, unsynced.MARK, OTHER_BOOT)
    if damage:
        _zero(path)


def _zero(path: Path | str) -> None:
    """Zero a file's bytes, as a crash leaves blocks that were allocated but never written."""
    size = os.path.getsize(path)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(bytes(size))


# -- marks -----------------------------------------------------------------------------------


def test_a_marked_entry_is_trusted_in_this_boot_only(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.write_bytes(b"")
    assert unsynced.trusted(str(entry))  # no mark: committed durably
    assert unsynced.mark(str(entry))
    assert os.getxattr(entry, unsynced.MARK) == unsynced.boot_id()
    assert unsynced.trusted(str(entry))
    _as_after_a_crash(entry)
    assert not unsynced.trusted(str(entry))
    entry.write_bytes(b"whole")
    unsynced.settle(str(entry))
    assert unsynced.trusted(str(entry)) and os.listxattr(entry) == []
    unsynced.settle(str(entry))  # no mark left: nothing to do


def test_a_directory_entry_is_marked_too(tmp_path: Path) -> None:
    assert unsynced.mark(str(tmp_path))
    assert unsynced.trusted(str(tmp_path))


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00" * 36, (unsynced.boot_id() or b"") + b"\n", b"x" * 3000, b"\xff\xfe"],
    ids=["empty", "zeros", "with-newline", "long", "not-text"],
)
def test_a_hostile_mark_is_never_trusted(tmp_path: Path, value: bytes) -> None:
    entry = tmp_path / "entry"
    entry.write_bytes(b"")
    os.setxattr(entry, unsynced.MARK, value)
    assert not unsynced.trusted(str(entry))


def test_no_boot_id_means_no_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unsynced, "_boot", [None])
    entry = tmp_path / "entry"
    entry.write_bytes(b"")
    assert not unsynced.mark(str(entry))
    assert os.listxattr(entry) == []


def test_an_entry_the_kernel_will_not_mark_is_committed_durably() -> None:
    r, w = os.pipe()  # no xattrs on a pipe: the kernel refuses the mark
    try:
        assert not unsynced.mark(w)
    finally:
        os.close(r)
        os.close(w)


def test_a_vanished_entry_is_not_trusted(tmp_path: Path) -> None:
    assert not unsynced.trusted(str(tmp_path / "gone"))


# -- layers ----------------------------------------------------------------------------------


def test_a_layer_from_another_boot_is_hashed_again_and_kept_if_whole(tmp_path: Path) -> None:
    tar, blob, desc = _layer()
    first = unpack_layer_to_cache(
        Cache.open(str(tmp_path)), desc, digest_bytes(tar), lambda: io.BytesIO(blob)
    )
    assert os.getxattr(first.tar_path, unsynced.MARK) == unsynced.boot_id()
    inode = os.stat(first.tar_path).st_ino
    _as_after_a_crash(first.tar_path)

    def no_blob() -> io.BytesIO:
        raise AssertionError("a whole layer was unpacked again")

    again = unpack_layer_to_cache(Cache.open(str(tmp_path)), desc, digest_bytes(tar), no_blob)
    assert os.stat(again.tar_path).st_ino == inode  # the same file, now durable
    assert os.listxattr(again.tar_path) == []
    assert Path(again.tar_path).read_bytes() == tar


def test_a_whole_layer_that_cannot_be_settled_is_used_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashed whole, it is read; only its mark stays, to be checked again next time."""
    tar, blob, desc = _layer()
    first = unpack_layer_to_cache(
        Cache.open(str(tmp_path)), desc, digest_bytes(tar), lambda: io.BytesIO(blob)
    )
    _as_after_a_crash(first.tar_path)

    def refused(entry: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system", entry)

    monkeypatch.setattr(unsynced, "settle", refused)
    again = unpack_layer_to_cache(
        Cache.open(str(tmp_path)), desc, digest_bytes(tar), lambda: io.BytesIO(b"")
    )
    assert Path(again.tar_path).read_bytes() == tar
    assert os.getxattr(again.tar_path, unsynced.MARK) == OTHER_BOOT


def test_a_layer_from_another_boot_that_lost_its_bytes_is_unpacked_again(
    tmp_path: Path,
) -> None:
    tar, blob, desc = _layer()
    first = unpack_layer_to_cache(
        Cache.open(str(tmp_path)), desc, digest_bytes(tar), lambda: io.BytesIO(blob)
    )
    _as_after_a_crash(first.tar_path, damage=True)
    cache = Cache.open(str(tmp_path))
    again = unpack_layer_to_cache(cache, desc, digest_bytes(tar), lambda: io.BytesIO(blob))
    assert Path(again.tar_path).read_bytes() == tar
    assert os.getxattr(again.tar_path, unsynced.MARK) == unsynced.boot_id()
    assert [e.name for e in load_entries(again.tar_path, "again")] == [
        f"f{i}".encode() for i in range(30)
    ]
    assert os.listdir(cache.tmp_dir) == []  # the torn tar went with its discard


def test_without_a_boot_id_a_layer_is_committed_durably_and_unmarked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unsynced, "_boot", [None])
    tar, blob, desc = _layer()
    layer = unpack_layer_to_cache(
        Cache.open(str(tmp_path)), desc, digest_bytes(tar), lambda: io.BytesIO(blob)
    )
    assert os.listxattr(layer.tar_path) == []
    assert Path(layer.tar_path).read_bytes() == tar


# -- conversions -----------------------------------------------------------------------------


@pytest.fixture
def layout(sample_ref: str, tmp_path: Path) -> str:
    return _copy_layout(sample_ref, tmp_path / "layout")


def _rootfs(work: Path, ref: str, out: Path) -> tuple[str, bool]:
    """`vmimg rootfs` to erofs: (its stdout, whether the fast path served it)."""
    r = run_vmimg(work, "rootfs", ref, "--format", "erofs", "-o", str(out), env=IMPORT_LOG)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, CLICK_IMPORTED.search(r.stderr) is None


@pytest.mark.parametrize("damage", [False, True], ids=["whole", "zeroed"])
def test_a_conversion_from_another_boot_is_made_again(
    layout: str, tmp_path: Path, damage: bool
) -> None:
    """Neither the fast path nor the full command hands it out: nothing tells a whole image
    from one a crash cut short, so it is discarded and converted again."""
    _rootfs(tmp_path, layout, tmp_path / "a.erofs")
    good = (tmp_path / "a.erofs").read_bytes()
    (entry,) = (tmp_path / "cache" / "outputs").iterdir()
    assert os.getxattr(entry, unsynced.MARK) == unsynced.boot_id()
    os.unlink(tmp_path / "a.erofs")  # else zeroing the entry would zero it too (a hardlink)
    os.setxattr(entry, unsynced.MARK, OTHER_BOOT)
    if damage:
        _zero(entry / "rootfs.erofs")
        seal = entry / SEAL_RECORD  # the seal saw the damage too: only the mark tells
        os.chmod(seal, 0o644)
        st = os.stat(entry / "rootfs.erofs")
        stamp = f"{st.st_size} {st.st_mtime_ns}"
        netstrings.write_file(str(seal), [SEAL_MAGIC, "rootfs.erofs", stamp])
        assert entry_untouched(str(entry))
    out, fast = _rootfs(tmp_path, layout, tmp_path / "b.erofs")
    assert not fast and "from cache" not in out
    assert (tmp_path / "b.erofs").read_bytes() == good
    (entry,) = (tmp_path / "cache" / "outputs").iterdir()
    assert os.getxattr(entry, unsynced.MARK) == unsynced.boot_id()
    out, fast = _rootfs(tmp_path, layout, tmp_path / "c.erofs")
    assert fast and out.strip().endswith("from cache (hardlink)")  # this boot's: trusted
