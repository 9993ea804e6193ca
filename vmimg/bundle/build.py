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
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmimg import __version__
from vmimg.arch import Arch
from vmimg.bundle.format import (
    BUNDLE_FORMAT,
    KERNEL_FILE,
    MANIFEST_FILE,
    VM_JSON,
    VmSpec,
    is_replaceable_bundle,
    parse_vm_json,
    read_vm_json,
)
from vmimg.digest import sha256_file
from vmimg.errors import UsageError, WriterError
from vmimg.guest import agent as agentlib
from vmimg.guest.cmdline import bundle_cmdline
from vmimg.guest.kernel import KernelInfo, find_or_build_kernel, kernel_from_path
from vmimg.guest.protocol import AGENT_PROTOCOL, INIT_PATH
from vmimg.image.cache import Cache, commit, disk_usage, space_shortfall
from vmimg.image.image import Image
from vmimg.image.sources import SourceOptions, open_image
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.convert import (
    build_tree,
    check_output_space,
    copy_file,
    output_size_floor,
    source_date_epoch_ns,
)
from vmimg.rootfs.tree import Node, NodeType, Tree
from vmimg.rootfs.writers import (
    BOOTABLE,
    WriterOptions,
    default_options,
    get_format,
    options_doc,
    seeded,
    write_image,
)

DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 256
LOST_FOUND = b"lost+found"
# Where the agent mounts the kernel's file systems, with the modes distributions give them.
MOUNT_POINTS = (
    (b"proc", 0o555),
    (b"sys", 0o555),
    (b"dev", 0o755),
    (b"run", 0o755),
    (b"tmp", 0o1777),
)
# Write failures of the destination's file system (rather than of what is read).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


Finisher = Callable[[str, VmSpec], None]


@dataclass(frozen=True)
class BuildOptions:
    """Everything `vmimg build` takes besides the source and the destination."""

    fs: str = "erofs"
    writer_options: WriterOptions | None = None  # the options of `fs`'s writer
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


def resolve_kernel(arch: str, kernel_path: str | None, cache: Cache) -> KernelInfo:
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


def _writer_options(options: BuildOptions, image: Image) -> WriterOptions:
    w = options.writer_options or default_options(options.fs)
    return seeded(w, image.config_digest.encode())


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


def boot_kernel_file(kernel: KernelInfo) -> Path:
    """The kernel file a bundle ships: x86_64's vmlinux (PVH, what every x86 VMM boots);
    for arm64 the `Image` (QEMU virt, Firecracker and Cloud Hypervisor boot it; an arm64
    vmlinux ELF would be loaded as a bare-metal program, without the Linux boot protocol)."""
    if kernel.arch == "x86_64" and kernel.vmlinux is not None:
        return kernel.vmlinux
    return kernel.image


def _vm_json(
    image: Image,
    options: BuildOptions,
    kernel: KernelInfo,
    config: agentlib.AgentConfig | None,
    agent_sha: str | None,
    files: dict[str, dict[str, Any]],
    writer_options: WriterOptions,
) -> dict[str, Any]:
    fmt = get_format(options.fs)
    arch = Arch.parse(kernel.arch) or Arch.X86_64
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
            "file": fmt.file_name(writer_options),
            "type": options.fs,
            "read_only": fmt.read_only,
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
            {"type": "agent", "path": INIT_PATH, "protocol": AGENT_PROTOCOL, "sha256": agent_sha}
            if config is not None
            else {"type": "image"}
        ),
        "workload": (
            {
                "argv": config.argv,
                "entrypoint": agentlib.command_parts(image.config.config, options.overrides)[0],
                "env": config.env,
                "cwd": config.cwd,
                "uid": config.uid,
                "gid": config.gid,
            }
            if config is not None
            else None
        ),
        "cmdline": bundle_cmdline(options.fs, options.init, arch, options.extra_cmdline),
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
    finish: Finisher | None,
) -> list[str]:
    """Write every file of the bundle `dest` into `work`; returns warnings."""
    kernel, agent_sha = bk.kernel, bk.agent_sha
    tree = build_tree(image, cache, progress)
    writer_options = _writer_options(options, image)
    with ContentReader() as reader:
        manifest, config = _prepare_tree(image, tree, reader, options, kernel.arch)
        rootfs_name = get_format(options.fs).file_name(writer_options)
        kernel_bytes = os.path.getsize(boot_kernel_file(kernel))
        need = output_size_floor(options.fs, tree, writer_options) + kernel_bytes
        check_output_space(dest, need, os.path.dirname(os.path.abspath(work)))
        fd = os.open(os.path.join(work, rootfs_name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            warnings = write_image(options.fs, tree, reader, fd, writer_options)
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
        for name in sorted((rootfs_name, KERNEL_FILE, MANIFEST_FILE))
    }
    vm = _vm_json(image, options, kernel, config, agent_sha, files, writer_options)
    vm["build_key"] = bk.key  # how registries' remote caches find this bundle
    data = (json.dumps(vm, indent=2, sort_keys=True) + "\n").encode()
    spec = parse_vm_json(data, VM_JSON)  # what we write must pass what every reader checks
    with open(os.path.join(work, VM_JSON), "wb") as f:
        f.write(data)
    if finish is not None:
        finish(work, spec)
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


def _current_umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def new_bundle_dir(dest: str) -> str:
    """An empty directory beside `dest` to assemble a bundle in, with the mode a directory
    made by the user would have (mkdtemp's is 0700 whatever the umask)."""
    parent = os.path.dirname(os.path.abspath(dest))
    check_destination(dest)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest.rstrip('/'))}.")
    os.chmod(work, 0o777 & ~_current_umask())
    return work


def check_destination(dest: str) -> None:
    """Refuse, before any work, an output that could not or must not be replaced:
    a missing parent, a symlink, a file, or a directory that is not only a vmimg bundle."""
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise UsageError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {parent} is not writable")
    if os.path.islink(dest):
        raise UsageError(f"{dest} is a symlink; refusing to replace it")
    if not os.path.lexists(dest):
        return
    if not os.path.isdir(dest):
        raise UsageError(f"{dest} exists and is not a directory; refusing to replace it")
    if os.listdir(dest) and not is_replaceable_bundle(dest):
        raise UsageError(
            f"{dest} exists and holds more than a vmimg bundle; refusing to replace it"
        )


def install_bundle_dir(work: str, dest: str) -> None:
    """Rename the finished bundle in `work` onto `dest`, replacing an older bundle (and
    nothing else) there; on any failure `dest` is left as it was."""
    check_destination(dest)
    if not os.path.lexists(dest):
        os.rename(work, dest)
        return
    old = os.path.join(
        os.path.dirname(os.path.abspath(dest)), f".{os.path.basename(dest)}.old-{os.getpid()}"
    )
    os.rename(dest, old)
    try:
        os.rename(work, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class BundleKey:
    """What a bundle is built from besides the image: its kernel and agent, and the key."""

    key: str
    kernel: KernelInfo
    agent_sha: str | None


def bundle_key_for(image: Image, options: BuildOptions, cache: Cache) -> BundleKey:
    """The kernel and agent `build_bundle` would use for `image`, and the bundle's key."""
    arch = Arch.parse(image.platform.architecture)
    if arch is None:
        raise UsageError(f"{image.name} is for {image.platform}; vmimg boots {', '.join(Arch)}")
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
    finish: Finisher | None = None,
) -> BuildResult:
    """Build the bundle of `source` at `dest`. `finish(dir, vm)` adds what the layers above
    add to a bundle (its launchers) before it is cached and installed."""
    if options.fs not in BOOTABLE:
        raise UsageError(f"--fs must be one of {', '.join(BOOTABLE)}")
    start = time.monotonic()
    check_destination(dest)
    with open_image(source, cache, source_options) as image:
        bk = bundle_key_for(image, options, cache)
        key = bk.key
        cached_dir = os.path.join(cache.output_dir(key), "bundle")
        hit = (
            use_cache
            and cache.pin(cache.output_dir(key))  # kept by `cache prune` while we copy it
            and os.path.isfile(os.path.join(cached_dir, VM_JSON))
        )
        warnings: list[str] = []
        work = new_bundle_dir(dest)
        try:
            if hit:
                check_output_space(dest, disk_usage(cached_dir))
                os.rmdir(work)
                _copy_tree(cached_dir, work)
            else:
                warnings = _assemble(image, cache, options, bk, work, progress, dest, finish)
                if use_cache:
                    _store(cache, key, work)
            files = dict(read_vm_json(work).doc["files"])
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
