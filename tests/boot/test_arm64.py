"""arm64 end to end: a two-platform image, one bundle per platform, both booted under QEMU.

The arm64 guest runs on `qemu-system-aarch64 -M virt` under TCG (KVM only on an arm64
host). The image is the built-in sample as an OCI index: the host's busybox for
linux/amd64 and Debian's busybox-static:arm64 (fetched with apt into the user's cache once)
for linux/arm64. The arm64 kernel is built once per machine into the user's cache, like the
x86_64 one; the first run cross-compiles it (minutes).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import xmlschema

from tests.boot.conftest import TRAP_TERM, run_then_stop, vmimg
from vmimg.boot.accel import choose_accel, kernel_arch, kvm_can_run
from vmimg.boot.launch import qemu_command
from vmimg.bundle.build import boot_kernel_file
from vmimg.bundle.format import read_vm_json
from vmimg.digest import sha256_file
from vmimg.guest.agent import find_agent_binary
from vmimg.guest.kernel import ARM64_MAGIC, ARM64_MAGIC_OFFSET, KernelInfo, find_or_build_kernel
from vmimg.image.cache import Cache
from vmimg.image.sample import elf_machine, write_sample

SCHEMA = Path(__file__).resolve().parent.parent / "data" / "junit.xsd"
PLATFORMS = ("linux/amd64", "linux/arm64")
ELF_AARCH64 = 183
# Generous: the first run may cross-compile the arm64 kernel on 2 shared cores.
pytestmark = [pytest.mark.boot, pytest.mark.slow, pytest.mark.timeout(3600)]
ON_X86 = platform.machine() in ("x86_64", "amd64")


@pytest.fixture(scope="module")
def arm64_kernel() -> KernelInfo:
    """The arm64 guest kernel from the user's cache (cross-compiled there the first time)."""
    return find_or_build_kernel("arm64")


@pytest.fixture(scope="module")
def two_platform_ref(tmp_path_factory: pytest.TempPathFactory) -> str:
    """oci:DIR:latest naming an index of the busybox sample for linux/amd64 and linux/arm64."""
    return write_sample(str(tmp_path_factory.mktemp("multi") / "layout"), PLATFORMS)


def _build(ref: str, out: Path, cache: Path, kernel: Path, plat: str, *extra: str) -> Path:
    r = vmimg("build", ref, "-o", str(out), "--platform", plat, "--kernel", str(kernel),
              *extra, cache=cache)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def bundles(
    two_platform_ref: str,
    kernel_file: str,
    arm64_kernel: KernelInfo,
    cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    image = arm64_kernel.image
    ref = two_platform_ref
    return {
        "amd64": _build(ref, root / "amd64", cache_dir, Path(kernel_file), "linux/amd64"),
        "arm64": _build(ref, root / "arm64", cache_dir, image, "linux/arm64"),
        "arm64-ext4": _build(ref, root / "arm64-ext4", cache_dir, image, "linux/arm64",
                             "--writable-root"),
        "arm64-initramfs": _build(ref, root / "arm64-initramfs", cache_dir, image,
                                  "linux/arm64", "--fs", "initramfs"),
    }  # fmt: skip


def test_arm64_kernel_is_an_image_with_the_power_key(arm64_kernel: KernelInfo) -> None:
    data = arm64_kernel.image.read_bytes()
    assert arm64_kernel.image.name == "Image"
    assert data[ARM64_MAGIC_OFFSET : ARM64_MAGIC_OFFSET + len(ARM64_MAGIC)] == ARM64_MAGIC
    assert boot_kernel_file(arm64_kernel) == arm64_kernel.image  # not the vmlinux ELF
    assert arm64_kernel.config is not None
    config = arm64_kernel.config.read_text()
    for option in ("GPIO_PL061", "KEYBOARD_GPIO", "INPUT_EVDEV", "SERIAL_AMBA_PL011_CONSOLE",
                   "ARM_PSCI_FW", "VIRTIO_MMIO", "EROFS_FS", "EXT4_FS"):  # fmt: skip
        assert f"CONFIG_{option}=y\n" in config, option
    print(f"\narm64 Image {len(data)} bytes, build {arm64_kernel.metadata['build_seconds']} s")


def test_aarch64_agent_is_static_and_small() -> None:
    agent = find_agent_binary("arm64")
    assert agent.endswith("aarch64/init")
    assert elf_machine(agent) == ELF_AARCH64
    readelf = subprocess.run(["readelf", "-lW", agent], capture_output=True, text=True, check=True)
    assert "INTERP" not in readelf.stdout and "DYNAMIC" not in readelf.stdout  # static
    size = os.path.getsize(agent)
    print(f"\naarch64 agent {size} bytes")
    assert size < 1 << 20


def test_each_platform_gets_its_own_bundle(bundles: dict[str, Path]) -> None:
    amd, arm = read_vm_json(str(bundles["amd64"])).doc, read_vm_json(str(bundles["arm64"])).doc
    assert (amd["arch"], amd["platform"]) == ("x86_64", "linux/amd64")
    assert (arm["arch"], arm["platform"]) == ("arm64", "linux/arm64")
    assert amd["source"]["digest"] != arm["source"]["digest"]  # two manifests of one index
    assert "console=ttyS0" in amd["cmdline"] and "console=ttyAMA0" in arm["cmdline"]
    assert "console=ttyS0" not in arm["cmdline"]
    assert arm["init"]["sha256"] == sha256_file(find_agent_binary("aarch64"))
    assert amd["init"]["sha256"] == sha256_file(find_agent_binary("x86_64"))
    kernel = (bundles["arm64"] / "kernel").read_bytes()
    assert kernel[ARM64_MAGIC_OFFSET : ARM64_MAGIC_OFFSET + len(ARM64_MAGIC)] == ARM64_MAGIC
    qemu = (bundles["arm64"] / "launch" / "qemu.sh").read_text()
    assert "qemu-system-aarch64" in qemu and "virt" in qemu and "microvm" not in qemu
    fc = json.loads((bundles["arm64"] / "launch" / "firecracker.json").read_text())
    assert "console=ttyS0" in fc["boot-source"]["boot_args"]  # Firecracker's arm64 UART
    argv = qemu_command(read_vm_json(str(bundles["arm64"])), str(bundles["arm64"]))
    assert argv[:3] == ["qemu-system-aarch64", "-M", "virt,gic-version=max"]
    assert "virtio-blk-device,drive=root" in argv and "pci=off" not in " ".join(argv)


def test_launch_script_boots_arm64_under_tcg(bundles: dict[str, Path]) -> None:
    """The bundle's own launch/qemu.sh, run as a user would: it must pick TCG on x86_64."""
    env = {**os.environ}
    env.pop("ACCEL", None)
    r = subprocess.run(
        [str(bundles["arm64"] / "launch" / "qemu.sh"), "-snapshot"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert "@@vmimg@@ exit code=0" in r.stdout, r.stdout[-2000:] + r.stderr
    if ON_X86:
        assert r.returncode == 0


def test_verify_both_platforms_with_junit(
    bundles: dict[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    junit = tmp_path / "report.xml"
    names = ["amd64", "arm64", "arm64-ext4", "arm64-initramfs"]
    r = vmimg("verify", *(str(bundles[n]) for n in names), "--deep", "--json",
              "--junit", str(junit), cache=cache_dir, timeout=1200)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    reports = json.loads(r.stdout)
    assert [rep["rootfs"] for rep in reports] == ["erofs", "erofs", "ext4", "initramfs"]
    for name, rep in zip(names, reports, strict=True):
        assert rep["passed"] and rep["stage"] == "exit" and rep["exit_code"] == 0, rep
        if rep["rootfs"] == "erofs":  # a dm-verity root: the kernel checks, no tree walk
            assert rep["verify_result"] == "verity" and rep["verify_entries"] is None
        else:
            assert rep["verify_result"] == "ok" and rep["verify_entries"] > 40
        assert rep["kernel"].startswith("6.1")
        t = rep["timings"]
        assert 0 < t["to_agent_ready"] < t["to_workload_exit"]
        print(f"\n{name}: {rep['accel']} ready {t['to_agent_ready']:.2f}s "
              f"exit {t['to_workload_exit']:.2f}s guest-uptime-at-agent "
              f"{t['guest_kernel_to_agent']:.2f}s")  # fmt: skip
        if name.startswith("arm64") and ON_X86:
            assert rep["accel"] == "tcg" and "arm64 guest on a x86_64 host" in rep["accel_reason"]
    xmlschema.XMLSchema(str(SCHEMA)).validate(str(junit))
    assert b"<failure" not in junit.read_bytes()


def test_each_guest_runs_its_own_arch(bundles: dict[str, Path], cache_dir: Path) -> None:
    for name, machine in (("amd64", "x86_64"), ("arm64", "aarch64")):
        r = vmimg("verify", str(bundles[name]), "--cmd", f"uname -m | grep -qx {machine}",
                  "--json", cache=cache_dir)  # fmt: skip
        assert r.returncode == 0, r.stdout
    bad = vmimg("verify", str(bundles["arm64"]), "--cmd", "uname -m | grep -qx x86_64",
                "--expect-exit", "1", cache=cache_dir)  # fmt: skip
    assert bad.returncode == 0, bad.stdout


def test_arm64_exit_codes(bundles: dict[str, Path], cache_dir: Path) -> None:
    ok = vmimg("verify", str(bundles["arm64"]), "--cmd", "exit 3", "--expect-exit", "3",
               "--json", cache=cache_dir)  # fmt: skip
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["exit_code"] == 3
    bad = vmimg("verify", str(bundles["arm64-ext4"]), "--cmd", "exit 3", cache=cache_dir)
    assert bad.returncode == 12 and "exit code 3, expected 0" in bad.stdout
    killed = vmimg("verify", str(bundles["arm64"]), "--cmd", "kill -9 $$", "--expect-exit",
                   "137", cache=cache_dir)  # fmt: skip
    assert killed.returncode == 0, killed.stdout


def test_arm64_run_and_shutdown_request(bundles: dict[str, Path], cache_dir: Path) -> None:
    """SIGTERM to `vmimg run` -> QMP system_powerdown -> virt's PL061 GPIO power key ->
    gpio-keys KEY_POWER on evdev -> the agent -> SIGTERM to the workload."""
    r = vmimg("run", str(bundles["arm64"]), "--cmd", "echo from-run; exit 7", cache=cache_dir,
              stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 7 and "from-run" in r.stdout
    code, out = run_then_stop(bundles["arm64"], cache_dir, "--cmd", TRAP_TERM)
    assert "GOT-TERM" in out
    assert code == 42


def test_accel_is_tcg_for_a_foreign_guest(arm64_kernel: KernelInfo, tmp_path: Path) -> None:
    assert kernel_arch(str(arm64_kernel.image)) == "arm64"
    assert kvm_can_run("arm64", "aarch64") and not kvm_can_run("arm64", "x86_64")
    assert kvm_can_run("x86_64", "x86_64") and not kvm_can_run("x86_64", "aarch64")
    if ON_X86:
        accel = choose_accel(str(arm64_kernel.image), Cache.open(str(tmp_path)), "kvm")
        assert accel.name == "tcg" and "KVM was asked for but cannot be used" in accel.reason
