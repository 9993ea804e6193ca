"""The guest kernel's command line, built in one place.

Three kinds of arguments make it up, always in this order:
- the bundle's: console, quiet, panic, and how to find root and init (`bundle_cmdline`,
  stored in vm.json);
- the VMM's: what the launching machine needs (`pci=off` on microvm, `reboot=k` on
  Firecracker), added by boot/launch;
- the boot's: the `vmimg.*` parameters the agent reads (guest/protocol.kernel_args).
"""

from __future__ import annotations

from vmimg.arch import Arch
from vmimg.guest.protocol import INIT_PATH
from vmimg.rootfs.verity import VerityTree

# The console each arch's reference machine has: QEMU microvm's 8250, QEMU virt's PL011.
CONSOLES = {Arch.X86_64: "ttyS0", Arch.ARM64: "ttyAMA0"}
# quiet: the console carries the workload's output; panic=-1: a dead init ends the VM.
COMMON_ARGS = ("quiet", "panic=-1")
ROOT_DEVICE = "/dev/vda"


def console_arg(arch: Arch) -> str:
    return f"console={CONSOLES[arch]}"


def root_args(fs: str, init: str, verity: VerityTree | None = None, rw: bool = False) -> list[str]:
    """Where the kernel finds the root and init: an initramfs's rdinit, or a block device,
    read-write or read-only; with `verity`, through a dm-verity mapping of that device that
    checks every block read (no initramfs: dm-init sets it up)."""
    if fs == "initramfs":
        return [f"rdinit={INIT_PATH}"] if init == "agent" else []
    root = verity.kernel_args(ROOT_DEVICE) if verity else [f"root={ROOT_DEVICE}"]
    args = [*root, "rw" if rw and verity is None else "ro", f"rootfstype={fs}"]
    if init == "agent":
        args.append(f"init={INIT_PATH}")
    return args


def bundle_cmdline(
    fs: str,
    init: str,
    arch: Arch,
    extra: tuple[str, ...] = (),
    verity: VerityTree | None = None,
    rw: bool | None = None,
) -> str:
    """The command line stored in vm.json (launchers for other VMMs swap the console).
    The root is read-write for ext4 unless `rw` says otherwise."""
    writable = fs == "ext4" if rw is None else rw
    return " ".join(
        [console_arg(arch), *COMMON_ARGS, *root_args(fs, init, verity, writable), *extra]
    )
