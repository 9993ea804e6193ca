"""vmimg.verity's hash trees, checked against veritysetup (cryptsetup) as the oracle, and
booted: dm-init maps an erofs root written by vmimg with its tree through dm-verity.

veritysetup must accept every tree we write (appended to the image, or in a file of its
own), and its own `format` with the same salt must give the same root hash and the same
bytes. The boot test reads a file through the verified root, then flips a byte of that
file's data block and sees the read fail in the guest.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import need
from vmimg.boot.launch import qemu_accel_args
from vmimg.errors import VerityError, WriterError
from vmimg.rootfs import verity
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Content, Node, NodeType, Tree
from vmimg.rootfs.verity import BLOCK_SIZE, OnCorruption, VerityTree
from vmimg.rootfs.writers.erofs import ErofsOptions, write_erofs
from vmimg.rootfs.writers.ext4 import Ext4Options, write_ext4

SALT = bytes.fromhex("5a" * 16 + "0123456789abcdef" * 2)
MiB = 1 << 20
HASHES = verity.HASHES_PER_BLOCK  # 128: where the tree grows a level
# Data blocks around the level boundaries: 1 (no level at all), 127 and 128 (one hash
# block), 129 (two levels), 128 * 128 + 1 (three levels).
VERIFY_MISMATCH = 2  # veritysetup's exit code when a block does not match
BOUNDARY_BLOCKS = [1, 2, HASHES - 1, HASHES, HASHES + 1, HASHES * HASHES + 1]


# --- oracle ---------------------------------------------------------------------------


def veritysetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("veritysetup"), *args], capture_output=True, text=True)


def tree_args(tree: VerityTree) -> list[str]:
    """What veritysetup needs to know about a superblock-less tree."""
    return [
        "--no-superblock",
        f"--format={tree.version}",
        f"--hash={tree.algorithm}",
        f"--data-block-size={tree.data_block_size}",
        f"--hash-block-size={tree.hash_block_size}",
        f"--data-blocks={tree.data_blocks}",
        f"--hash-offset={tree.hash_offset}",
        f"--salt={tree.salt}",
    ]


def verify(tree: VerityTree, data: Path, hash_file: Path | None = None) -> bool:
    hashes = str(hash_file or data)
    proc = veritysetup("verify", *tree_args(tree), str(data), hashes, tree.root_hash)
    if proc.returncode == 0:
        return True
    # A mismatch exits 2 ("no permission"); any other failure is a misuse of the oracle.
    if proc.returncode == VERIFY_MISMATCH and re.search(r"Verification.* failed", proc.stderr):
        return False
    pytest.fail(f"veritysetup verify exited {proc.returncode}: {proc.stderr}")


def oracle_format(data: Path, hash_file: Path, data_size: int, hash_offset: int) -> str:
    """veritysetup's own tree for `data`, with our parameters; returns its root hash."""
    proc = veritysetup(
        "format", "--no-superblock", "--format=1", "--hash=sha256",
        f"--data-block-size={BLOCK_SIZE}", f"--hash-block-size={BLOCK_SIZE}",
        f"--data-blocks={data_size // BLOCK_SIZE}",
        f"--salt={SALT.hex()}", f"--hash-offset={hash_offset}", str(data), str(hash_file),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"^Root hash:\s+([0-9a-f]+)$", proc.stdout, re.M)
    assert m, proc.stdout
    return m.group(1)


def check_against_oracle(image: Path, tmp_path: Path) -> VerityTree:
    """Append our tree to `image` and write it to a file of its own; veritysetup must
    accept both, and its own format must give the same root hash and bytes."""
    data_size = image.stat().st_size
    theirs = tmp_path / "theirs.img"
    shutil.copyfile(image, theirs)
    ours_hash, theirs_hash = tmp_path / "ours.hash", tmp_path / "theirs.hash"

    separate = verity.write_hash_tree(image, ours_hash, SALT)
    tree = verity.append_hash_tree(image, SALT)

    assert tree.root_hash == separate.root_hash
    assert (tree.hash_offset, separate.hash_offset) == (data_size, 0)
    assert image.stat().st_size == data_size + tree.hash_size
    assert ours_hash.stat().st_size == separate.hash_size == tree.hash_size
    assert verify(tree, image)
    assert verify(separate, image, ours_hash)

    assert oracle_format(theirs, theirs, data_size, data_size) == tree.root_hash
    assert theirs.read_bytes() == image.read_bytes()
    assert oracle_format(theirs, theirs_hash, data_size, 0) == tree.root_hash
    assert theirs_hash.read_bytes() == ours_hash.read_bytes()
    return tree


def random_image(path: Path, blocks: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(blocks * BLOCK_SIZE))
    return path


# --- the tree against veritysetup -----------------------------------------------------


@pytest.mark.parametrize("blocks", BOUNDARY_BLOCKS)
def test_veritysetup_accepts_our_tree_and_formats_the_same(tmp_path: Path, blocks: int) -> None:
    tree = check_against_oracle(random_image(tmp_path / "data.img", blocks, blocks), tmp_path)
    assert tree.data_blocks == blocks
    assert tree.hash_blocks == sum(verity.level_blocks(blocks))
    assert (tree.algorithm, tree.version, tree.salt) == ("sha256", 1, SALT.hex())


def test_level_counts_match_the_kernel_at_the_boundaries() -> None:
    assert verity.level_blocks(1) == []
    assert verity.level_blocks(HASHES - 1) == verity.level_blocks(HASHES) == [1]
    assert verity.level_blocks(HASHES + 1) == [2, 1]
    assert verity.level_blocks(HASHES * HASHES) == [HASHES, 1]
    assert verity.level_blocks(HASHES * HASHES + 1) == [HASHES + 1, 2, 1]


def _sparse_image(path: Path) -> Path:
    """Two chunks and a bit, mostly holes: some parts all zero, some with one byte set,
    the last part short."""
    part, chunk = verity.PART_BLOCKS, verity.CHUNK_BLOCKS
    blocks = 2 * chunk + part + 77
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(blocks * BLOCK_SIZE)
        for block in (0, part - 1, chunk + 2 * part + 5, 2 * chunk + part, blocks - 1):
            f.seek(block * BLOCK_SIZE + rng.randrange(BLOCK_SIZE))
            f.write(b"\x01")
    return path


def test_zero_runs_and_holes_hash_like_data(tmp_path: Path) -> None:
    """Parts of zero blocks take a shortcut: a sparse image with data scattered over
    part and chunk boundaries and unaligned zero runs must still match veritysetup."""
    check_against_oracle(_sparse_image(tmp_path / "sparse.img"), tmp_path)


def test_an_image_of_zeros_ending_in_a_short_part(tmp_path: Path) -> None:
    image = tmp_path / "zeros.img"
    image.write_bytes(bytes((verity.PART_BLOCKS + 44) * BLOCK_SIZE))
    check_against_oracle(image, tmp_path)


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_worker_threads_do_not_change_the_bytes(tmp_path: Path, workers: int) -> None:
    image = _sparse_image(tmp_path / "sparse.img")
    with open(image, "r+b") as f:  # and some random data, over more than one chunk
        f.write(random.Random(1).randbytes((verity.CHUNK_BLOCKS + 3) * BLOCK_SIZE))
    expected = verity.write_hash_tree(image, tmp_path / "one", SALT, workers=1)
    assert verity.write_hash_tree(image, tmp_path / "many", SALT, workers=workers) == expected
    assert (tmp_path / "many").read_bytes() == (tmp_path / "one").read_bytes()
    assert verify(expected, image, tmp_path / "many")


def _tiny_tree() -> Tree:
    tree = Tree(Node(NodeType.DIR, mode=0o755))
    tree.add(b"/etc", Node(NodeType.DIR, mode=0o755))
    tree.add(b"/etc/hostname", Node(NodeType.FILE, content=Content.from_bytes(b"verity\n")))
    blob = random.Random(3).randbytes(300_000)
    tree.add(b"/blob", Node(NodeType.FILE, content=Content.from_bytes(blob)))
    tree.add(b"/link", Node(NodeType.SYMLINK, mode=0o777, target=b"etc/hostname"))
    return tree


@pytest.mark.parametrize("fs", ["erofs", "ext4"])
def test_real_images_from_vmimg_writers(tmp_path: Path, fs: str) -> None:
    image = tmp_path / f"root.{fs}"
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with ContentReader() as reader:
            if fs == "erofs":
                write_erofs(_tiny_tree(), reader, fd, ErofsOptions())
            else:
                # Mostly free space: the zero-chunk shortcut does most of the work.
                write_ext4(_tiny_tree(), reader, fd, Ext4Options(headroom=32 * MiB))
    finally:
        os.close(fd)
    tree = check_against_oracle(image, tmp_path)
    assert tree.data_blocks * BLOCK_SIZE == tree.hash_offset


# --- tampering and reproducibility ----------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


# Offsets in a 129-block image's tree (two levels): the top block at the hash offset,
# then level 0's two blocks.
_TOP = HASHES + 1
_LEVEL0 = _TOP + 1


@pytest.mark.parametrize(
    ("what", "offset"),
    [
        ("first data byte", 0),
        ("last data byte", (HASHES + 1) * BLOCK_SIZE - 1),
        ("a digest in the top block", _TOP * BLOCK_SIZE + 5),
        ("the top block's zero padding", _TOP * BLOCK_SIZE + 3 * verity.DIGEST_SIZE),
        ("the last digest of level 0", _LEVEL0 * BLOCK_SIZE + HASHES * verity.DIGEST_SIZE),
        ("level 0's zero padding", (_LEVEL0 + 2) * BLOCK_SIZE - 1),
    ],
)
def test_one_flipped_byte_fails_verification(tmp_path: Path, what: str, offset: int) -> None:
    image = random_image(tmp_path / "data.img", HASHES + 1, 1)
    tree = verity.append_hash_tree(image, SALT)
    assert verify(tree, image)
    assert offset < image.stat().st_size
    _flip(image, offset)
    assert not verify(tree, image), f"veritysetup accepted a flipped byte in {what}"


def test_same_input_gives_the_same_bytes(tmp_path: Path) -> None:
    first = random_image(tmp_path / "a.img", 1000, 5)
    second = tmp_path / "b.img"
    shutil.copyfile(first, second)
    assert verity.append_hash_tree(first, SALT) == verity.append_hash_tree(second, SALT)
    assert first.read_bytes() == second.read_bytes()
    other_salt = verity.append_hash_tree(random_image(tmp_path / "c.img", 1000, 5), b"\0" * 32)
    assert other_salt.root_hash != verity.append_hash_tree(second, SALT).root_hash


# --- hostile input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (0, "is empty"),
        (1, "not a multiple of the 4096-byte verity block"),
        (BLOCK_SIZE - 1, "not a multiple"),
        (BLOCK_SIZE + 1, "is 4097 bytes, not a multiple"),
    ],
)
def test_image_sizes_that_cannot_be_verity_data(tmp_path: Path, size: int, message: str) -> None:
    image = tmp_path / "odd.img"
    image.write_bytes(b"\xaa" * size)
    with pytest.raises(VerityError, match=message):
        verity.append_hash_tree(image, SALT)
    with pytest.raises(VerityError, match=message):
        verity.write_hash_tree(image, tmp_path / "hash", SALT)
    assert image.read_bytes() == b"\xaa" * size  # untouched


@pytest.mark.parametrize(
    ("salt", "message"),
    [
        (b"", "must be 32 bytes, not 0"),
        (SALT[:-1], "must be 32 bytes, not 31"),
        (SALT + b"\0", "must be 32 bytes, not 33"),
        (SALT.hex(), "must be 32 bytes, not str"),
        (bytearray(SALT), "must be 32 bytes, not bytearray"),
        (None, "must be 32 bytes, not NoneType"),
    ],
)
def test_bad_salts_are_refused(tmp_path: Path, salt: object, message: str) -> None:
    image = random_image(tmp_path / "data.img", 3, 0)
    before = image.read_bytes()
    with pytest.raises(VerityError, match=message):
        verity.append_hash_tree(image, salt)  # type: ignore[arg-type]
    with pytest.raises(VerityError, match=message):
        verity.write_hash_tree(image, tmp_path / "hash", salt)  # type: ignore[arg-type]
    assert image.read_bytes() == before
    assert not (tmp_path / "hash").exists()


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2"])
def test_bad_worker_counts_are_refused(tmp_path: Path, workers: object) -> None:
    image = random_image(tmp_path / "data.img", 3, 0)
    with pytest.raises(VerityError, match="at least one worker thread"):
        verity.append_hash_tree(image, SALT, workers=workers)  # type: ignore[arg-type]
    assert image.stat().st_size == 3 * BLOCK_SIZE


def test_missing_image_a_directory_and_an_unwritable_hash_file(tmp_path: Path) -> None:
    with pytest.raises(VerityError, match=r"cannot open .*nothing\.img"):
        verity.append_hash_tree(tmp_path / "nothing.img", SALT)
    with pytest.raises(VerityError, match=r"cannot open .*: Is a directory"):
        verity.append_hash_tree(tmp_path, SALT)
    image = random_image(tmp_path / "data.img", 3, 0)
    with pytest.raises(VerityError, match=r"cannot open .*/no/such/dir"):
        verity.write_hash_tree(image, tmp_path / "no" / "such" / "dir", SALT)


def test_verity_error_is_a_writer_error() -> None:
    assert issubclass(VerityError, WriterError)
    assert VerityError.exit_code == WriterError.exit_code


# --- the kernel parameter ---------------------------------------------------------------

ROOT = "ab" * 32
TREE = VerityTree(
    root_hash=ROOT, salt=SALT.hex(), data_blocks=129, hash_offset=129 * BLOCK_SIZE, hash_blocks=3
)


def test_dm_mod_create_maps_the_root_device_read_only_as_dm_0() -> None:
    table = f"0 1032 verity 1 /dev/vda /dev/vda 4096 4096 129 129 sha256 {ROOT} {SALT.hex()}"
    assert TREE.kernel_args() == [f'dm-mod.create="vroot,,0,ro,{table}"', "root=/dev/dm-0"]
    assert TREE.table("/dev/vda") == table


def test_dm_mod_create_options() -> None:
    panic = TREE.table("/dev/vdb", on_corruption=OnCorruption.PANIC)
    assert panic.endswith(f"{SALT.hex()} 1 panic_on_corruption")
    restart = TREE.dm_create_param("/dev/vda", on_corruption=OnCorruption.RESTART)
    assert restart.endswith(' 1 restart_on_corruption"')
    separate = VerityTree(ROOT, SALT.hex(), 129, 0, 3).table("/dev/vda", "/dev/vdb")
    assert " /dev/vda /dev/vdb 4096 4096 129 0 sha256 " in separate


@pytest.mark.parametrize("device", ["", "/dev/vda,x", "/dev/v da", "/dev/vda;", '/dev/"vda'])
def test_devices_that_would_break_the_parameter_are_refused(device: str) -> None:
    with pytest.raises(VerityError, match=r"cannot go into dm-mod\.create="):
        TREE.kernel_args(device)
    with pytest.raises(VerityError, match=r"cannot go into dm-mod\.create="):
        TREE.table("/dev/vda", hash_device=device or ",")


# --- booting a verified root --------------------------------------------------------------

BUSYBOX = "/bin/busybox"
MARK = "VERITY-TEST"
BOOT_TIMEOUT = 300  # seconds: TCG on a shared, busy 2-core machine
INIT = f"""#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
read up idle < /proc/uptime
echo "{MARK} uptime=$up"
root=$($bb grep " / / " /proc/self/mountinfo | $bb cut -d" " -f3)
echo "{MARK} root=$root"
echo "{MARK} dm0=$($bb cat /sys/block/dm-0/dev 2>&1)"
echo "{MARK} dm-name=$($bb cat /sys/block/dm-0/dm/name 2>&1)"
err=$($bb cat /blob 2>&1 >/dev/null)
echo "{MARK} read rc=$? err=$err"
echo "{MARK} sha256=$($bb sha256sum /blob 2>/dev/null | $bb cut -c1-64)"
$bb dmesg | $bb grep -i verity
echo "{MARK} end"
$bb poweroff -f
"""
BLOB = random.Random(11).randbytes(16 * BLOCK_SIZE)


def _boot_tree() -> Tree:
    tree = Tree(Node(NodeType.DIR, mode=0o755))
    for d in (b"/bin", b"/dev", b"/proc", b"/sys"):
        tree.add(d, Node(NodeType.DIR, mode=0o755))
    size = os.path.getsize(BUSYBOX)
    tree.add(b"/bin/busybox", Node(NodeType.FILE, mode=0o755, content=Content(size, BUSYBOX)))
    tree.add(b"/init", Node(NodeType.FILE, mode=0o755, content=Content.from_bytes(INIT.encode())))
    tree.add(b"/blob", Node(NodeType.FILE, mode=0o644, content=Content.from_bytes(BLOB)))
    return tree


@dataclass
class GuestRun:
    console: str
    uptime: float  # guest seconds when /init ran
    wall: float  # host seconds from starting QEMU to its exit

    def field(self, name: str) -> str:
        m = re.search(rf"^{MARK} {name}=(.*?)\r?$", self.console, re.M)
        assert m, f"no {name} on the console:\n{self.console[-3000:]}"
        return m.group(1)


def _boot(kernel: Path, image: Path, root_args: list[str]) -> GuestRun:
    cmdline = ["console=ttyS0", "quiet", "panic=-1", *root_args, "ro", "rootfstype=erofs"]
    cmd = [
        "qemu-system-x86_64", "-M", "microvm", *qemu_accel_args("x86_64", "tcg"),
        "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
        "-append", " ".join([*cmdline, "init=/init"]),
        "-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, timeout=BOOT_TIMEOUT)
    wall = time.monotonic() - started
    console = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"qemu exited {proc.returncode}: {proc.stderr[-2000:]!r}"
    assert f"{MARK} end" in console, console[-3000:]
    run = GuestRun(console, 0.0, wall)
    run.uptime = float(run.field("uptime"))
    return run


@pytest.fixture(scope="module")
def verity_kernel() -> Path:
    """The x86_64 kernel of this checkout's fragments (built if not cached), as vmlinux."""
    from vmimg.guest import kernel as klib

    need("qemu-system-x86_64")
    built = klib.find_or_build_kernel("x86_64")
    assert built.config is not None and built.vmlinux is not None
    config = klib.parse_config(built.config.read_text())
    for option in ("CONFIG_BLK_DEV_DM", "CONFIG_DM_VERITY", "CONFIG_DM_INIT", "CONFIG_EROFS_FS"):
        assert config.get(option) == "y", f"kernel {built.key} lacks {option}"
    return built.vmlinux


@pytest.mark.boot
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_boot_erofs_root_through_dm_verity(tmp_path: Path, verity_kernel: Path) -> None:
    image = tmp_path / "root.erofs"
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with ContentReader() as reader:
            write_erofs(_boot_tree(), reader, fd, ErofsOptions())
    finally:
        os.close(fd)
    blob_at = image.read_bytes().find(BLOB)
    assert blob_at > 0 and blob_at % BLOCK_SIZE == 0, "the blob is not stored block-aligned"
    tree = verity.append_hash_tree(image, SALT)
    assert verify(tree, image)

    plain = _boot(verity_kernel, image, ["root=/dev/vda"])
    assert plain.field("read rc") == "0 err="
    assert plain.field("dm0").startswith("cat: can't open")  # no device-mapper device

    good = _boot(verity_kernel, image, tree.kernel_args())
    assert good.field("dm-name") == "vroot"
    assert good.field("root") == good.field("dm0")  # / is on /dev/dm-0
    assert good.field("read rc") == "0 err="
    assert good.field("sha256") == hashlib.sha256(BLOB).hexdigest()
    assert "corrupted" not in good.console

    # One flipped bit in the middle of the blob: the guest's read fails, the kernel says why.
    bad_block = blob_at // BLOCK_SIZE + len(BLOB) // BLOCK_SIZE // 2
    _flip(image, bad_block * BLOCK_SIZE + 100)
    bad = _boot(verity_kernel, image, tree.kernel_args())
    rc, _, err = bad.field("read rc").partition(" err=")
    assert rc != "0" and re.search(r"I/O error|Input/output error", err), bad.field("read rc")
    m = re.search(r"verity: \S+: data block (\d+) is corrupted", bad.console)
    assert m, bad.console[-3000:]
    assert int(m.group(1)) == bad_block
    assert bad.field("sha256") == ""

    print(
        f"\nerofs {tree.data_blocks} blocks: guest uptime at /init {plain.uptime:.2f} s "
        f"plain, {good.uptime:.2f} s verity; QEMU wall {plain.wall:.2f} s plain, "
        f"{good.wall:.2f} s verity"
    )
