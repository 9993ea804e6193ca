"""`vmimg build`: an image becomes a VM-ready bundle directory.

    BUNDLE/
      vm.json                  what the bundle is (format in docs/bundle.md)
      rootfs.erofs | rootfs.ext4 | initramfs.cpio.gz
      kernel                   the guest kernel (vmlinux: PVH/ELF, what every VMM boots)
      manifest                 the tree manifest the agent verifies against
      launch/qemu.sh           ready-made launch configurations
      launch/firecracker.json
      launch/cloud-hypervisor.sh

The bundle is assembled in a temporary directory beside the destination and
renamed into place, so a bundle directory is always whole. Finished bundles
are cached by everything that determines their bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmimg import __version__
from vmimg.errors import UsageError, VmimgError, WriterError
from vmimg.guest import agent as agentlib
from vmimg.guest.kernel import KernelInfo
from vmimg.image.cache import Cache, commit, disk_usage, space_shortfall
from vmimg.image.sources import SourceOptions, open_image
from vmimg.image.sources.base import Image
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.convert import (
    build_tree,
    check_output_space,
    copy_file,
    options_doc,
    output_size_floor,
    source_date_epoch_ns,
    with_seed,
)
from vmimg.rootfs.tree import Node, NodeType, Tree
from vmimg.rootfs.writers import write_image

BUNDLE_FORMAT = 1
VM_JSON = "vm.json"
KERNEL_FILE = "kernel"
MANIFEST_FILE = "manifest"
LAUNCH_DIR = "launch"
FS_TYPES = ("erofs", "ext4", "initramfs")
ROOTFS_FILES = {"erofs": "rootfs.erofs", "ext4": "rootfs.ext4", "initramfs": "initramfs.cpio.gz"}
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 256
HASH_CHUNK = 4 << 20
LOST_FOUND = b"lost+found"
# Where the agent mounts the kernel's file systems, with the modes distributions give them.
MOUNT_POINTS = (
    (b"proc", 0o555),
    (b"sys", 0o555),
    (b"dev", 0o755),
    (b"run", 0o755),
    (b"tmp", 0o1777),
)
BASE_CMDLINE = ("console=ttyS0", "quiet", "panic=-1")
_ARCH_OF_PLATFORM = {"amd64": "x86_64", "arm64": "arm64"}
# The console each arch's reference machine has: QEMU microvm's 8250, QEMU virt's PL011.
CONSOLES = {"x86_64": "ttyS0", "arm64": "ttyAMA0"}
# Write failures of the destination's file system (rather than of what is read).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class BuildOptions:
    """Everything `vmimg build` takes besides the source and the destination."""

    fs: str = "erofs"
    writer_options: Any = None  # Ext4Options / ErofsOptions / CpioOptions for `fs`
    init: str = "agent"  # or "image": the image brings its own init
    overrides: agentlib.ConfigOverrides = field(default_factory=agentlib.ConfigOverrides)
    kernel_path: str | None = None  # a user-supplied kernel instead of ours
    vcpus: int = DEFAULT_VCPUS
    memory_mib: int = DEFAULT_MEMORY_MIB
    extra_cmdline: tuple[str, ...] = ()


@dataclass
class BuildResult:
    bundle: str
    image: str
    digest: str
    platform: str
    fs: str
    cached: bool
    seconds: float
    files: dict[str, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def kernel_cmdline(fs: str, init: str, extra: tuple[str, ...] = (), arch: str = "x86_64") -> str:
    """The kernel command line stored in vm.json (VMM-independent but for the console,
    which is the one of the arch's QEMU machine; launchers for other VMMs swap it)."""
    args = [f"console={CONSOLES.get(arch, CONSOLES['x86_64'])}", *BASE_CMDLINE[1:]]
    if fs == "initramfs":
        args += ["rdinit=" + agentlib.INIT_PATH] if init == "agent" else []
    else:
        mode = "rw" if fs == "ext4" else "ro"
        args += ["root=/dev/vda", mode, f"rootfstype={fs}"]
        if init == "agent":
            args.append("init=" + agentlib.INIT_PATH)
    return " ".join([*args, *extra])


def resolve_kernel(arch: str, kernel_path: str | None, cache: Cache) -> KernelInfo:
    from vmimg.guest.kernel import find_or_build_kernel, kernel_from_path

    if kernel_path:
        return kernel_from_path(kernel_path, arch)
    kernel = find_or_build_kernel(arch, cache_dir=cache.root)
    while not cache.pin(kernel.directory):  # pruned as we looked: build it again
        kernel = find_or_build_kernel(arch, cache_dir=cache.root)
    return kernel


def _options_doc(options: BuildOptions) -> dict[str, Any]:
    doc = dataclasses.asdict(options)
    doc["writer_options"] = options_doc(options.writer_options)
    return doc


def bundle_key(
    image: Image, options: BuildOptions, kernel: KernelInfo, agent_sha: str | None
) -> str:
    doc = {
        "bundle_format": BUNDLE_FORMAT,
        "vmimg": __version__,
        "image": image.digest,
        "reference": image.name,  # vm.json records it
        "platform": str(image.platform),
        "options": _options_doc(options),
        "kernel": kernel.metadata.get("files", {}),
        "agent": agent_sha,
        "epoch": source_date_epoch_ns(),
    }
    blob = json.dumps(doc, sort_keys=True, default=lambda b: b.hex()).encode()
    return hashlib.sha256(blob).hexdigest()


def _writer_options(options: BuildOptions, image: Image) -> Any:
    w = options.writer_options
    if w is None:
        if options.fs == "ext4":
            from vmimg.rootfs.writers.ext4 import Ext4Options

            w = Ext4Options()
        elif options.fs == "erofs":
            from vmimg.rootfs.writers.erofs import ErofsOptions

            w = ErofsOptions()
        else:
            from vmimg.rootfs.writers.cpio import CpioOptions

            w = CpioOptions()
    return with_seed(w, image)


def _prepare_tree(
    image: Image, tree: Tree, reader: ContentReader, options: BuildOptions, arch: str
) -> tuple[agentlib.Manifest, agentlib.AgentConfig | None]:
    """Build the manifest of the image's tree, then inject the agent (unless --init image)."""
    assert tree.root.children is not None
    if options.fs == "ext4" and LOST_FOUND not in tree.root.children:
        # The ext4 writer would add it anyway; adding it here puts it in the manifest too.
        tree.add(b"/" + LOST_FOUND, Node(NodeType.DIR, mode=0o700, mtime_ns=tree.root.mtime_ns))
    for name, mode in MOUNT_POINTS:
        # A read-only root cannot get them at boot; container runtimes add them too.
        if name not in tree.root.children:
            tree.add(b"/" + name, Node(NodeType.DIR, mode=mode, mtime_ns=tree.root.mtime_ns))
    manifest = agentlib.build_manifest(tree, reader)
    if options.init == "image":
        return manifest, None
    config = agentlib.resolve_config(image.config.config, tree, reader, options.overrides)
    agentlib.inject_agent(tree, config, manifest, agentlib.find_agent_binary(arch))
    return manifest, config


_BUNDLE_VAR = "@BUNDLE@"
_ACCEL_VAR = "@ACCEL@"
_SCRIPT_HEAD = """#!/bin/sh
# Generated by vmimg: boots this bundle with {vmm}.{note}
B="$(cd "$(dirname "$0")/.." && pwd)"
"""
_QEMU_ACCEL = """if [ "${{ACCEL:-{default}}}" = tcg ]; then
  accel="{tcg}"
else
  accel="{kvm}"
fi
"""
# A foreign-arch bundle defaults to TCG unless the script runs on a host of its arch.
_QEMU_DEFAULT_ACCEL = {"x86_64": "kvm", "arm64": "$default"}
_QEMU_HOST_CHECK = {
    "arm64": 'case "$(uname -m)" in aarch64 | arm64) default=kvm ;; *) default=tcg ;; esac\n'
}
_QEMU_NOTES = {
    "x86_64": "QEMU (KVM; ACCEL=tcg for software emulation)",
    "arm64": "QEMU (KVM on an arm64 host, else TCG; ACCEL=kvm|tcg to choose)",
}


def _qemu_accel_script(arch: str) -> str:
    """The shell lines that set $accel for launch/qemu.sh."""
    from vmimg.boot.launch import qemu_accel_args

    return _QEMU_HOST_CHECK.get(arch, "") + _QEMU_ACCEL.format(
        default=_QEMU_DEFAULT_ACCEL.get(arch, "kvm"),
        tcg=" ".join(qemu_accel_args(arch, "tcg")),
        kvm=" ".join(qemu_accel_args(arch, "kvm")),
    )


def boot_kernel_file(kernel: KernelInfo) -> Path:
    """The kernel file a bundle ships: x86_64's vmlinux (PVH, what every x86 VMM boots);
    for arm64 the `Image` (QEMU virt, Firecracker and Cloud Hypervisor boot it; an arm64
    vmlinux ELF would be loaded as a bare-metal program, without the Linux boot protocol)."""
    if kernel.arch == "x86_64" and kernel.vmlinux is not None:
        return kernel.vmlinux
    return kernel.image


def _shell_word(arg: str) -> str:
    if arg == _ACCEL_VAR:
        return "$accel"
    if _BUNDLE_VAR in arg:
        escaped = re.sub(r'(["$`\\])', r"\\\1", arg).replace(_BUNDLE_VAR, "$B")
        return f'"{escaped}"'
    return shlex.quote(arg)


def render_script(argv: list[str]) -> str:
    """argv as a readable shell command: an option and its value share a line."""
    lines: list[str] = [_shell_word(argv[0])]
    for arg in argv[1:]:
        word = _shell_word(arg)
        if arg.startswith("-") or arg == _ACCEL_VAR:
            lines.append(word)
        else:
            lines[-1] += " " + word
    return " \\\n  ".join(lines)


def _write_launchers(bundle: str, vm: dict[str, Any]) -> None:
    from vmimg.boot.launch import (
        cloud_hypervisor_command,
        firecracker_config,
        qemu_accel_args,
        qemu_command,
        vm_arch,
    )

    os.makedirs(os.path.join(bundle, LAUNCH_DIR))
    arch = vm_arch(vm)
    qemu = qemu_command(vm, bundle_dir=_BUNDLE_VAR, accel="kvm")
    i = qemu.index("-accel")  # "-accel kvm -cpu host" becomes a choice made at run time
    qemu[i : i + len(qemu_accel_args(arch, "kvm"))] = [_ACCEL_VAR]
    cloud = cloud_hypervisor_command(vm, bundle_dir=_BUNDLE_VAR)
    scripts = (
        ("qemu.sh", _QEMU_NOTES[arch], _qemu_accel_script(arch), qemu),
        ("cloud-hypervisor.sh", "Cloud Hypervisor", "", cloud),
    )
    for name, vmm, extra, argv in scripts:
        path = os.path.join(bundle, LAUNCH_DIR, name)
        with open(path, "w") as f:
            f.write(_SCRIPT_HEAD.format(vmm=vmm, note=""))
            f.write(extra)
            f.write(f'exec {render_script(argv)} "$@"\n')
        os.chmod(path, 0o755)
    with open(os.path.join(bundle, LAUNCH_DIR, "firecracker.json"), "w") as f:
        json.dump(firecracker_config(vm, bundle_dir="."), f, indent=2)
        f.write("\n")


def _vm_json(
    image: Image,
    options: BuildOptions,
    kernel: KernelInfo,
    config: agentlib.AgentConfig | None,
    agent_sha: str | None,
    files: dict[str, dict[str, Any]],
    writer_options: Any,
) -> dict[str, Any]:
    rootfs_file = ROOTFS_FILES[options.fs]
    return {
        "format": BUNDLE_FORMAT,
        "vmimg": __version__,
        "arch": kernel.arch,
        "platform": str(image.platform),
        "source": {
            "reference": image.name,
            "digest": image.digest,
            "config_digest": image.config_digest,
        },
        "rootfs": {
            "file": rootfs_file,
            "type": options.fs,
            "read_only": options.fs == "erofs",
            "options": {
                k: v for k, v in options_doc(writer_options).items() if not isinstance(v, bytes)
            },
        },
        "kernel": {
            "file": KERNEL_FILE,
            "version": kernel.version,
            "config_version": kernel.config_version,
            "key": kernel.key,
            "user_supplied": kernel.user_supplied,
        },
        "init": (
            {"type": "agent", "path": agentlib.INIT_PATH, "protocol": 1, "sha256": agent_sha}
            if config is not None
            else {"type": "image"}
        ),
        "workload": (
            {
                "argv": config.argv,
                "env": config.env,
                "cwd": config.cwd,
                "uid": config.uid,
                "gid": config.gid,
            }
            if config is not None
            else None
        ),
        "cmdline": kernel_cmdline(
            options.fs, options.init, options.extra_cmdline, arch=kernel.arch
        ),
        "vcpus": options.vcpus,
        "memory_mib": options.memory_mib,
        "manifest": {"file": MANIFEST_FILE, "sha256": files[MANIFEST_FILE]["sha256"]},
        "files": files,
    }


def _assemble(
    image: Image,
    cache: Cache,
    options: BuildOptions,
    bk: BundleKey,
    work: str,
    progress: Callable[[int], None] | None,
    dest: str,
) -> list[str]:
    """Write every file of the bundle `dest` into `work`; returns warnings."""
    kernel, agent_sha = bk.kernel, bk.agent_sha
    tree = build_tree(image, cache, progress)
    writer_options = _writer_options(options, image)
    with ContentReader() as reader:
        manifest, config = _prepare_tree(image, tree, reader, options, kernel.arch)
        rootfs = os.path.join(work, ROOTFS_FILES[options.fs])
        fmt = "initramfs" if options.fs == "initramfs" else options.fs
        kernel_bytes = os.path.getsize(boot_kernel_file(kernel))
        need = output_size_floor(fmt, tree, writer_options) + kernel_bytes
        check_output_space(dest, need, os.path.dirname(os.path.abspath(work)))
        fd = os.open(rootfs, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            warnings = write_image(fmt, tree, reader, fd, writer_options)
        finally:
            os.close(fd)
    with open(os.path.join(work, MANIFEST_FILE), "wb") as f:
        f.write(manifest.to_bytes())
    shutil.copyfile(boot_kernel_file(kernel), os.path.join(work, KERNEL_FILE))
    files = {
        name: {
            "sha256": sha256_file(os.path.join(work, name)),
            "size": os.path.getsize(os.path.join(work, name)),
        }
        for name in sorted((ROOTFS_FILES[options.fs], KERNEL_FILE, MANIFEST_FILE))
    }
    vm = _vm_json(image, options, kernel, config, agent_sha, files, writer_options)
    vm["build_key"] = bk.key  # how registries' remote caches find this bundle
    with open(os.path.join(work, VM_JSON), "w") as f:
        json.dump(vm, f, indent=2, sort_keys=True)
        f.write("\n")
    _write_launchers(work, vm)
    return warnings


def _copy_tree(src: str, dst: str) -> None:
    for dirpath, _dirs, names in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in names:
            s, d = os.path.join(dirpath, name), os.path.join(dst, rel, name)
            fd = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                copy_file(s, fd)
            finally:
                os.close(fd)
            shutil.copymode(s, d)


def install_bundle_dir(work: str, dest: str) -> None:
    """Rename the finished bundle onto `dest`, replacing an older bundle there."""
    if os.path.lexists(dest):
        if not os.path.isfile(os.path.join(dest, VM_JSON)) and os.listdir(dest):
            raise UsageError(f"{dest} exists and is not a vmimg bundle; refusing to replace it")
        old = dest.rstrip("/") + f".old-{os.getpid()}"
        os.rename(dest, old)
        os.rename(work, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(work, dest)


@dataclass(frozen=True)
class BundleKey:
    """What a bundle is built from besides the image: its kernel and agent, and the key."""

    key: str
    kernel: KernelInfo
    agent_sha: str | None


def bundle_key_for(image: Image, options: BuildOptions, cache: Cache) -> BundleKey:
    """The kernel and agent `build_bundle` would use for `image`, and the bundle's key."""
    arch = _ARCH_OF_PLATFORM.get(image.platform.architecture, image.platform.architecture)
    kernel = resolve_kernel(arch, options.kernel_path, cache)
    agent_sha = sha256_file(agentlib.find_agent_binary(arch)) if options.init == "agent" else None
    return BundleKey(bundle_key(image, options, kernel, agent_sha), kernel, agent_sha)


def build_bundle(
    source: str,
    dest: str,
    options: BuildOptions,
    cache: Cache,
    source_options: SourceOptions,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> BuildResult:
    if options.fs not in FS_TYPES:
        raise UsageError(f"--fs must be one of {', '.join(FS_TYPES)}")
    start = time.monotonic()
    parent = os.path.dirname(os.path.abspath(dest)) or "."
    if not os.path.isdir(parent):
        raise VmimgError(f"output directory {parent} does not exist")
    image = open_image(source, cache, source_options)
    try:
        bk = bundle_key_for(image, options, cache)
        key = bk.key
        cached_dir = os.path.join(cache.output_dir(key), "bundle")
        hit = (
            use_cache
            and cache.pin(cache.output_dir(key))  # kept by `cache prune` while we copy it
            and os.path.isfile(os.path.join(cached_dir, VM_JSON))
        )
        warnings: list[str] = []
        work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest)}.")
        try:
            if hit:
                check_output_space(dest, disk_usage(cached_dir))
                os.rmdir(work)
                _copy_tree(cached_dir, work)
            else:
                warnings = _assemble(image, cache, options, bk, work, progress, dest)
                if use_cache:
                    _store(cache, key, work)
            with open(os.path.join(work, VM_JSON)) as f:
                files = json.load(f)["files"]
            install_bundle_dir(work, dest)
        except OSError as e:
            shutil.rmtree(work, ignore_errors=True)
            if e.errno in DISK_FULL_ERRNOS:
                raise WriterError(f"cannot write {dest}: {e.strerror}") from None
            raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return BuildResult(
            bundle=dest,
            image=image.name,
            digest=image.digest,
            platform=str(image.platform),
            fs=options.fs,
            cached=hit,
            seconds=time.monotonic() - start,
            files=files,
            warnings=warnings,
        )
    finally:
        image.close()


def _store(cache: Cache, key: str, work: str) -> None:
    final = cache.output_dir(key)
    if os.path.exists(os.path.join(final, "bundle", VM_JSON)):
        return
    if space_shortfall(cache.tmp_dir, disk_usage(work)) is not None:
        return  # a copy is worth less than the disk space everything else needs
    with cache.temp_dir("bundle-") as tmp:
        _copy_tree(work, os.path.join(tmp, "bundle"))
        with contextlib.suppress(OSError):  # another process stored it first
            commit(tmp, final)


def load_bundle(path: str) -> dict[str, Any]:
    """vm.json of a bundle directory, checked for the format we know."""
    vm_path = Path(path) / VM_JSON
    try:
        vm: dict[str, Any] = json.loads(vm_path.read_text())
    except FileNotFoundError:
        raise VmimgError(f"{path} is not a vmimg bundle (no {VM_JSON})") from None
    except ValueError as e:
        raise VmimgError(f"{vm_path} is not valid JSON: {e}") from None
    if vm.get("format") != BUNDLE_FORMAT:
        raise VmimgError(f"{vm_path}: bundle format {vm.get('format')!r} is not {BUNDLE_FORMAT}")
    return vm
