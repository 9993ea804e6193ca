"""The guest kernel: fragment merging, the "option did not make it" check, the real
build (cached per machine) and real boots under QEMU microvm with TCG.

The slow tests build into the normal cache ($VMIMG_CACHE or ~/.cache/vmimg), so
the kernel is built once per machine and every later run reuses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmimg.arch import ARCHES
from vmimg.errors import KernelError
from vmimg.guest import kernel as klib

SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
BUILD_TIMEOUT = 1800
BOOT_TIMEOUT = 120
MAX_BZIMAGE = 4 * 1000 * 1000  # "under 4 MB"
# Guest uptime when /init runs, under TCG. The goal is 0.6 s (measured ~0.35 s on an idle
# host); guest time under TCG stretches with host load, so the test holds a looser bound.
TARGET_UPTIME_AT_INIT = 0.6
MAX_UPTIME_AT_INIT = 3.0
MARKER = "VMIMG-KERNEL-TEST"
# The `kernel` click group run on its own, as the lead's main CLI will mount it.
CLI = [sys.executable, "-c", "from vmimg.cli.kernel import kernel; kernel()"]
MARKER_RE = re.compile(MARKER + r" (\S+) uptime=([0-9.]+)")


@pytest.fixture
def _require_source() -> None:
    if not SOURCE.exists():
        pytest.fail(f"{SOURCE} not installed: run the README set-up")


@pytest.fixture
def _require_boot() -> None:
    if shutil.which(QEMU) is None or not BUSYBOX.exists() or shutil.which("cpio") is None:
        pytest.fail("qemu-system-x86_64, busybox-static and cpio are needed: run the set-up")


# The README set-up installs all of these: their absence is a failure, not a skip.
need_source = pytest.mark.usefixtures("_require_source")
need_boot = pytest.mark.usefixtures("_require_boot")


# -- fragments and the check ----------------------------------------------------------


def test_parse_config_reads_set_and_unset_lines() -> None:
    text = '# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="text"\nCONFIG_D=64\n'
    assert klib.parse_config(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": klib.UNSET,
        "CONFIG_C": '"text"',
        "CONFIG_D": "64",
    }


def test_parse_config_names_the_bad_line() -> None:
    with pytest.raises(KernelError, match=r"frag.config:2: not a config line"):
        klib.parse_config("CONFIG_A=y\nCONFIG_B y\n", "frag.config")


def test_later_fragment_overrides_earlier_one() -> None:
    merged = klib.merge_fragments(
        [
            ("common.config", "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"),
            ("debug.config", "# CONFIG_B is not set\nCONFIG_C=y\n"),
        ]
    )
    assert merged == {"CONFIG_A": "y", "CONFIG_B": klib.UNSET, "CONFIG_C": "y"}
    # Rendering and parsing again gives the same options (what KCONFIG_ALLCONFIG reads).
    assert klib.parse_config(klib.render_fragment(merged)) == merged


def test_check_config_finds_every_option_that_did_not_make_it() -> None:
    requested = {"CONFIG_A": "y", "CONFIG_B": klib.UNSET, "CONFIG_C": "y", "CONFIG_D": "1"}
    final = klib.parse_config("CONFIG_A=y\nCONFIG_B=y\nCONFIG_D=2\n")
    bad = klib.check_config(requested, final)
    assert [(m.option, m.wanted, m.got) for m in bad] == [
        ("CONFIG_B", "n", "y"),
        ("CONFIG_C", "y", "n"),
        ("CONFIG_D", "1", "2"),
    ]
    with pytest.raises(KernelError, match=r"3 requested option.*CONFIG_B.*CONFIG_C.*CONFIG_D"):
        klib.require_config(requested, final, "test")


def test_absent_option_satisfies_is_not_set() -> None:
    requested = {"CONFIG_A": klib.UNSET}
    assert klib.check_config(requested, {}) == []
    assert klib.check_config(requested, {"CONFIG_A": klib.UNSET}) == []


def test_shipped_fragments_parse_and_agree() -> None:
    pin = klib.read_pin()
    assert pin.config_version >= 1
    for arch in ARCHES:
        for debug in (False, True):
            merged = klib.merge_fragments(klib.read_fragments(arch, debug))
            # The must-haves are requested for every arch.
            for opt in (
                "CONFIG_VIRTIO_MMIO",
                "CONFIG_VIRTIO_PCI",
                "CONFIG_VIRTIO_BLK",
                "CONFIG_EXT4_FS",
                "CONFIG_EROFS_FS_ZIP",
                "CONFIG_OVERLAY_FS",
                "CONFIG_VIRTIO_VSOCKETS",
                "CONFIG_DEVTMPFS_MOUNT",
                "CONFIG_CGROUPS",
            ):
                assert merged[opt] == "y", (arch, opt)
            assert merged["CONFIG_MODULES"] == klib.UNSET


def test_build_key_covers_fragments_arch_and_debug() -> None:
    frags = [("common.config", "CONFIG_A=y\n")]
    base = klib.build_key("src", frags, "x86_64", False)
    assert base == klib.build_key("src", list(frags), "x86_64", False)
    others = {
        klib.build_key("src2", frags, "x86_64", False),
        klib.build_key("src", [("common.config", "CONFIG_A=n\n")], "x86_64", False),
        klib.build_key("src", frags, "arm64", False),
        klib.build_key("src", frags, "x86_64", True),
    }
    assert base not in others and len(others) == 4


def test_unknown_arch_is_refused() -> None:
    with pytest.raises(KernelError, match="unsupported kernel arch 'mips'"):
        klib.build_kernel(arch="mips")


def test_user_kernel_must_be_a_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "notakernel"
    junk.write_bytes(b"hello" * 200)
    with pytest.raises(KernelError, match="not a kernel image"):
        klib.kernel_from_path(junk)


# -- the real configuration step ------------------------------------------------------


@pytest.mark.slow
@need_source
@pytest.mark.timeout(600)
def test_option_that_cannot_be_set_fails_loudly(tmp_path: Path) -> None:
    """EROFS without its menu (MISC_FILESYSTEMS) cannot be enabled: the real kconfig drops
    it, and the build must stop with its name before compiling anything."""
    frags = tmp_path / "kernels"
    shutil.copytree(klib.FRAGMENTS_DIR, frags)
    common = (frags / "common.config").read_text()
    (frags / "common.config").write_text(
        common.replace("CONFIG_MISC_FILESYSTEMS=y", "# CONFIG_MISC_FILESYSTEMS is not set")
    )
    started = time.monotonic()
    with pytest.raises(KernelError) as err:
        klib.build_kernel(fragments_dir=frags, jobs=1)
    message = str(err.value)
    assert "CONFIG_EROFS_FS: wanted y, got n" in message
    assert "CONFIG_EROFS_FS_ZIP: wanted y, got n" in message
    assert "CONFIG_MISC_FILESYSTEMS" not in message  # that one was honoured
    # It failed at the configuration step, not after a full compile.
    assert time.monotonic() - started < 300


@pytest.mark.slow
@need_source
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("arch", "debug"), [("x86_64", True), ("arm64", False), ("arm64", True)])
def test_every_fragment_set_survives_kconfig(arch: str, debug: bool) -> None:
    """The combinations the real build test does not compile: each requested option
    makes it through the real allnoconfig + olddefconfig."""
    assert klib.check_fragments(arch, debug=debug) == []


# -- the real build ---------------------------------------------------------------


@pytest.fixture(scope="session")
def built() -> klib.KernelInfo:
    if not SOURCE.exists():
        pytest.fail(f"{SOURCE} not installed: run the README set-up")
    return klib.find_or_build_kernel("x86_64")


@pytest.mark.slow
@need_source
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_build_produces_small_complete_kernel(built: klib.KernelInfo) -> None:
    assert built.image.name == "bzImage"
    size = built.image.stat().st_size
    print(f"\nbzImage {size} bytes; build took {built.metadata['build_seconds']} s")
    assert 0 < size < MAX_BZIMAGE
    assert built.vmlinux is not None and built.vmlinux.exists()
    assert built.config is not None
    requested = klib.merge_fragments(klib.read_fragments("x86_64", False))
    final = klib.parse_config(built.config.read_text())
    assert klib.check_config(requested, final) == []
    assert final.get("CONFIG_MODULES", klib.UNSET) == klib.UNSET
    # The metadata tells the truth about the files next to it.
    meta = built.metadata
    for name, entry in meta["files"].items():
        data = (built.directory / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    assert meta["kernel_version"].startswith(klib.read_pin().version + ".")
    assert meta["config_version"] == klib.read_pin().config_version
    assert meta["arch"] == "x86_64" and meta["compiler"].startswith("gcc")


@pytest.mark.slow
@need_source
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_second_build_comes_from_the_cache(built: klib.KernelInfo) -> None:
    started = time.monotonic()
    again = klib.find_or_build_kernel("x86_64")
    elapsed = time.monotonic() - started
    assert again.key == built.key and again.metadata == built.metadata
    assert elapsed < 1.0, f"cached lookup took {elapsed:.2f} s"
    assert any(k.key == built.key for k in klib.list_kernels())
    assert klib.find_kernel(built.key[:6]).key == built.key


@pytest.mark.slow
@need_source
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_built_images_are_recognised_as_user_kernels(built: klib.KernelInfo) -> None:
    assert built.vmlinux is not None
    elf = klib.kernel_from_path(built.vmlinux, arch="x86_64")
    bz = klib.kernel_from_path(built.image)
    release = built.metadata["kernel_release"]
    assert (elf.metadata["kind"], bz.metadata["kind"]) == ("vmlinux", "bzImage")
    assert elf.version == release and bz.version == release
    assert elf.vmlinux == built.vmlinux.resolve() and bz.vmlinux is None
    with pytest.raises(KernelError, match="is for x86_64, not arm64"):
        klib.kernel_from_path(built.image, arch="arm64")


# -- real boots -----------------------------------------------------------------

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
# An initramfs has no /dev/console for the kernel to open: mount devtmpfs and open it.
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "{MARKER} $1 uptime=$up"
/bin/busybox mount -t sysfs sysfs /sys
echo "{MARKER} root $(/bin/busybox stat -f -c %T /)"
echo "{MARKER} virtio $(/bin/busybox cat /sys/bus/virtio/devices/*/device | /bin/busybox xargs)"
echo "{MARKER} hwrng $(/bin/busybox cat /sys/class/misc/hw_random/rng_current)"
/bin/busybox poweroff -f
"""


def _rootfs_dir(tmp_path: Path, label: str) -> Path:
    root = tmp_path / "root"
    for sub in ("bin", "proc", "sys", "dev"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    init = root / "init"
    init.write_text(INIT_SCRIPT.replace("$1", label))
    init.chmod(0o755)
    return root


def _initramfs(tmp_path: Path) -> Path:
    root = _rootfs_dir(tmp_path, "initramfs")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    out = tmp_path / "initramfs.cpio"
    with open(out, "wb") as f:
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
            input="\n".join(names).encode(),
            cwd=root,
            stdout=f,
            check=True,
        )
    return out


def _ext4_image(tmp_path: Path) -> Path:
    root = _rootfs_dir(tmp_path, "ext4")
    image = tmp_path / "root.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-O", "metadata_csum", "-d", str(root), str(image), "16M"],
        check=True,
        capture_output=True,
    )
    return image


def _boot(kernel: Path, append: str, extra: list[str]) -> tuple[str, float]:
    """Boot under TCG; returns (console output, wall seconds). QEMU must exit by itself."""
    # -icount shift=auto: the guest's TSC and PIT then tick from the same virtual clock.
    # Without it, on a busy host the PIT calibration of the TSC fails under TCG, and a
    # microvm with ACPI (hardware-reduced: no PIT interrupt) then hangs for good.
    cmd = [
        QEMU, "-M", "microvm", "-accel", "tcg", "-icount", "shift=auto", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio", "-kernel", str(kernel), "-append", f"console=ttyS0 {append}",
        *extra,
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=BOOT_TIMEOUT, errors="replace"
    )
    wall = time.monotonic() - started
    assert proc.returncode == 0, f"qemu exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout, wall


def _marker(console: str, label: str) -> float:
    m = MARKER_RE.search(console)
    assert m is not None, f"no marker on the console:\n{console[-3000:]}"
    assert m.group(1) == label
    return float(m.group(2))


@pytest.mark.slow
@pytest.mark.boot
@need_source
@need_boot
@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("image", ["vmlinux", "bzImage"])
def test_boots_initramfs_and_powers_off(built: klib.KernelInfo, tmp_path: Path, image: str) -> None:
    """PVH (vmlinux) and the bzImage both boot to /init, which powers QEMU off."""
    kernel = built.directory / image
    extra = ["-initrd", str(_initramfs(tmp_path)), "-device", "virtio-rng-device"]
    console, wall = _boot(kernel, "quiet panic=-1", extra)
    uptime = _marker(console, "initramfs")
    goal = "ok" if uptime < TARGET_UPTIME_AT_INIT else f"over the {TARGET_UPTIME_AT_INIT} s goal"
    print(f"\n{image}: guest uptime at init {uptime:.2f} s ({goal}), QEMU wall {wall:.2f} s")
    assert f"{MARKER} hwrng virtio_rng.0" in console
    assert uptime < MAX_UPTIME_AT_INIT


@pytest.mark.slow
@pytest.mark.boot
@need_source
@need_boot
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_boots_ext4_root_on_virtio_blk(built: klib.KernelInfo, tmp_path: Path) -> None:
    image = _ext4_image(tmp_path)
    extra = [
        "-drive", f"id=root,file={image},format=raw,if=none",
        "-device", "virtio-blk-device,drive=root",
    ]  # fmt: skip
    console, wall = _boot(
        built.directory / "vmlinux", "quiet panic=-1 root=/dev/vda ro init=/init", extra
    )
    uptime = _marker(console, "ext4")
    print(f"\next4 root: guest uptime at init {uptime:.2f} s, QEMU wall time {wall:.2f} s")
    assert uptime < MAX_UPTIME_AT_INIT
    assert f"{MARKER} root ext2/ext3" in console  # busybox's name for the ext magic
    assert f"{MARKER} virtio 0x0002" in console  # one device, a block device


def test_cli_show_fails_cleanly_on_unknown_key(tmp_path: Path) -> None:
    env = dict(os.environ, VMIMG_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [*CLI, "show", "nosuchkey"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == KernelError.exit_code
    assert proc.stderr == (
        "vmimg: error: kernel key 'nosuchkey' matches 0 cached kernels (`vmimg kernel list` "
        "lists them)\n"
    )


def test_failed_make_keeps_log_and_shows_its_tail(tmp_path: Path) -> None:
    """A source tree whose make fails: the error names the step, the log stays in the
    cache, and the CLI prints the log's tail before the one-line error."""
    src = tmp_path / "linux"
    src.mkdir()
    (src / "Makefile").write_text(
        "VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 0\nEXTRAVERSION =\n"
        "all allnoconfig:\n\t@echo 'kconfig exploded here'\n\t@exit 3\n"
    )
    cache = tmp_path / "cache"
    with pytest.raises(klib.KernelBuildError) as err:
        klib.build_kernel(source=src, cache_dir=str(cache), jobs=1)
    assert "make allnoconfig exited 2" in str(err.value)
    assert "kconfig exploded here" in err.value.log_tail
    assert err.value.log_path.exists()
    assert "kconfig exploded here" in err.value.log_path.read_text()
    assert klib.list_kernels(str(cache)) == []  # nothing half-built was left behind
    assert os.listdir(cache / "tmp") == []

    env = dict(os.environ, VMIMG_CACHE=str(cache))
    proc = subprocess.run(
        [*CLI, "build", "--source", str(src), "--jobs", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == KernelError.exit_code
    lines = proc.stderr.splitlines()
    assert "kconfig exploded here" in lines
    assert lines[-1].startswith("vmimg: error: kernel build failed: make allnoconfig exited 2")
