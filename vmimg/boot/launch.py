"""Launch configurations for a bundle: QEMU, Firecracker and Cloud Hypervisor.

Each function reads only the bundle's vm.json, so the same code writes the
bundle's launch/ files and starts the VMs `vmimg verify` and `vmimg run` boot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

QEMU_X86 = "qemu-system-x86_64"
# QEMU's user network (slirp) hands out these addresses; the agent configures eth0 with them.
USER_NET_ARGS = ("vmimg.ip=10.0.2.15/24", "vmimg.gw=10.0.2.2", "vmimg.dns=10.0.2.3")
# Seccomp sandbox: no new privileges, no spawning, no obsolete syscalls.
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class LaunchOptions:
    """How one boot differs from the bundle's defaults."""

    accel: str = "tcg"  # "kvm" or "tcg"
    vcpus: int | None = None
    memory_mib: int | None = None
    extra_cmdline: tuple[str, ...] = ()
    publish: tuple[tuple[int, int], ...] = ()  # (host port, guest port), TCP on 127.0.0.1
    snapshot: bool = True  # guest writes go to a throw-away overlay, the bundle stays as built
    network: bool = True
    serial: str = "stdio"  # QEMU -serial backend
    qmp_socket: str | None = None  # a QMP unix socket, to ask the guest to shut down
    extra: tuple[str, ...] = field(default_factory=tuple)


def _path(bundle_dir: str, name: str) -> str:
    return os.path.join(bundle_dir, name)


def cmdline(vm: dict[str, Any], opts: LaunchOptions, pci: bool = True) -> str:
    args = [str(vm["cmdline"])]
    if not pci:
        args.append("pci=off")  # microvm has no PCI bus: spare the kernel the probe
    if opts.network:
        args += USER_NET_ARGS
    args += opts.extra_cmdline
    return " ".join(args)


def qemu_command(
    vm: dict[str, Any], bundle_dir: str, accel: str = "tcg", opts: LaunchOptions | None = None
) -> list[str]:
    """The qemu-system-x86_64 command line that boots the bundle on the microvm machine."""
    o = opts or LaunchOptions(accel=accel)
    rootfs = vm["rootfs"]
    cmd = [QEMU_X86, "-M", "microvm"]
    if o.accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    else:
        # -icount: the guest's TSC and timers tick from one virtual clock, so timer
        # calibration cannot fail on a busy host (it otherwise hangs microvm guests).
        cmd += ["-accel", "tcg", "-icount", "shift=auto", "-cpu", "max"]
    cmd += [
        "-m", str(o.memory_mib or vm["memory_mib"]),
        "-smp", str(o.vcpus or vm["vcpus"]),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", QEMU_SANDBOX,
        "-kernel", _path(bundle_dir, vm["kernel"]["file"]),
        "-append", cmdline(vm, o, pci=False),
        "-serial", o.serial,
        "-device", "virtio-rng-device",
    ]  # fmt: skip
    if rootfs["type"] == "initramfs":
        cmd += ["-initrd", _path(bundle_dir, rootfs["file"])]
    else:
        drive = f"id=root,file={_path(bundle_dir, rootfs['file'])},format=raw,if=none"
        if rootfs.get("read_only"):
            drive += ",readonly=on"
        elif o.snapshot:
            drive += ",snapshot=on"
        cmd += ["-drive", drive, "-device", "virtio-blk-device,drive=root"]
    if o.network:
        netdev = "user,id=net0"
        for host_port, guest_port in o.publish:
            netdev += f",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
        cmd += ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]
    if o.qmp_socket:
        cmd += ["-qmp", f"unix:{o.qmp_socket},server=on,wait=off"]
    return cmd + list(o.extra)


def firecracker_config(vm: dict[str, Any], bundle_dir: str) -> dict[str, Any]:
    """A Firecracker VM config (`firecracker --config-file`); paths relative to the bundle."""
    rootfs = vm["rootfs"]
    boot: dict[str, Any] = {
        "kernel_image_path": _path(bundle_dir, vm["kernel"]["file"]),
        "boot_args": f"{vm['cmdline']} reboot=k pci=off",
    }
    drives = []
    if rootfs["type"] == "initramfs":
        boot["initrd_path"] = _path(bundle_dir, rootfs["file"])
    else:
        drives.append(
            {
                "drive_id": "rootfs",
                "path_on_host": _path(bundle_dir, rootfs["file"]),
                "is_root_device": True,
                "is_read_only": bool(rootfs.get("read_only")),
            }
        )
    return {
        "boot-source": boot,
        "drives": drives,
        "machine-config": {"vcpu_count": vm["vcpus"], "mem_size_mib": vm["memory_mib"]},
        "network-interfaces": [],
    }


def cloud_hypervisor_command(vm: dict[str, Any], bundle_dir: str) -> list[str]:
    """A cloud-hypervisor command line (virtio-pci devices; the disk is still /dev/vda)."""
    rootfs = vm["rootfs"]
    cmd = [
        "cloud-hypervisor",
        "--kernel", _path(bundle_dir, vm["kernel"]["file"]),
        "--cmdline", str(vm["cmdline"]),
        "--cpus", f"boot={vm['vcpus']}",
        "--memory", f"size={vm['memory_mib']}M",
        "--rng",
        "--serial", "tty",
        "--console", "off",
    ]  # fmt: skip
    if rootfs["type"] == "initramfs":
        cmd += ["--initramfs", _path(bundle_dir, rootfs["file"])]
    else:
        ro = ",readonly=on" if rootfs.get("read_only") else ""
        cmd += ["--disk", f"path={_path(bundle_dir, rootfs['file'])}{ro}"]
    return cmd
