"""Boot times: vmimg's tuned kernel against Debian's generic kernel with its initramfs.

    python -m bench.boot [--runs 5]

Both boot the same ext4 bundle of the sample image under the same accelerator (TCG here,
KVM where a test boot works) and run the same workload; the agent's markers give the guest
uptime at the agent's start and the host's wall time to the exit report. Debian's kernel
needs its initramfs (virtio and ext4 are modules) and a PC machine (q35) to find the disk;
ours boots QEMU's microvm directly. Also reports the tuned kernel's size and build time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

from vmimg.boot.launch import LaunchOptions, qemu_command
from vmimg.boot.vm import VM
from vmimg.bundle.format import VmSpec, read_vm_json
from vmimg.guest.kernel import find_or_build_kernel
from vmimg.image.cache import Cache
from vmimg.image.sample import write_sample

US = 1_000_000
TIMEOUT = 180.0


def debian_kernel() -> tuple[str, str]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        raise SystemExit("no Debian kernel in /boot: apt-get install linux-image-amd64")
    kernel = kernels[-1]
    return kernel, kernel.replace("vmlinuz-", "initrd.img-")


def ours_argv(bundle: str, vm: VmSpec) -> list[str]:
    return qemu_command(vm, bundle, opts=LaunchOptions(accel="tcg", network=False))


def debian_argv(bundle: str, kernel: str, initrd: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-icount", "shift=auto",
        "-cpu", "max", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
        "-nographic", "-no-reboot", "-serial", "stdio", "-kernel", kernel, "-initrd", initrd,
        "-append", "console=ttyS0 quiet panic=-1 root=/dev/vda rw rootfstype=ext4 "
        "init=/.vmimg/init",
        "-drive", f"id=root,file={bundle}/rootfs.ext4,format=raw,if=none,snapshot=on",
        "-device", "virtio-blk-pci,drive=root", "-device", "virtio-rng-pci",
    ]  # fmt: skip


def boot(argv: list[str]) -> tuple[float, float]:
    """(guest uptime at the agent's start, host seconds to the exit report)."""
    vm = VM(argv)
    vm.start()
    result = vm.wait(TIMEOUT)
    ready, done = result.last("ready"), result.last("exit")
    if ready is None or done is None:
        raise RuntimeError(f"no agent report: {result.console[-2000:]}")
    return int(ready.marker.fields["boot_us"]) / US, done.at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", default="bench/results/boot.json")
    args = ap.parse_args()
    kernel = find_or_build_kernel("x86_64")
    deb_kernel, deb_initrd = debian_kernel()
    with tempfile.TemporaryDirectory(prefix="vmimg-boot-") as work:
        ref = write_sample(os.path.join(work, "sample"))
        bundle = os.path.join(work, "bundle")
        subprocess.run(
            [sys.executable, "-m", "vmimg", "build", ref, "-o", bundle, "--writable-root",
             "--cmd", "true"], check=True, stdout=subprocess.DEVNULL,
            env={**os.environ, "VMIMG_CACHE": Cache.open().root},
        )  # fmt: skip
        vm = read_vm_json(bundle)
        rows: dict[str, list[tuple[float, float]]] = {"vmimg kernel": [], "debian kernel": []}
        for _ in range(args.runs):  # interleaved
            rows["vmimg kernel"].append(boot(ours_argv(bundle, vm)))
            rows["debian kernel"].append(boot(debian_argv(bundle, deb_kernel, deb_initrd)))
    summary = {
        name: {
            "agent_uptime_s": statistics.median(r[0] for r in runs),
            "exit_wall_s": statistics.median(r[1] for r in runs),
            "runs": runs,
        }
        for name, runs in rows.items()
    }
    meta = kernel.metadata
    boot_image = meta["files"][meta["boot_image"]]
    print(f"{'kernel':<14} {'uptime at agent s':>18} {'wall to exit s':>15}")
    for name, s in summary.items():
        print(f"{name:<14} {s['agent_uptime_s']:>18.3f} {s['exit_wall_s']:>15.3f}")
    ratio = summary["debian kernel"]["agent_uptime_s"] / summary["vmimg kernel"]["agent_uptime_s"]
    print(f"to the agent: debian / vmimg = {ratio:.2f}x")
    print(f"vmimg kernel: {meta['boot_image']} {boot_image['size']} bytes, "
          f"built in {meta['build_seconds']} s ({meta['kernel_version']})")  # fmt: skip
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"summary": summary, "kernel": meta, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
