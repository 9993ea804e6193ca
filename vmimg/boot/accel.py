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
import subprocess
from dataclasses import dataclass

from vmimg import agent as agentlib
from vmimg.boot.vm import VM
from vmimg.cache import Cache
from vmimg.content import ContentReader
from vmimg.errors import BootError
from vmimg.tree import Content, Node, NodeType, Tree
from vmimg.writers.cpio import CpioOptions, write_cpio

KVM_DEVICE = "/dev/kvm"
PROBE_TIMEOUT = 10.0
PROBE_MEMORY_MIB = 128
BOOT_ID = "/proc/sys/kernel/random/boot_id"
ACCEL_ENV = "VMIMG_ACCEL"  # "kvm" or "tcg": skip the probe


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # why, in words for the report


def _probe_initramfs(path: str, arch: str) -> None:
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


def _qemu_version() -> str:
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        raise BootError("qemu-system-x86_64 not found: install qemu-system-x86") from None
    return out.splitlines()[0] if out else ""


def _probe_kvm(kernel: str, cache: Cache) -> Accel:
    with cache.temp_dir() as tmp:
        initrd = os.path.join(tmp, "probe.cpio")
        _probe_initramfs(initrd, "x86_64")
        argv = [
            "qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu", "host",
            "-m", str(PROBE_MEMORY_MIB), "-smp", "1", "-nodefaults", "-no-user-config",
            "-nographic", "-no-reboot", "-serial", "stdio", "-kernel", kernel,
            "-initrd", initrd, "-append",
            f"console=ttyS0 quiet panic=-1 rdinit={agentlib.INIT_PATH} vmimg.mode=verify",
        ]  # fmt: skip
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
    """KVM when it really works here, else TCG; `forced` ("kvm"/"tcg") skips the probe."""
    forced = forced or os.environ.get(ACCEL_ENV)
    if forced:
        if forced not in ("kvm", "tcg"):
            raise BootError(f"unknown accelerator {forced!r}: use kvm or tcg")
        return Accel(forced, f"chosen with --accel or {ACCEL_ENV}")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return Accel("tcg", f"{KVM_DEVICE} is not usable")
    with open(BOOT_ID) as f:
        boot_id = f.read().strip()
    with open(kernel, "rb") as f:
        kernel_sha = hashlib.sha256(f.read()).hexdigest()
    key = hashlib.sha256(f"{boot_id}|{_qemu_version()}|{kernel_sha}".encode()).hexdigest()[:16]
    verdict_path = os.path.join(cache.root, "accel", f"{key}.json")
    try:
        with open(verdict_path) as f:
            saved = json.load(f)
        return Accel(saved["name"], saved["reason"] + " (probed earlier)")
    except (OSError, ValueError, KeyError):
        pass
    with cache.lock(f"accel-{key}"):
        accel = _probe_kvm(kernel, cache)
        os.makedirs(os.path.dirname(verdict_path), exist_ok=True)
        with cache.temp_file() as (f, tmp):
            f.write(json.dumps({"name": accel.name, "reason": accel.reason}).encode())
            f.flush()
            os.rename(tmp, verdict_path)
    return accel
