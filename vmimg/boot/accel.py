"""Choosing KVM or TCG: by a real short boot, because /dev/kvm existing proves nothing.

On some hosts (nested virtualisation, this project's CI) /dev/kvm opens fine
but guests crash or hang under it. So KVM counts as usable only after a
tiny guest, our kernel plus the agent in an initramfs, boots under it,
reports and powers off within a few seconds. The verdict is kept in the
cache per host boot (boot_id), QEMU and kernel, so the probe runs once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass

from vmimg.arch import Arch
from vmimg.boot.launch import qemu_binary, qemu_kernel_command
from vmimg.boot.vm import VM
from vmimg.errors import BootError, KernelError
from vmimg.guest import agent as agentlib
from vmimg.guest.cmdline import bundle_cmdline
from vmimg.guest.kernel import kernel_from_path
from vmimg.image.cache import Cache, commit
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import Content, Node, NodeType, Tree
from vmimg.rootfs.writers.cpio import CpioOptions, write_cpio

KVM_DEVICE = "/dev/kvm"
PROBE_TIMEOUT = 10.0
PROBE_MEMORY_MIB = 128
BOOT_ID = "/proc/sys/kernel/random/boot_id"
ACCEL_ENV = "VMIMG_ACCEL"  # "kvm" or "tcg": skip the probe


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # why, in words for the report


def _probe_initramfs(path: str, arch: Arch) -> None:
    """An initramfs holding only the agent, set to verify its own small tree."""
    tree = Tree(Node(NodeType.DIR, mode=0o755))
    tree.add(b"/dev", Node(NodeType.DIR, mode=0o755))
    tree.add(b"/proc", Node(NodeType.DIR, mode=0o555))
    tree.add(b"/probe", Node(NodeType.FILE, content=Content.from_bytes(b"kvm probe\n")))
    config = agentlib.AgentConfig(argv=["/.vmimg/init"])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ContentReader() as reader:
            manifest = agentlib.build_manifest(tree, reader)
            agentlib.inject_agent(tree, config, manifest, agentlib.find_agent_binary(arch))
            write_cpio(tree, reader, fd, CpioOptions(compression="none"))
    finally:
        os.close(fd)


def _qemu_version(arch: Arch = Arch.X86_64) -> str:
    qemu = qemu_binary(arch)
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise BootError(f"{qemu} not found: install {arch.qemu_package}") from None
    return out.splitlines()[0] if out else ""


def kernel_arch(kernel: str) -> Arch:
    """The arch of a kernel file (x86_64 or arm64), from its header; x86_64, as before
    arm64 support, for a file whose format is not recognised (QEMU will judge it)."""
    try:
        return Arch.parse(kernel_from_path(kernel).arch) or Arch.X86_64
    except KernelError:
        return Arch.X86_64


def kvm_can_run(arch: Arch, machine: str | None = None) -> bool:
    """Whether KVM on this host (platform.machine(), or `machine`) can run `arch` guests:
    only guests of the host's own arch; an arm64 guest on x86_64 is always emulated."""
    return Arch.parse(machine or platform.machine()) == arch


def _probe_kvm(kernel: str, cache: Cache, arch: Arch = Arch.X86_64) -> Accel:
    with cache.temp_dir() as tmp:
        initrd = os.path.join(tmp, "probe.cpio")
        _probe_initramfs(initrd, arch)
        append = bundle_cmdline("initramfs", "agent", arch, ("vmimg.mode=verify",))
        argv = qemu_kernel_command(
            kernel, append, initrd=initrd, arch=arch, accel="kvm", memory_mib=PROBE_MEMORY_MIB
        )
        vm = VM(argv)
        vm.start()
        result = vm.wait(PROBE_TIMEOUT)
    exit_marker = result.last("exit")
    if result.timed_out:
        return Accel("tcg", f"KVM guest did not finish a test boot in {PROBE_TIMEOUT:.0f}s")
    if exit_marker is None or exit_marker.marker.fields.get("code") != "0":
        detail = (result.stderr.strip().splitlines() or ["no report from the guest"])[-1]
        return Accel("tcg", f"KVM test boot failed: {detail[:200]}")
    return Accel("kvm", f"KVM test boot took {result.wall:.2f}s")


def choose_accel(kernel: str, cache: Cache, forced: str | None = None) -> Accel:
    """KVM when it really works here, else TCG; `forced` ("kvm"/"tcg") skips the probe.

    The guest's arch is read from the kernel file: a guest of another arch than the
    host's (arm64 on x86_64) always runs under TCG, even when KVM was asked for."""
    forced = forced or os.environ.get(ACCEL_ENV)
    if forced and forced not in ("kvm", "tcg"):
        raise BootError(f"unknown accelerator {forced!r}: use kvm or tcg")
    arch = kernel_arch(kernel)
    if not kvm_can_run(arch):
        asked = "; KVM was asked for but cannot be used" if forced == "kvm" else ""
        return Accel("tcg", f"{arch} guest on a {platform.machine()} host: emulated{asked}")
    if forced:
        return Accel(forced, f"chosen with --accel or {ACCEL_ENV}")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return Accel("tcg", f"{KVM_DEVICE} is not usable")
    with open(BOOT_ID) as f:
        boot_id = f.read().strip()
    with open(kernel, "rb") as f:
        kernel_sha = hashlib.sha256(f.read()).hexdigest()
    key = hashlib.sha256(f"{boot_id}|{_qemu_version(arch)}|{kernel_sha}".encode()).hexdigest()[:16]
    verdict_path = os.path.join(cache.root, "accel", f"{key}.json")
    try:
        with open(verdict_path) as f:
            saved = json.load(f)
        return Accel(saved["name"], saved["reason"] + " (probed earlier)")
    except (OSError, ValueError, KeyError):
        pass
    with cache.lock(f"accel-{key}"):
        accel = _probe_kvm(kernel, cache, arch)
        os.makedirs(os.path.dirname(verdict_path), exist_ok=True)
        with cache.temp_file() as (f, tmp):
            f.write(json.dumps({"name": accel.name, "reason": accel.reason}).encode())
            f.flush()
            commit(tmp, verdict_path)
    return accel
