"""Launch configurations for a bundle: QEMU, Firecracker and Cloud Hypervisor.

Each function reads only the bundle's vm.json, so the same code writes the
bundle's launch/ files and starts the VMs `vmimg verify` and `vmimg run` boot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from vmimg.arch import Arch
from vmimg.bundle.format import VmSpec

# Per guest arch (vm.json's "arch"): the machine QEMU boots it on. x86_64 uses
# microvm; arm64 uses virt, which boots `Image` with a device tree describing a PL011
# (ttyAMA0), 32 virtio-mmio slots, PSCI for power-off and a PL061 GPIO power key.
# gic-version=max: GICv3 under TCG (more than 8 vCPUs), whatever the host has under KVM.
QEMU_MACHINES = {Arch.X86_64: "microvm", Arch.ARM64: "virt,gic-version=max"}
# Machines whose virtio-mmio devices the guest finds in reverse command-line order.
VIRTIO_MMIO_REVERSED = frozenset({Arch.ARM64})
# arm64 under TCG: "max" emulates every feature, but its QARMA pointer-authentication
# cipher is slow to emulate; pauth-impdef=on keeps pointer auth with QEMU's cheap hash.
ARM64_TCG_CPU = "max,pauth-impdef=on"
# What each VMM names the console on the kernel command line, where it differs from vm.json:
# Firecracker's arm64 console is an 8250 UART (ttyS0), not QEMU virt's PL011.
FIRECRACKER_CONSOLES = {Arch.ARM64: ("console=ttyAMA0", "console=ttyS0")}
# How the agent ends a Firecracker guest (docs/agent.md, "Ending the VM"). On x86_64 Firecracker
# exits on the i8042 reset that a reboot with reboot=k pokes, while a power-off only halts the
# guest; the agent is told to reboot rather than left to guess from the ACPI tables, which newer
# Firecracker releases expose. arm64 guests power off through PSCI, which Firecracker exits on.
FIRECRACKER_AGENT_ARGS = {Arch.X86_64: "vmimg.shutdown=reboot"}
# QEMU's user network (slirp) hands out these addresses; the agent configures eth0 with them.
USER_NET_ARGS = ("vmimg.ip=10.0.2.15/24", "vmimg.gw=10.0.2.2", "vmimg.dns=10.0.2.3")
# Firecracker and Cloud Hypervisor have no user network: their launchers attach a tap device
# the host sets up (docs/run.md, "Firecracker and Cloud Hypervisor"), the guest at .2 of its
# /24 and the host's end, .1, the gateway.
TAP_DEVICE = "vmimg0"
TAP_GUEST_MAC = "06:00:ac:10:00:02"  # locally administered, unicast
TAP_NET_ARGS = ("vmimg.ip=172.16.0.2/24", "vmimg.gw=172.16.0.1")
# Cloud Hypervisor's --rng takes its options as a value (`--rng` alone is refused).
CH_RNG = "src=/dev/urandom"
# A guest booted from a kernel alone (qemu_kernel_command): the agent and a small tree.
BARE_MEMORY_MIB = 256
# Seccomp sandbox: no new privileges, no spawning, no obsolete syscalls.
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class PortForward:
    """A host port forwarded to a guest port through QEMU's user network (`-p`)."""

    host_port: int
    guest_port: int
    host_ip: str = "127.0.0.1"
    proto: str = "tcp"  # or "udp"

    def hostfwd(self) -> str:
        return f"{self.proto}:{self.host_ip}:{self.host_port}-:{self.guest_port}"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.proto}"


@dataclass(frozen=True)
class LaunchOptions:
    """How one boot differs from the bundle's defaults."""

    accel: str = "tcg"  # "kvm" or "tcg"
    vcpus: int | None = None
    memory_mib: int | None = None
    extra_cmdline: tuple[str, ...] = ()
    publish: tuple[PortForward, ...] = ()
    snapshot: bool = True  # guest writes go to a throw-away overlay, the bundle stays as built
    network: bool = True
    serial: str = "stdio"  # QEMU -serial backend
    qmp_socket: str | None = None  # a QMP unix socket, to ask the guest to shut down
    # Devices beside the root disk (volumes, disks, the run disk); qemu_command places them
    # so that the root disk is still the first one the guest kernel finds (/dev/vda).
    extra: tuple[str, ...] = field(default_factory=tuple)


def _path(bundle_dir: str, name: str) -> str:
    return os.path.join(bundle_dir, name)


def qemu_opt(value: str) -> str:
    """A value inside a QEMU option string (`-drive file=...,format=raw`): QEMU reads a
    doubled comma as a literal one, so a path with commas cannot add options."""
    return value.replace(",", ",,")


def cmdline(vm: VmSpec, opts: LaunchOptions, pci: bool = True) -> str:
    args = [vm.cmdline]
    if not pci:
        args.append("pci=off")  # microvm has no PCI bus: spare the kernel the probe
    if opts.network:
        args += USER_NET_ARGS
    args += opts.extra_cmdline
    return " ".join(args)


def qemu_binary(arch: Arch) -> str:
    """The qemu-system-* program for a guest arch."""
    return arch.qemu


def qemu_accel_args(arch: Arch, accel: str) -> list[str]:
    """-accel and -cpu (and their companions) for a guest arch under "kvm" or "tcg"."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if arch is Arch.ARM64:
        # The arm64 generic timer runs off QEMU's virtual clock: no calibration to go
        # wrong, so no -icount (which would also give up multi-threaded TCG).
        return ["-accel", "tcg", "-cpu", ARM64_TCG_CPU]
    # -icount: the guest's TSC and timers tick from one virtual clock, so timer
    # calibration cannot fail on a busy host (it otherwise hangs microvm guests).
    return ["-accel", "tcg", "-icount", "shift=auto", "-cpu", "max"]


def qemu_command(
    vm: VmSpec, bundle_dir: str, accel: str = "tcg", opts: LaunchOptions | None = None
) -> list[str]:
    """The QEMU command line that boots the bundle: qemu-system-x86_64 on the microvm
    machine, or qemu-system-aarch64 on virt, per vm.json's arch; virtio-mmio devices."""
    o = opts or LaunchOptions(accel=accel)
    arch = vm.arch
    rootfs = vm.rootfs
    cmd = [qemu_binary(arch), "-M", QEMU_MACHINES[arch], *qemu_accel_args(arch, o.accel)]
    cmd += [
        "-m", str(o.memory_mib or vm.memory_mib),
        "-smp", str(o.vcpus or vm.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", QEMU_SANDBOX,
        "-kernel", _path(bundle_dir, vm.kernel.file),
        # microvm has no PCI bus; virt has one (unused), and arm64 has no pci=off.
        "-append", cmdline(vm, o, pci=arch is not Arch.X86_64),
        "-serial", o.serial,
        "-device", "virtio-rng-device",
    ]  # fmt: skip
    # microvm's virtio-mmio transports are probed in command-line order; virt gives the
    # first command-line device the highest address and the kernel probes from the lowest,
    # so there the root disk goes after the other disks to stay /dev/vda.
    root_last = arch in VIRTIO_MMIO_REVERSED
    if root_last:
        cmd += o.extra
    if rootfs.type == "initramfs":
        cmd += ["-initrd", _path(bundle_dir, rootfs.file)]
    else:
        drive = f"id=root,file={qemu_opt(_path(bundle_dir, rootfs.file))},format=raw,if=none"
        if rootfs.read_only:
            drive += ",readonly=on"
        elif o.snapshot:
            drive += ",snapshot=on"
        cmd += ["-drive", drive, "-device", "virtio-blk-device,drive=root"]
    if o.network:
        netdev = "user,id=net0"
        for forward in o.publish:
            netdev += f",hostfwd={forward.hostfwd()}"
        cmd += ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]
    if o.qmp_socket:
        cmd += qmp_args(o.qmp_socket)
    return cmd if root_last else cmd + list(o.extra)


def qmp_args(socket_path: str) -> list[str]:
    """A QMP server on a unix socket (vm.qmp_command talks to it)."""
    return ["-qmp", f"unix:{qemu_opt(socket_path)},server=on,wait=off"]


def qemu_kernel_command(
    kernel: str,
    append: str,
    *,
    initrd: str | None = None,
    arch: Arch = Arch.X86_64,
    accel: str = "tcg",
    memory_mib: int = BARE_MEMORY_MIB,
    machine: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """QEMU booting a kernel with no bundle: an initramfs (or the disks `extra` adds), the
    console on stdio, no other devices. The KVM probe's tiny guest and the agent's boot
    tests; `machine` other than the arch's (q35 has the PC keyboard ctrl-alt-del needs)."""
    cmd = [
        qemu_binary(arch), "-M", machine or QEMU_MACHINES[arch], *qemu_accel_args(arch, accel),
        "-m", str(memory_mib), "-smp", "1", "-nodefaults", "-no-user-config",
        "-nographic", "-no-reboot", "-serial", "stdio", "-kernel", kernel,
    ]  # fmt: skip
    if initrd is not None:
        cmd += ["-initrd", initrd]
    return [*cmd, "-append", append, *extra]


def ch_value(value: str) -> str:
    """A value inside a Cloud Hypervisor option string (`--disk path=...,readonly=on`):
    quoted, a quote doubled, so that a path with commas cannot add options (Cloud Hypervisor
    reads quoted values from v48 on)."""
    return '"' + value.replace('"', '""') + '"'


def read_only_root(cmdline: str) -> str:
    """The command line with the root mounted read-only: launchers for VMMs without a
    copy-on-write disk open the bundle's root read-only (the bundle stays as built), and
    the agent puts a tmpfs overlay over it, as it does over erofs."""
    return " ".join("ro" if word == "rw" else word for word in cmdline.split(" "))


def firecracker_config(vm: VmSpec, bundle_dir: str) -> dict[str, Any]:
    """A Firecracker VM config (`firecracker --config-file`); paths relative to the bundle.
    The root drive is read-only; eth0 is the tap device TAP_DEVICE."""
    rootfs = vm.rootfs
    args = read_only_root(vm.cmdline)
    if vm.arch in FIRECRACKER_CONSOLES:
        args = args.replace(*FIRECRACKER_CONSOLES[vm.arch])
    if vm.arch in FIRECRACKER_AGENT_ARGS:
        args += " " + FIRECRACKER_AGENT_ARGS[vm.arch]
    boot: dict[str, Any] = {
        "kernel_image_path": _path(bundle_dir, vm.kernel.file),
        "boot_args": " ".join([args, "reboot=k", "pci=off", *TAP_NET_ARGS]),
    }
    drives = []
    if rootfs.type == "initramfs":
        boot["initrd_path"] = _path(bundle_dir, rootfs.file)
    else:
        drives.append(
            {
                "drive_id": "rootfs",
                "path_on_host": _path(bundle_dir, rootfs.file),
                "is_root_device": True,
                "is_read_only": True,
            }
        )
    return {
        "boot-source": boot,
        "drives": drives,
        "machine-config": {"vcpu_count": vm.vcpus, "mem_size_mib": vm.memory_mib},
        "network-interfaces": [
            {"iface_id": "eth0", "host_dev_name": TAP_DEVICE, "guest_mac": TAP_GUEST_MAC}
        ],
        "entropy": {},  # virtio-rng: getrandom() need not wait for entropy at boot
    }


def cloud_hypervisor_command(vm: VmSpec, bundle_dir: str) -> list[str]:
    """A cloud-hypervisor command line (virtio-pci devices; the disk is still /dev/vda).
    The root disk is read-only; eth0 is the tap device TAP_DEVICE."""
    rootfs = vm.rootfs
    cmd = [
        "cloud-hypervisor",
        "--kernel", _path(bundle_dir, vm.kernel.file),
        "--cmdline", " ".join([read_only_root(vm.cmdline), *TAP_NET_ARGS]),
        "--cpus", f"boot={vm.vcpus}",
        "--memory", f"size={vm.memory_mib}M",
        "--rng", CH_RNG,
        "--serial", "tty",
        "--console", "off",
        "--net", f"tap={TAP_DEVICE},mac={TAP_GUEST_MAC}",
    ]  # fmt: skip
    if rootfs.type == "initramfs":
        cmd += ["--initramfs", _path(bundle_dir, rootfs.file)]
    else:
        cmd += ["--disk", f"path={ch_value(_path(bundle_dir, rootfs.file))},readonly=on"]
    return cmd
