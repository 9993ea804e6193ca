"""dm-verity roots: `vmimg build` puts a hash tree over erofs roots (and ext4 with --verity),
the guest kernel checks every block it reads against the root hash vm.json pins, and
`vmimg verify` fails with "rootfs integrity" when any byte changed, also when the attacker
updated vm.json's file hash to match (tampering after the host-side check looks like that)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.boot.conftest import build, vmimg
from tests.conftest import need
from vmimg.bundle.format import read_vm_json
from vmimg.image.sample import APPLETS
from vmimg.rootfs.verity import BLOCK_SIZE

pytestmark = [pytest.mark.boot, pytest.mark.timeout(1200)]
ELF_MAGIC = b"\x7fELF"
EXIT_VERIFY_FAILED = 12


@pytest.fixture(scope="module")
def bundles(
    erofs_bundle: Path, sample_ref: str, kernel_file: str, cache_dir: Path, bundle_dir: Path
) -> dict[str, Path]:
    return {
        "erofs": erofs_bundle,
        "ext4": build(sample_ref, bundle_dir / "ext4", cache_dir, kernel_file, "--fs", "ext4",
                      "--verity"),
        "rw": build(sample_ref, bundle_dir / "rw", cache_dir, kernel_file, "--writable-root"),
    }  # fmt: skip


def test_verity_bundles_record_their_tree_and_veritysetup_agrees(
    bundles: dict[str, Path], sample_ref: str, kernel_file: str, cache_dir: Path, tmp_path: Path
) -> None:
    for fs in ("erofs", "ext4"):
        vm = read_vm_json(str(bundles[fs]))
        verity = vm.rootfs.verity
        assert verity is not None and vm.rootfs.read_only
        assert f"root=/dev/dm-0 ro rootfstype={fs}" in vm.cmdline
        assert verity.root_hash in vm.cmdline
        image = str(bundles[fs] / vm.rootfs.file)
        subprocess.run(
            [need("veritysetup"), "verify", "--no-superblock",
             f"--hash-offset={verity.hash_offset}", f"--data-blocks={verity.data_blocks}",
             f"--salt={verity.salt}", image, image, verity.root_hash],
            check=True,
        )  # fmt: skip
    # Byte-reproducible: built again without the cache, the same bytes.
    again = build(sample_ref, tmp_path / "again", cache_dir, kernel_file, "--no-cache")
    for name in ("vm.json", "rootfs.erofs"):
        assert (again / name).read_bytes() == (bundles["erofs"] / name).read_bytes(), name


def test_clean_verity_bundles_pass(bundles: dict[str, Path], cache_dir: Path) -> None:
    """Read-only roots through dm-verity, with the agent's overlay over them."""
    r = vmimg("verify", str(bundles["erofs"]), str(bundles["ext4"]), "--jobs", "1",
              cache=cache_dir)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def _block_of(data: bytes, needle: bytes, start: int = 0) -> int:
    at = data.index(needle, start)
    return at // BLOCK_SIZE


def _directory_needle() -> bytes:
    """Two neighbouring names of /bin, as erofs stores them: one after the other."""
    names = sorted(a.encode() for a in APPLETS)
    return names[len(names) // 2] + names[len(names) // 2 + 1]


def _tampered_offset(where: str, data: bytes, vm_doc: dict[str, object]) -> int:
    verity = vm_doc["rootfs"]["verity"]  # type: ignore[index]
    if where == "superblock":
        return 1024 + 8  # erofs's superblock starts at 1024: its checksum field and on
    if where == "file data":
        # /bin/busybox, which /bin/sh is: the second ELF in the image (the agent comes first).
        busybox = data.index(ELF_MAGIC, data.index(ELF_MAGIC) + 1)
        return busybox + 200
    if where == "directory":
        return _block_of(data, _directory_needle()) * BLOCK_SIZE + 16
    # The hash tree's lowest level (its last block): the top block, which the host checks
    # in O(1), is untouched, so only the guest kernel can notice.
    return int(verity["hash_offset"]) + int(verity["hash_blocks"]) * BLOCK_SIZE - 100  # type: ignore[index]


@pytest.mark.parametrize("where", ["superblock", "file data", "directory", "hash tree"])
def test_a_changed_byte_fails_with_rootfs_integrity(
    bundles: dict[str, Path], cache_dir: Path, tmp_path: Path, where: str
) -> None:
    bundle = tmp_path / "tampered"
    shutil.copytree(bundles["erofs"], bundle)
    vm_doc = json.loads((bundle / "vm.json").read_text())
    image = bundle / "rootfs.erofs"
    data = bytearray(image.read_bytes())
    offset = _tampered_offset(where, bytes(data), vm_doc)
    data[offset] ^= 0xFF
    image.write_bytes(data)
    # The attacker also fixed the file's hash in vm.json: only the pinned root hash holds.
    vm_doc["files"]["rootfs.erofs"]["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle / "vm.json").write_text(json.dumps(vm_doc, indent=2))
    r = vmimg("verify", str(bundle), cache=cache_dir)
    assert r.returncode == EXIT_VERIFY_FAILED, r.stdout + r.stderr
    assert f"rootfs integrity: {bundle}" in r.stdout, r.stdout


def test_the_top_of_the_tree_is_checked_on_the_host(
    bundles: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    """A changed top block of the tree no longer hashes to vm.json's root hash: refused
    before anything boots."""
    bundle = tmp_path / "top"
    shutil.copytree(bundles["erofs"], bundle)
    vm_doc = json.loads((bundle / "vm.json").read_text())
    image = bundle / "rootfs.erofs"
    data = bytearray(image.read_bytes())
    data[int(vm_doc["rootfs"]["verity"]["hash_offset"]) + 5] ^= 0xFF
    image.write_bytes(data)
    vm_doc["files"]["rootfs.erofs"]["sha256"] = hashlib.sha256(data).hexdigest()
    (bundle / "vm.json").write_text(json.dumps(vm_doc, indent=2))
    r = vmimg("verify", str(bundle), cache=cache_dir)
    assert r.returncode == EXIT_VERIFY_FAILED, r.stdout + r.stderr
    assert "stage files" in r.stdout and "does not match the root hash" in r.stdout


def test_read_write_ext4_bundles_are_unaffected(bundles: dict[str, Path], cache_dir: Path) -> None:
    vm = read_vm_json(str(bundles["rw"]))
    assert vm.rootfs.verity is None and "dm-mod.create" not in vm.cmdline
    assert "root=/dev/vda rw rootfstype=ext4" in vm.cmdline
    r = vmimg("verify", str(bundles["rw"]), cache=cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
