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

# The console each arch's reference machine has: QEMU microvm's 8250, QEMU virt's PL011.
CONSOLES = {Arch.X86_64: "ttyS0", Arch.ARM64: "ttyAMA0"}
# quiet: the console carries the workload's output; panic=-1: a dead init ends the VM.
COMMON_ARGS = ("quiet", "panic=-1")
ROOT_DEVICE = "/dev/vda"


def console_arg(arch: Arch) -> str:
    return f"console={CONSOLES[arch]}"


def root_args(fs: str, init: str) -> list[str]:
    """Where the kernel finds the root and init: an initramfs's rdinit, or a block device."""
    if fs == "initramfs":
        return [f"rdinit={INIT_PATH}"] if init == "agent" else []
    mode = "rw" if fs == "ext4" else "ro"
    args = [f"root={ROOT_DEVICE}", mode, f"rootfstype={fs}"]
    if init == "agent":
        args.append(f"init={INIT_PATH}")
    return args


def bundle_cmdline(fs: str, init: str, arch: Arch, extra: tuple[str, ...] = ()) -> str:
    """The command line stored in vm.json (launchers for other VMMs swap the console)."""
    return " ".join([console_arg(arch), *COMMON_ARGS, *root_args(fs, init), *extra])
