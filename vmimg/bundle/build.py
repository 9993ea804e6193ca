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
are cached by everything that determines their bytes. A cached bundle is handed
out without copying its big files where it can (rootfs.handout.share_file): the
kernel, the manifest and a read-only root (erofs, or any root with a dm-verity tree)
may be hardlinks to the cache's read-only entries; a writable ext4 root is cloned
or copied, since `vmimg run --persist` writes to it in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
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
from vmimg.guest.kernel import (
    KERNEL_BUILD_PHASE,
    KernelInfo,
    ProgressFn,
    find_or_build_kernel,
    kernel_from_path,
)
from vmimg.guest.protocol import AGENT_PROTOCOL, INIT_PATH
from vmimg.image.cache import Cache, commit
from vmimg.image.fetch import BYTES, PhaseStart
from vmimg.image.fsutil import disk_usage, space_shortfall
from vmimg.image.image import Image
from vmimg.image.sources import SourceOptions, open_image
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.convert import (
    build_tree,
    output_size_floor,
    source_date_epoch_ns,
    track_phase,
    usable_entry,
    writing_phase,
)
from vmimg.rootfs.handout import HARDLINK, check_output_space, seal_entry, share_file
from vmimg.rootfs.tree import Node, NodeType, Tree
from vmimg.rootfs.verity import VerityTree, append_hash_tree
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
# Modes before the umask, as open() and mkdir() give them: the user's umask decides.
FILE_MODE = 0o666
EXECUTABLE_MODE = DIR_MODE = 0o777
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
    # A dm-verity tree over the root (docs/bundle.md): None means the default, on for erofs;
    # on for ext4 makes the ext4 root read-only (the agent lays a tmpfs overlay over it).
    verity: bool | None = None

    @property
    def use_verity(self) -> bool:
        return self.fs == "erofs" if self.verity is None else self.verity


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
    # A cache hit: how the root file system reached the bundle (REFLINK, HARDLINK, COPY).
    handed_out: str | None = None


MANIFEST_PHASE = "hashing files for the manifest"


def resolve_kernel(
    arch: str, kernel_path: str | None, cache: Cache, phases: PhaseStart | None = None
) -> KernelInfo:
    if kernel_path:
        return kernel_from_path(kernel_path, arch)
    kernel = find_or_build_kernel(arch, cache_dir=cache.root, progress=_kernel_progress(phases))
    while not cache.pin(kernel.directory):  # pruned as we looked: build it again
        kernel = find_or_build_kernel(arch, cache_dir=cache.root, progress=_kernel_progress(phases))
    return kernel


def _kernel_progress(phases: PhaseStart | None) -> ProgressFn | None:
    """The kernel build's progress as a phase, opened when a build really starts."""
    if phases is None:
        return None
    tick: Callable[[int], None] | None = None

    def on_output(_elapsed: float, _line: str) -> None:
        nonlocal tick
        if tick is None:
            tick = phases(KERNEL_BUILD_PHASE, None, BYTES)
        tick(0)

    return on_output


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
    image: Image,
    tree: Tree,
    reader: ContentReader,
    options: BuildOptions,
    arch: str,
    phases: PhaseStart | None = None,
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
    track_phase(reader, phases, MANIFEST_PHASE, tree)
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
    if kernel.arch == Arch.X86_64 and kernel.vmlinux is not None:
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
    verity: VerityTree | None,
) -> dict[str, Any]:
    fmt = get_format(options.fs)
    arch = Arch.parse(kernel.arch) or Arch.X86_64
    read_only = fmt.read_only or verity is not None
    rootfs: dict[str, Any] = {
        "file": fmt.file_name(writer_options),
        "type": options.fs,
        "read_only": read_only,
        "options": {
            k: v for k, v in options_doc(writer_options).items() if not isinstance(v, bytes)
        },
    }
    if verity is not None:
        rootfs["verity"] = dataclasses.asdict(verity)
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
        "rootfs": rootfs,
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
        "cmdline": bundle_cmdline(
            options.fs, options.init, arch, options.extra_cmdline, verity, rw=not read_only
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
    phases: PhaseStart | None,
    dest: str,
    finish: Finisher | None,
) -> list[str]:
    """Write every file of the bundle `dest` into `work`; returns warnings."""
    kernel, agent_sha = bk.kernel, bk.agent_sha
    tree = build_tree(image, cache, phases)
    writer_options = _writer_options(options, image)
    with ContentReader() as reader:
        manifest, config = _prepare_tree(image, tree, reader, options, kernel.arch, phases)
        track_phase(reader, phases, writing_phase(options.fs), tree)
        rootfs_name = get_format(options.fs).file_name(writer_options)
        kernel_bytes = os.path.getsize(boot_kernel_file(kernel))
        need = output_size_floor(options.fs, tree, writer_options) + kernel_bytes
        check_output_space(dest, need, os.path.dirname(os.path.abspath(work)))
        fd = os.open(os.path.join(work, rootfs_name), os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            warnings = write_image(options.fs, tree, reader, fd, writer_options)
        finally:
            os.close(fd)
    verity = None
    if options.use_verity:
        if options.fs == "initramfs":
            raise UsageError("--verity needs a block-device root: --fs erofs or ext4")
        verity = append_hash_tree(os.path.join(work, rootfs_name), verity_salt(image.config_digest))
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
    vm = _vm_json(image, options, kernel, config, agent_sha, files, writer_options, verity)
    vm["build_key"] = bk.key  # how registries' remote caches find this bundle
    data = (json.dumps(vm, indent=2, sort_keys=True) + "\n").encode()
    spec = parse_vm_json(data, VM_JSON)  # what we write must pass what every reader checks
    with open(os.path.join(work, VM_JSON), "wb") as f:
        f.write(data)
    if finish is not None:
        finish(work, spec)
    return warnings


def verity_salt(config_digest: str) -> bytes:
    """The dm-verity salt of a root: derived from the image's config digest, as the writers'
    seeds are, so the same image gives the same bytes whichever transport it came through."""
    return hashlib.sha256(b"vmimg dm-verity salt\0" + config_digest.encode()).digest()


def linkable_files(vm: VmSpec) -> set[str]:
    """The files of a bundle nothing writes in place: the kernel, the manifest, and the
    root when it is read-only (`vmimg run --persist` writes a read-write ext4 root)."""
    names = {vm.kernel.file, MANIFEST_FILE}
    if vm.rootfs.read_only or vm.rootfs.verity is not None:
        names.add(vm.rootfs.file)
    return names


def _share_tree(src: str, dst: str, linkable: set[str]) -> dict[str, str]:
    """Make `dst` a tree with the files of `src` (share_file for each: a file named in
    `linkable` may become a hardlink); how each file got there, by its relative path.
    A copy or a clone gets the mode a file this process made would have (the umask's,
    executables staying so): the cache's copy has the modes of whoever built it first."""
    umask = current_umask()
    how: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in names:
            s, d = os.path.join(dirpath, name), os.path.join(dst, rel, name)
            key = os.path.normpath(os.path.join(rel, name))
            how[key] = share_file(s, d, key in linkable)
            if how[key] != HARDLINK:
                executable = os.stat(s).st_mode & stat.S_IXUSR
                os.chmod(d, (EXECUTABLE_MODE if executable else FILE_MODE) & ~umask)
    return how


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def new_bundle_dir(dest: str) -> str:
    """An empty directory beside `dest` to assemble a bundle in, with the mode a directory
    made by the user would have (mkdtemp's is 0700 whatever the umask)."""
    parent = os.path.dirname(os.path.abspath(dest))
    check_destination(dest)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest.rstrip('/'))}.")
    os.chmod(work, DIR_MODE & ~current_umask())
    return work


def check_destination(dest: str) -> None:
    """Refuse, before any work, an output that could not or must not be replaced:
    a missing parent, a symlink, a file, or a directory that is not only a vmimg bundle."""
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise UsageError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {parent} is not writable")
    _probe_writable(parent)
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


def _probe_writable(parent: str) -> None:
    """Make and remove a directory in `parent`: what access() cannot tell (a read-only
    mount, a file system that refuses even root, a full inode table) shows now."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".vmimg-probe-"))
    except OSError as e:
        raise UsageError(f"output directory {parent} is not writable: {e.strerror}") from None


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


def bundle_key_for(
    image: Image, options: BuildOptions, cache: Cache, phases: PhaseStart | None = None
) -> BundleKey:
    """The kernel and agent `build_bundle` would use for `image`, and the bundle's key."""
    arch = Arch.parse(image.platform.architecture)
    if arch is None:
        raise UsageError(f"{image.name} is for {image.platform}; vmimg boots {', '.join(Arch)}")
    kernel = resolve_kernel(arch, options.kernel_path, cache, phases)
    agent_sha = sha256_file(agentlib.find_agent_binary(arch)) if options.init == "agent" else None
    return BundleKey(bundle_key(image, options, kernel, agent_sha), kernel, agent_sha)


def build_bundle(
    source: str,
    dest: str,
    options: BuildOptions,
    cache: Cache,
    source_options: SourceOptions,
    use_cache: bool = True,
    phases: PhaseStart | None = None,
    finish: Finisher | None = None,
) -> BuildResult:
    """Build the bundle of `source` at `dest`. `finish(dir, vm)` adds what the layers above
    add to a bundle (its launchers) before it is cached and installed."""
    if options.fs not in BOOTABLE:
        raise UsageError(f"--fs must be one of {', '.join(BOOTABLE)}")
    start = time.monotonic()
    check_destination(dest)
    with open_image(source, cache, source_options) as image:
        bk = bundle_key_for(image, options, cache, phases)
        key = bk.key
        cached_dir = os.path.join(cache.output_dir(key), "bundle")
        hit = (
            use_cache
            and cache.pin(cache.output_dir(key))  # kept by `cache prune` while we copy it
            and os.path.isfile(os.path.join(cached_dir, VM_JSON))
            and usable_entry(cache, cache.output_dir(key))
        )
        warnings: list[str] = []
        handed_out = None
        work = new_bundle_dir(dest)
        try:
            if hit:
                cached_vm = read_vm_json(cached_dir)
                os.rmdir(work)
                how = _share_tree(cached_dir, work, linkable_files(cached_vm))
                handed_out = how[cached_vm.rootfs.file]
            else:
                warnings = _assemble(image, cache, options, bk, work, phases, dest, finish)
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
            handed_out=handed_out,
        )


def _store(cache: Cache, key: str, work: str) -> None:
    final = cache.output_dir(key)
    if os.path.exists(os.path.join(final, "bundle", VM_JSON)):
        return
    if space_shortfall(cache.tmp_dir, disk_usage(work)) is not None:
        return  # a copy is worth less than the disk space everything else needs
    with cache.temp_dir("bundle-") as tmp:
        entry = os.path.join(tmp, "bundle")
        # The new bundle's read-only files become the entry's (their write bits go).
        _share_tree(work, entry, linkable_files(read_vm_json(work)))
        seal_entry(tmp)
        with contextlib.suppress(OSError):  # another process stored it first
            commit(tmp, final)
