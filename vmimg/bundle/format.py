"""The bundle format: what vm.json may say, which files a bundle may hold, and the check
that decides whether a bundle directory is fit to boot.

A bundle is untrusted input: it may come from a registry, a colleague or an attacker.
Everything that boots, pushes or pulls a bundle reads it through `load_bundle`, which
parses vm.json into typed objects and refuses anything outside the format:

- each role (kernel, root file system, manifest) names only its known file names, so no
  value in vm.json can point QEMU at a host path;
- every file the roles name is listed under `files` with its size and sha256, is a
  regular file directly in the bundle directory (no symlink, no special file), and has
  that size and hash before anything boots;
- numbers are numbers in sane ranges, strings are strings without control characters.

This module imports nothing above `rootfs/`: bundle building, booting and artifacts all
stand on it (docs/bundle.md describes the format for users).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmimg.arch import Arch
from vmimg.digest import is_sha256_hex, sha256_file
from vmimg.errors import BundleError, VerityError
from vmimg.rootfs.verity import ALGORITHM as VERITY_ALGORITHM
from vmimg.rootfs.verity import BLOCK_SIZE as VERITY_BLOCK
from vmimg.rootfs.verity import FORMAT_VERSION as VERITY_VERSION
from vmimg.rootfs.verity import VerityTree, check_root_hash, level_blocks
from vmimg.rootfs.writers import INITRAMFS_SUFFIX

BUNDLE_FORMAT = 1
VM_JSON = "vm.json"
KERNEL_FILE = "kernel"
MANIFEST_FILE = "manifest"
LAUNCH_DIR = "launch"
LAUNCH_FILES = ("cloud-hypervisor.sh", "firecracker.json", "qemu.sh")
FS_TYPES = ("erofs", "ext4", "initramfs")
# The name of the root file system's file, per type, as the writers' table gives it; an
# initramfs is named by its compression.
ROOTFS_FILES = {fs: f"rootfs.{fs}" for fs in ("erofs", "ext4")}
INITRAMFS_FILES = {c: "initramfs.cpio" + suffix for c, suffix in INITRAMFS_SUFFIX.items()}
ROOTFS_NAMES = frozenset([*ROOTFS_FILES.values(), *INITRAMFS_FILES.values()])
ROLE_NAMES = frozenset([KERNEL_FILE, MANIFEST_FILE, *ROOTFS_NAMES])
INIT_TYPES = ("agent", "image")

MAX_VM_JSON_BYTES = 1 << 20
MAX_CMDLINE_BYTES = 2048  # COMMAND_LINE_SIZE on x86_64 and arm64
MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 1 << 20
MAX_VCPUS = 256
MAX_STRING = 4096
MAX_LIST = 4096
MAX_BLOCKS = 1 << 38  # 1 PiB of 4 KiB blocks
MAX_PROTOCOL = 1 << 16


# -- typed vm.json -----------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle as vm.json lists it."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    reference: str
    digest: str
    config_digest: str


@dataclass(frozen=True)
class Verity:
    """The dm-verity hash tree appended to the root image (docs/bundle.md)."""

    root_hash: str  # hex: what the kernel checks the whole image against
    salt: str  # hex
    data_blocks: int
    hash_offset: int  # bytes: where the tree starts (the data's size)
    hash_blocks: int

    def tree(self) -> VerityTree:
        return VerityTree(
            self.root_hash, self.salt, self.data_blocks, self.hash_offset, self.hash_blocks
        )


@dataclass(frozen=True)
class Rootfs:
    file: str
    type: str  # one of FS_TYPES
    read_only: bool
    options: Mapping[str, Any] = field(default_factory=dict)
    verity: Verity | None = None


@dataclass(frozen=True)
class KernelSpec:
    file: str
    version: str
    config_version: int | None
    key: str
    user_supplied: bool


@dataclass(frozen=True)
class InitSpec:
    type: str  # "agent" or "image"
    sha256: str | None = None
    protocol: int = 1  # what the agent understands (guest/protocol.py AGENT_PROTOCOL)


@dataclass(frozen=True)
class Workload:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    entrypoint: tuple[str, ...] | None = None  # argv's first items; None in older bundles


@dataclass(frozen=True)
class VmSpec:
    """vm.json, parsed and checked. `doc` keeps the document as read, for display."""

    arch: Arch
    platform: str
    source: Source
    rootfs: Rootfs
    kernel: KernelSpec
    init: InitSpec
    workload: Workload | None
    cmdline: str
    vcpus: int
    memory_mib: int
    manifest_sha256: str
    files: Mapping[str, FileEntry]
    build_key: str | None
    vmimg: str
    doc: Mapping[str, Any]


# -- parsing -------------------------------------------------------------------------


class _Reader:
    """Typed access to one JSON object, with errors that name the field and the file."""

    def __init__(self, obj: object, where: str, path: str) -> None:
        if not isinstance(obj, dict):
            raise BundleError(f"{where}: {path or 'the document'} must be an object")
        self.obj: dict[str, Any] = obj
        self.where = where
        self.path = path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, what: str) -> BundleError:
        return BundleError(f"{self.where}: {self._name(key)} {what}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def sub(self, key: str) -> _Reader:
        return _Reader(self.obj.get(key), self.where, self._name(key))

    def string(self, key: str, default: str | None = None) -> str:
        value = self.obj.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        _check_text(value, self, key)
        return value

    def integer(self, key: str, low: int, high: int, default: int | None = None) -> int:
        value = self.obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "must be an integer")
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low} and {high}, not {value}")
        return value

    def boolean(self, key: str, default: bool | None = None) -> bool:
        value = self.obj.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.obj.get(key)
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise self.fail(key, f"must be a list of at most {MAX_LIST} strings")
        for item in value:
            if not isinstance(item, str):
                raise self.fail(key, "must be a list of strings")
            _check_text(item, self, key)
        return tuple(value)

    def choice(self, key: str, choices: tuple[str, ...] | frozenset[str]) -> str:
        value = self.string(key)
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(sorted(choices))}, not {value!r}")
        return value


def _check_text(value: str, r: _Reader, key: str) -> None:
    if len(value) > MAX_STRING:
        raise r.fail(key, f"is longer than {MAX_STRING} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise r.fail(key, "holds control characters")


def _parse_files(r: _Reader) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for name in r.obj:
        if not isinstance(name, str) or name not in ROLE_NAMES:
            raise r.fail(repr(name)[:80], "is not a file a bundle may hold")
        entry = r.sub(name)
        sha = entry.string("sha256")
        if not is_sha256_hex(sha):
            raise entry.fail("sha256", "must be 64 lower-case hex digits")
        files[name] = FileEntry(name, entry.integer("size", 0, 1 << 50), sha)
    return files


def _parse_verity(r: _Reader) -> Verity:
    for key in ("root_hash", "salt"):
        if not is_sha256_hex(r.string(key)):
            raise r.fail(key, "must be 64 lower-case hex digits")
    r.choice("algorithm", frozenset([VERITY_ALGORITHM]))
    for key in ("data_block_size", "hash_block_size"):
        if r.integer(key, VERITY_BLOCK, VERITY_BLOCK) != VERITY_BLOCK:
            raise r.fail(key, f"must be {VERITY_BLOCK}")
    r.integer("version", VERITY_VERSION, VERITY_VERSION)
    data_blocks = r.integer("data_blocks", 1, MAX_BLOCKS)
    hash_offset = r.integer("hash_offset", VERITY_BLOCK, MAX_BLOCKS * VERITY_BLOCK)
    if hash_offset != data_blocks * VERITY_BLOCK:
        raise r.fail("hash_offset", "must be data_blocks × 4096 (the tree follows the data)")
    hash_blocks = r.integer("hash_blocks", 0, MAX_BLOCKS)
    if hash_blocks != sum(level_blocks(data_blocks)):
        raise r.fail("hash_blocks", f"does not fit {data_blocks} data blocks")
    return Verity(r.string("root_hash"), r.string("salt"), data_blocks, hash_offset, hash_blocks)


def _parse_rootfs(r: _Reader) -> Rootfs:
    fs = r.choice("type", FS_TYPES)
    allowed = INITRAMFS_FILES.values() if fs == "initramfs" else (ROOTFS_FILES[fs],)
    name = r.choice("file", frozenset(allowed))
    options = r.obj.get("options") or {}
    if not isinstance(options, dict):
        raise r.fail("options", "must be an object")
    read_only = r.boolean("read_only", False)
    verity = _parse_verity(r.sub("verity")) if r.has("verity") else None
    if verity is not None and (fs == "initramfs" or not read_only):
        raise r.fail("verity", "needs a read-only erofs or ext4 root")
    return Rootfs(name, fs, read_only, options, verity)


def _parse_kernel(r: _Reader) -> KernelSpec:
    config_version = r.obj.get("config_version")
    if config_version is not None:
        config_version = r.integer("config_version", 0, 1 << 31)
    return KernelSpec(
        file=r.choice("file", frozenset([KERNEL_FILE])),
        version=r.string("version", ""),
        config_version=config_version,
        key=r.string("key", ""),
        user_supplied=r.boolean("user_supplied", False),
    )


def _parse_init(r: _Reader) -> InitSpec:
    kind = r.choice("type", INIT_TYPES)
    sha = r.string("sha256") if r.has("sha256") else None
    if sha is not None and not is_sha256_hex(sha):
        raise r.fail("sha256", "must be 64 lower-case hex digits")
    protocol = r.integer("protocol", 1, MAX_PROTOCOL) if r.has("protocol") else 1
    return InitSpec(kind, sha, protocol)


MAX_ID = (1 << 32) - 2  # the largest uid/gid Linux accepts ((uid_t)-1 means "unchanged")


def _parse_workload(r: _Reader) -> Workload:
    argv = r.strings("argv")
    entrypoint = r.strings("entrypoint") if r.has("entrypoint") else None
    if entrypoint is not None and argv[: len(entrypoint)] != entrypoint:
        raise r.fail("entrypoint", "must be the first items of argv")
    return Workload(
        argv=argv,
        env=r.strings("env"),
        cwd=r.string("cwd", "/"),
        uid=r.integer("uid", 0, MAX_ID, 0),
        gid=r.integer("gid", 0, MAX_ID, 0),
        entrypoint=entrypoint,
    )


def parse_vm_json(data: bytes, where: str) -> VmSpec:
    """vm.json's bytes as a checked VmSpec; BundleError naming the field otherwise."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{where}: not valid JSON: {str(e)[:200]}") from None
    r = _Reader(doc, where, "")
    if doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where}: bundle format {doc.get('format')!r} is not {BUNDLE_FORMAT}")
    arch = Arch.parse(r.string("arch", Arch.X86_64))
    if arch is None:
        raise r.fail("arch", f"must be one of {', '.join(Arch)}")
    rootfs = _parse_rootfs(r.sub("rootfs"))
    kernel = _parse_kernel(r.sub("kernel"))
    manifest = r.sub("manifest")
    manifest.choice("file", frozenset([MANIFEST_FILE]))
    files = _parse_files(r.sub("files"))
    for role, name in (("rootfs.file", rootfs.file), ("kernel.file", kernel.file)):
        if name not in files:
            raise BundleError(f"{where}: {role} names {name}, which files does not list")
    if MANIFEST_FILE not in files or files[MANIFEST_FILE].sha256 != manifest.string("sha256"):
        raise BundleError(f"{where}: manifest.sha256 does not match files.{MANIFEST_FILE}")
    cmdline = r.string("cmdline")
    if len(cmdline.encode()) > MAX_CMDLINE_BYTES:
        raise r.fail("cmdline", f"is longer than {MAX_CMDLINE_BYTES} bytes")
    if rootfs.verity is not None:
        rootfs_entry = files[rootfs.file]
        tree = rootfs.verity.tree()
        if rootfs_entry.size != tree.data_size + tree.hash_size:
            raise BundleError(f"{where}: {rootfs.file}'s size does not fit its verity tree")
        if tree.dm_create_param() not in cmdline:
            raise r.fail("cmdline", "does not map the root through its verity tree")
    source = r.sub("source")
    build_key = r.string("build_key") if r.has("build_key") else None
    if build_key is not None and not is_sha256_hex(build_key):
        raise r.fail("build_key", "must be 64 lower-case hex digits")
    return VmSpec(
        arch=arch,
        platform=r.string("platform", ""),
        source=Source(
            source.string("reference", ""),
            source.string("digest", ""),
            source.string("config_digest", ""),
        ),
        rootfs=rootfs,
        kernel=kernel,
        init=_parse_init(r.sub("init")),
        workload=_parse_workload(r.sub("workload")) if r.has("workload") else None,
        cmdline=cmdline,
        vcpus=r.integer("vcpus", 1, MAX_VCPUS),
        memory_mib=r.integer("memory_mib", MIN_MEMORY_MIB, MAX_MEMORY_MIB),
        manifest_sha256=files[MANIFEST_FILE].sha256,
        files=files,
        build_key=build_key,
        vmimg=r.string("vmimg", ""),
        doc=doc,
    )


# -- bundle directories --------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose vm.json parsed, and whose files were checked if asked."""

    dir: str
    vm: VmSpec

    def path(self, name: str) -> str:
        """The host path of one of the bundle's listed files (never anything else)."""
        if name not in self.vm.files and name != VM_JSON:
            raise BundleError(f"{self.dir}: {name} is not a file of this bundle")
        return os.path.join(self.dir, name)

    def path_of(self, name: str) -> str:
        """The host path of any name `bundle_file_names` allows (launch/ files too)."""
        if name not in bundle_file_names(self.vm):
            raise BundleError(f"{self.dir}: {name} is not a file of a vmimg bundle")
        return os.path.join(self.dir, name)

    @property
    def kernel_path(self) -> str:
        return self.path(self.vm.kernel.file)

    @property
    def rootfs_path(self) -> str:
        return self.path(self.vm.rootfs.file)

    @property
    def manifest_path(self) -> str:
        return self.path(MANIFEST_FILE)


def _read_regular(path: str, limit: int, what: str) -> bytes:
    """A regular file's bytes (not through a symlink), at most `limit` of them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BundleError(f"{what} is missing") from None
    except OSError as e:
        raise BundleError(f"{what}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{what} is not a regular file")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BundleError(f"{what} is larger than {limit} bytes")
    return data


def read_vm_json(bundle_dir: str) -> VmSpec:
    """Parse a bundle directory's vm.json (files are not checked)."""
    if not os.path.isdir(bundle_dir):
        if os.path.lexists(bundle_dir):
            raise BundleError(f"{bundle_dir} is not a vmimg bundle (not a directory)")
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    path = os.path.join(bundle_dir, VM_JSON)
    if not os.path.lexists(path):
        raise BundleError(f"{bundle_dir} is not a vmimg bundle (no {VM_JSON})")
    return parse_vm_json(_read_regular(path, MAX_VM_JSON_BYTES, path), path)


def check_file(bundle_dir: str, entry: FileEntry) -> None:
    """One listed file: a regular file (no symlink, no device) of the listed size and hash."""
    path = os.path.join(bundle_dir, entry.name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: {entry.name} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{bundle_dir}: {entry.name} is not a regular file")
    if st.st_size != entry.size:
        raise BundleError(
            f"{bundle_dir}: {entry.name} has {st.st_size} bytes; vm.json says {entry.size}"
        )
    try:
        got = sha256_file(path, follow_symlinks=False)
    except OSError as e:
        raise BundleError(f"{bundle_dir}: {entry.name}: {e.strerror or e}") from None
    if got != entry.sha256:
        raise BundleError(f"{bundle_dir}: {entry.name} does not match the sha256 in vm.json")


def load_bundle(bundle_dir: str, check_files: bool = True) -> Bundle:
    """The bundle at `bundle_dir`, with vm.json checked and, unless told otherwise, every
    listed file checked against its size and sha256. BundleError on anything amiss."""
    vm = read_vm_json(bundle_dir)
    if check_files:
        for entry in vm.files.values():
            check_file(bundle_dir, entry)
        check_verity(bundle_dir, vm)
    return Bundle(bundle_dir, vm)


def check_verity(bundle_dir: str, vm: VmSpec) -> None:
    """A verity root's stored tree hashes to the root hash vm.json records (and the
    command line passes the kernel): O(1), the kernel checks the rest as it reads."""
    if vm.rootfs.verity is None:
        return
    try:
        check_root_hash(os.path.join(bundle_dir, vm.rootfs.file), vm.rootfs.verity.tree())
    except VerityError as e:
        raise BundleError(f"{bundle_dir}: {e}") from None


def bundle_file_names(vm: VmSpec) -> list[str]:
    """Every relative path a bundle with this vm.json may hold, in name order."""
    names = [VM_JSON, *vm.files, *(f"{LAUNCH_DIR}/{n}" for n in LAUNCH_FILES)]
    return sorted(names, key=lambda n: n.encode())


def is_replaceable_bundle(path: str) -> bool:
    """Whether `path` is a directory that holds a vmimg bundle and nothing else, so that an
    output (`-o`) may replace it. A symlink, a file or a directory with anything else in it
    is not."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        vm = read_vm_json(path)
    except BundleError:
        return False
    allowed = set(bundle_file_names(vm))
    for dirpath, dirs, names in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        for d in dirs:
            if (rel, d) != (".", LAUNCH_DIR) or os.path.islink(os.path.join(dirpath, d)):
                return False
        for n in names:
            name = n if rel == "." else f"{rel}/{n}"
            full = os.path.join(dirpath, n)
            if name not in allowed or not stat.S_ISREG(os.lstat(full).st_mode):
                return False
    return True


def record_rootfs_change(bundle: Bundle) -> None:
    """After a run that kept the guest's writes in the root file system (`--persist`),
    record its new size and sha256 in vm.json, so the bundle still loads. Only the
    bundle's own root file and vm.json are written."""
    entry = bundle.vm.files[bundle.vm.rootfs.file]
    path = bundle.rootfs_path
    new = FileEntry(entry.name, os.lstat(path).st_size, sha256_file(path, follow_symlinks=False))
    if new == entry:
        return
    doc = json.loads(json.dumps(bundle.vm.doc))
    doc["files"][entry.name] = {"sha256": new.sha256, "size": new.size}
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    parse_vm_json(data, VM_JSON)
    tmp = os.path.join(bundle.dir, f".{VM_JSON}.{os.getpid()}")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(bundle.dir, VM_JSON))
