"""vmimg's guest kernel: built from kernels/ fragments, cached by what it was built from.

    $VMIMG_CACHE/kernels/
      <key>/                    one finished build (appears only by an atomic rename)
        kernel.json             metadata (format in docs/kernel.md)
        vmlinux                 uncompressed ELF: PVH boot (QEMU microvm, Firecracker)
        bzImage | Image         the compressed x86_64 image | the arm64 image
        config                  the final .config
        build.log               make's output
      sources/<id>/             an extracted source tarball, shared by builds
      sources/<id>.stat         (size, mtime, inode) of the tarball that was hashed
      logs/<key>.log            the log of the build under way or the last failed one

The key hashes the source identity (the tarball's sha256, or a digest of a
source directory's file list), the content of every fragment used, the arch and
the debug flag. Fragments are merged onto `make allnoconfig`, `make olddefconfig`
fills in the rest, and every requested option is then checked against the final
.config: an option that did not survive (a missing dependency, a renamed symbol)
fails the build with its name instead of producing a kernel without it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vmimg.arch import ARCHES, Arch
from vmimg.digest import is_sha256_hex, sha256_file, split_digest
from vmimg.errors import KernelError
from vmimg.image.cache import Cache, commit

# kernels/ beside the package in a source checkout; VMIMG_KERNELS_DIR elsewhere (the image).
FRAGMENTS_DIR = Path(
    os.environ.get("VMIMG_KERNELS_DIR") or Path(__file__).resolve().parents[2] / "kernels"
)
PIN_FILE = "kernel.toml"
METADATA_FILE = "kernel.json"
METADATA_FORMAT = 1
# Bump when the build recipe in this module changes what a key produces.
BUILDER_VERSION = 1
DEFAULT_NICE = 10
LOG_TAIL_LINES = 40

# One block of config text is `CONFIG_NAME=value` or `# CONFIG_NAME is not set`.
_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
UNSET = "n"  # how a "# ... is not set" line is represented in a parsed config


@dataclass(frozen=True)
class KernelPin:
    """kernels/kernel.toml: the kernel we target and our config's version."""

    version: str
    default_source: str
    config_version: int


@dataclass
class KernelInfo:
    """A kernel vmimg can boot: a cached build or one the user supplied."""

    key: str
    arch: str
    version: str  # kernel version, "" if unknown (some user-supplied images)
    config_version: int | None  # our fragments' version; None for user kernels
    image: Path  # what to pass to -kernel: bzImage / Image, or the user's file
    vmlinux: Path | None  # the ELF for PVH boot, when there is one
    config: Path | None
    user_supplied: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.image.parent


@dataclass(frozen=True)
class Mismatch:
    """A requested option whose final value differs."""

    option: str
    wanted: str
    got: str  # UNSET when absent or "is not set"

    def __str__(self) -> str:
        return f"{self.option}: wanted {self.wanted}, got {self.got}"


class KernelBuildError(KernelError):
    """make failed; carries the log's path and its last lines for the user."""

    def __init__(self, message: str, log_path: Path, log_tail: list[str]) -> None:
        super().__init__(message)
        self.log_path = log_path
        self.log_tail = log_tail


# -- config fragments ----------------------------------------------------------


def parse_config(text: str, name: str = "config") -> dict[str, str]:
    """Options set in a .config or fragment: {"CONFIG_X": "y" | value | UNSET}.

    Comments and blank lines are skipped; any other line is an error naming
    `name` and the line number. A later line for the same option wins.
    """
    options: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        m = _SET_RE.match(line)
        if m:
            options[m.group(1)] = m.group(2)
            continue
        m = _UNSET_RE.match(line)
        if m:
            options[m.group(1)] = UNSET
            continue
        if line and not line.startswith("#"):
            raise KernelError(f"{name}:{lineno}: not a config line: {line!r}")
    return options


def merge_fragments(fragments: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Merge (name, text) fragments in order; a later fragment overrides an earlier one,
    as the kernel's merge_config.sh does."""
    merged: dict[str, str] = {}
    for name, text in fragments:
        merged.update(parse_config(text, name))
    return merged


def render_fragment(options: dict[str, str]) -> str:
    """Options back as config text (for KCONFIG_ALLCONFIG)."""
    lines = []
    for opt, value in options.items():
        lines.append(f"# {opt} is not set" if value == UNSET else f"{opt}={value}")
    return "\n".join(lines) + "\n"


def check_config(requested: dict[str, str], final: dict[str, str]) -> list[Mismatch]:
    """Every requested option whose value in the final config differs, in request order."""
    out = []
    for opt, wanted in requested.items():
        got = final.get(opt, UNSET)
        if got != wanted:
            out.append(Mismatch(opt, wanted, got))
    return out


def require_config(requested: dict[str, str], final: dict[str, str], what: str) -> None:
    """KernelError listing every requested option that did not make it into `what`."""
    bad = check_config(requested, final)
    if bad:
        listed = "; ".join(str(m) for m in bad)
        raise KernelError(f"{len(bad)} requested option(s) did not make it into {what}: {listed}")


def fragment_names(arch: str, debug: bool) -> list[str]:
    names = ["common.config", f"{arch_spec(arch).value}.config"]
    if debug:
        names.append("debug.config")
    return names


def read_fragments(
    arch: str, debug: bool, directory: Path = FRAGMENTS_DIR
) -> list[tuple[str, str]]:
    out = []
    for name in fragment_names(arch, debug):
        path = directory / name
        try:
            out.append((name, path.read_text()))
        except OSError as e:
            raise KernelError(f"cannot read kernel config fragment {path}: {e.strerror}") from e
    return out


def read_pin(directory: Path = FRAGMENTS_DIR) -> KernelPin:
    path = directory / PIN_FILE
    try:
        data = tomllib.loads(path.read_text())["kernel"]
        return KernelPin(
            version=str(data["version"]),
            default_source=str(data["default_source"]),
            config_version=int(data["config_version"]),
        )
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as e:
        raise KernelError(f"cannot read kernel pin file {path}: {e}") from e


def arch_spec(arch: str) -> Arch:
    """The Arch of a kernel-vocabulary name (x86_64, arm64); KernelError for any other."""
    known = Arch.from_kernel(arch)
    if known is None:
        raise KernelError(f"unsupported kernel arch {arch!r} (have {', '.join(ARCHES)})")
    return known


# -- sources -------------------------------------------------------------------


def _stat_token(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}"


def source_identity(source: Path, kernels_dir: Path) -> str:
    """A hex digest naming what `source` holds.

    A tarball is named by its sha256, remembered next to its stat so a second
    build does not hash 130 MB again. A directory is named by a digest of every
    file's relative path, size and mtime (cheap, and changes with any edit).
    """
    if source.is_dir():
        h = hashlib.sha256()
        for dirpath, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                rel = os.path.relpath(full, source)
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    try:
        st = source.stat()
    except OSError as e:
        raise KernelError(f"kernel source {source}: {e.strerror}") from e
    memo = (
        kernels_dir / "sources" / (hashlib.sha256(str(source).encode()).hexdigest()[:16] + ".stat")
    )
    token = _stat_token(st)
    with contextlib.suppress(OSError, ValueError):
        saved_token, digest = memo.read_text().split()
        if saved_token == token:
            return digest
    digest = sha256_file(source)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{token} {digest}\n")
    os.replace(tmp, memo)
    return digest


def kernel_version_of(srctree: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL[EXTRAVERSION] from the top Makefile."""
    fields: dict[str, str] = {}
    try:
        with open(srctree / "Makefile") as f:
            for line in f:
                m = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(\S*)", line)
                if m:
                    fields[m.group(1)] = m.group(2)
                if len(fields) == 4:
                    break
    except OSError as e:
        raise KernelError(f"{srctree} is not a kernel source tree: {e.strerror}") from e
    if "VERSION" not in fields or "PATCHLEVEL" not in fields:
        raise KernelError(f"{srctree}/Makefile has no VERSION/PATCHLEVEL")
    version = f"{fields['VERSION']}.{fields['PATCHLEVEL']}"
    if fields.get("SUBLEVEL"):
        version += f".{fields['SUBLEVEL']}"
    return version + fields.get("EXTRAVERSION", "")


def extract_source(tarball: Path, source_id: str, cache: Cache) -> Path:
    """The tarball's tree under kernels/sources/<id>, extracted once (locked, atomic), and
    pinned in `cache` (so that `vmimg cache prune --all` leaves it while a build reads it)."""
    final = Path(cache.root) / "kernels" / "sources" / source_id[:16]
    while not ((final / "Makefile").exists() and cache.pin(final)):
        with cache.lock(f"kernel-source-{source_id[:16]}"):
            if (final / "Makefile").exists():
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(cache.new_temp_dir("ksrc-"))
            try:
                # tar(1) is several times faster than tarfile on a 130 MB .xz.
                proc = subprocess.run(
                    ["tar", "-xf", str(tarball), "-C", str(tmp)], capture_output=True, text=True
                )
                if proc.returncode != 0:
                    raise KernelError(f"cannot extract {tarball}: {proc.stderr.strip()[-300:]}")
                tops = [p for p in tmp.iterdir() if p.is_dir()]
                if len(tops) != 1 or not (tops[0] / "Makefile").exists():
                    raise KernelError(f"{tarball} does not hold one kernel source directory")
                if final.exists():  # what an interrupted removal left: replace it
                    shutil.rmtree(final)
                commit(str(tops[0]), str(final))
            finally:
                cache.remove_temp(tmp)
    return final


# -- building ------------------------------------------------------------------


def build_key(source_id: str, fragments: list[tuple[str, str]], arch: str, debug: bool) -> str:
    """What a build is cached under: everything its output depends on that we control."""
    ident = {
        "builder": BUILDER_VERSION,
        "config_version": read_pin().config_version,  # kernel.json records it: keep it true
        "source": source_id,
        "fragments": [
            [name, hashlib.sha256(text.encode()).hexdigest()] for name, text in fragments
        ],
        "arch": arch,
        "debug": debug,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def kernels_dir(cache: Cache) -> Path:
    return Path(cache.root) / "kernels"


def _cross_prefix(spec: Arch) -> str:
    return "" if Arch.host() is spec else spec.cross_prefix


def _make_command(
    srctree: Path, objtree: Path, spec: Arch, jobs: int, niceness: int, cross: bool = True
) -> list[str]:
    cmd = ["make", "-C", str(srctree), f"O={objtree}", f"ARCH={spec.value}", f"-j{jobs}"]
    prefix = _cross_prefix(spec) if cross else ""
    if prefix:
        cmd.append(f"CROSS_COMPILE={prefix}")
    return ["nice", "-n", str(niceness), *cmd] if niceness else cmd


def _make_env() -> dict[str, str]:
    env = dict(os.environ)
    # Stable build stamps: the same inputs give the same banner in the image.
    env.update(
        KBUILD_BUILD_USER="vmimg",
        KBUILD_BUILD_HOST="vmimg",
        KBUILD_BUILD_TIMESTAMP="1970-01-01",
        KBUILD_BUILD_VERSION="1",
        LC_ALL="C",
    )
    return env


ProgressFn = Callable[[float, str], None]
KERNEL_BUILD_PHASE = "building the guest kernel"


def _run_logged(
    cmd: list[str], log: TextIO, env: dict[str, str], progress: ProgressFn | None, start: float
) -> tuple[int, list[str]]:
    """Run `cmd`, appending its output to `log`; returns (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            if progress is not None:
                progress(time.monotonic() - start, line.strip())
        code = proc.wait()
    log.flush()
    return code, list(tail)


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def _default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_kernel(
    *,
    source: str | Path | None = None,
    arch: str = Arch.X86_64,
    debug: bool = False,
    jobs: int | None = None,
    cache_dir: str | None = None,
    fragments_dir: Path = FRAGMENTS_DIR,
    progress: ProgressFn | None = None,
    niceness: int = DEFAULT_NICE,
) -> KernelInfo:
    """The kernel for these inputs: from the cache if built before, else built now.

    The build runs in a temp dir in the cache and is renamed into place whole;
    a second process asking for the same key waits on a lock and then finds it.
    """
    spec = arch_spec(arch)
    pin = read_pin(fragments_dir)
    src = Path(source or pin.default_source).expanduser().resolve()
    if not src.exists():
        raise KernelError(f"kernel source {src} does not exist")
    cache = Cache.open(cache_dir)
    kdir = kernels_dir(cache)
    fragments = read_fragments(arch, debug, fragments_dir)
    source_id = source_identity(src, kdir)
    key = build_key(source_id, fragments, arch, debug)
    final = kdir / key
    if (final / METADATA_FILE).exists():
        return load_kernel(final)
    with cache.lock(f"kernel-{key}"):
        if (final / METADATA_FILE).exists():
            return load_kernel(final)
        if progress is not None:
            progress(0.0, "")  # a build starts (before the source is even unpacked)
        srctree = src if src.is_dir() else extract_source(src, source_id, cache)
        _check_clean_srctree(srctree)
        return _build_locked(
            srctree=srctree,
            source=src,
            source_id=source_id,
            fragments=fragments,
            spec=spec,
            debug=debug,
            pin=pin,
            key=key,
            cache=cache,
            jobs=jobs or _default_jobs(),
            progress=progress,
            niceness=niceness,
        )


def _check_clean_srctree(srctree: Path) -> None:
    # Kbuild refuses O= builds from a tree that was configured in place.
    if (srctree / ".config").exists():
        raise KernelError(f"kernel source {srctree} has a .config; run 'make mrproper' there")


@dataclass
class _Make:
    """Runs make for one build: the same trees, arch, jobs, log and progress every time."""

    srctree: Path
    objtree: Path
    spec: Arch
    jobs: int
    niceness: int
    env: dict[str, str]
    log: TextIO  # the open build log
    progress: ProgressFn | None
    cross: bool = True  # False: use the host compiler (enough for configuring only)
    start: float = field(default_factory=time.monotonic)

    def __call__(self, *targets: str) -> None:
        cmd = _make_command(
            self.srctree, self.objtree, self.spec, self.jobs, self.niceness, self.cross
        )
        cmd.extend(targets)
        try:
            code, tail = _run_logged(cmd, self.log, self.env, self.progress, self.start)
        except OSError as e:
            raise KernelError(f"cannot run make for the kernel: {e.strerror}") from e
        if code != 0:
            raise KernelBuildError(
                f"kernel build failed: make {' '.join(targets)} exited {code}; log {self.log.name}",
                Path(self.log.name),
                tail,
            )

    def final_config(self) -> dict[str, str]:
        return parse_config((self.objtree / ".config").read_text(), ".config")


def _build_locked(
    *,
    srctree: Path,
    source: Path,
    source_id: str,
    fragments: list[tuple[str, str]],
    spec: Arch,
    debug: bool,
    pin: KernelPin,
    key: str,
    cache: Cache,
    jobs: int,
    progress: ProgressFn | None,
    niceness: int,
) -> KernelInfo:
    kdir = kernels_dir(cache)
    (kdir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = kdir / "logs" / f"{key}.log"
    work = Path(cache.new_temp_dir(f"kernel-{key}-"))
    try:
        objtree = work / "obj"
        out = work / "out"
        objtree.mkdir()
        out.mkdir()
        requested = merge_fragments(fragments)
        allconfig = work / "fragment.config"
        allconfig.write_text(render_fragment(requested))
        env = _make_env()
        # allnoconfig takes these values and says no to everything else.
        env["KCONFIG_ALLCONFIG"] = str(allconfig)
        with open(log_path, "w") as log:
            make = _Make(srctree, objtree, spec, jobs, niceness, env, log, progress)
            make("allnoconfig")
            make("olddefconfig")
            require_config(requested, make.final_config(), f"the .config for {spec}")
            make("vmlinux", spec.kernel_image)
            # The build re-runs syncconfig (another compiler can drop options): check again.
            final_config = make.final_config()
            require_config(requested, final_config, f"the built .config for {spec}")
            seconds = time.monotonic() - make.start
        boot_image = objtree / "arch" / spec.kernel_dir / "boot" / spec.kernel_image
        shutil.copyfile(objtree / "vmlinux", out / "vmlinux")
        shutil.copyfile(boot_image, out / spec.kernel_image)
        shutil.copyfile(objtree / ".config", out / "config")
        shutil.copyfile(log_path, out / "build.log")
        release = (objtree / "include" / "config" / "kernel.release").read_text().strip()
        meta = {
            "format": METADATA_FORMAT,
            "key": key,
            "kernel_version": kernel_version_of(srctree),
            "kernel_release": release,
            "config_version": pin.config_version,
            "arch": spec.value,
            "debug": debug,
            "boot_image": spec.kernel_image,
            "source": {"path": str(source), "sha256": source_id, "is_dir": source.is_dir()},
            "fragments": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in fragments},
            "files": {
                name: _file_entry(out / name) for name in ("vmlinux", spec.kernel_image, "config")
            },
            "compiler": final_config.get("CONFIG_CC_VERSION_TEXT", "").strip('"'),
            "build_seconds": round(seconds, 1),
            "built_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "jobs": jobs,
        }
        (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        final = kdir / key
        if final.exists():  # a directory someone emptied by hand: replace it
            shutil.rmtree(final)
        commit(str(out), str(final))
        with contextlib.suppress(OSError):
            log_path.unlink()
        return load_kernel(final)
    finally:
        cache.remove_temp(work)


# -- the cache -----------------------------------------------------------------


PULLED_DIR = "pulled"  # kernels/pulled/<manifest digest hex>/: kernels from registries
KERNEL_FILES = frozenset({"vmlinux", "bzImage", "Image", "config"})
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")


def pulled_kernel_dir(cache: Cache, digest: str) -> Path:
    """Where a kernel pulled from a registry lives: keyed by its artifact's digest, apart
    from our builds, so that no artifact can stand in for a kernel this machine builds."""
    algo, hexd = split_digest(digest)
    return kernels_dir(cache) / PULLED_DIR / f"{algo}-{hexd}"


def check_metadata(meta: object, where: str) -> dict[str, Any]:
    """kernel.json, checked: a known arch, its boot image's name, only known file names,
    each with a sha256 and size. KernelError naming the field otherwise."""
    if not isinstance(meta, dict):
        raise KernelError(f"{where}: kernel.json is not an object")
    key, arch = meta.get("key"), meta.get("arch")
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise KernelError(f"{where}: kernel.json has no valid key")
    known = Arch.from_kernel(arch)
    if known is None:
        raise KernelError(f"{where}: kernel.json names an unknown arch {str(arch)[:20]!r}")
    if meta.get("boot_image") != known.kernel_image:
        raise KernelError(f"{where}: kernel.json's boot_image is not {known.kernel_image}")
    files = meta.get("files")
    if not isinstance(files, dict) or not {"vmlinux", known.kernel_image} <= set(files):
        raise KernelError(f"{where}: kernel.json does not list vmlinux and its boot image")
    for name, entry in files.items():
        if name not in KERNEL_FILES:
            raise KernelError(f"{where}: kernel.json lists an unknown file {str(name)[:40]!r}")
        if (
            not isinstance(entry, dict)
            or not is_sha256_hex(entry.get("sha256"))
            or isinstance(entry.get("size"), bool)
            or not isinstance(entry.get("size"), int)
        ):
            raise KernelError(f"{where}: kernel.json's entry for {name} is malformed")
    for field_name in ("kernel_version",):
        if not isinstance(meta.get(field_name, ""), str):
            raise KernelError(f"{where}: kernel.json's {field_name} is not a string")
    config_version = meta.get("config_version")
    if config_version is not None and (
        isinstance(config_version, bool) or not isinstance(config_version, int)
    ):
        raise KernelError(f"{where}: kernel.json's config_version is not a number")
    return meta


def check_kernel_files(directory: Path, meta: dict[str, Any]) -> None:
    """Every file kernel.json lists is a regular file there, of its size and sha256."""
    for name, entry in meta["files"].items():
        path = directory / name
        try:
            st = path.lstat()
            ok = stat.S_ISREG(st.st_mode) and st.st_size == entry["size"]
            ok = ok and sha256_file(path, follow_symlinks=False) == entry["sha256"]
        except OSError:
            ok = False
        if not ok:
            raise KernelError(f"{directory}: {name} is missing or does not match kernel.json")


def load_kernel(directory: Path, check_files: bool = False) -> KernelInfo:
    """KernelInfo for a cached kernel directory (a build of ours, or a pulled kernel)."""
    try:
        meta = check_metadata(json.loads((directory / METADATA_FILE).read_text()), str(directory))
    except (OSError, ValueError) as e:
        raise KernelError(f"unreadable kernel metadata in {directory}: {e}") from e
    if check_files:
        check_kernel_files(directory, meta)
    return KernelInfo(
        key=meta["key"],
        arch=meta["arch"],
        version=meta.get("kernel_version", ""),
        config_version=meta.get("config_version"),
        image=directory / meta["boot_image"],
        vmlinux=directory / "vmlinux",
        config=directory / "config" if "config" in meta["files"] else None,
        metadata=meta,
    )


def _loadable(directory: Path, check_files: bool = False) -> KernelInfo | None:
    if not (directory / METADATA_FILE).is_file():
        return None
    try:
        return load_kernel(directory, check_files)
    except KernelError:
        return None  # damaged or foreign: listed by nobody, used by nobody


def list_kernels(cache_dir: str | None = None, pulled: bool = False) -> list[KernelInfo]:
    """Every cached kernel we built (and, with `pulled`, those pulled from registries),
    newest first. Whatever else lies in the cache is skipped."""
    kdir = kernels_dir(Cache.open(cache_dir))
    dirs = [d for d in kdir.iterdir() if d.name != PULLED_DIR] if kdir.is_dir() else []
    if pulled and (kdir / PULLED_DIR).is_dir():
        dirs += list((kdir / PULLED_DIR).iterdir())
    found = [k for k in (_loadable(d) for d in dirs) if k is not None]
    return sorted(found, key=lambda k: (str(k.metadata.get("built_at", "")), k.key), reverse=True)


def host_kernel_arch() -> str:
    """The kernel arch this machine runs natively (x86_64 when it is not one we build)."""
    return (Arch.host() or Arch.X86_64).value


def find_kernel(
    key: str | None = None, cache_dir: str | None = None, arch: str | None = None
) -> KernelInfo:
    """The cached kernel whose key starts with `key`; without a key, the newest one for
    `arch` (default: the host's arch, so that a cross-built arm64 kernel is not what an
    x86_64 host boots by default)."""
    kernels = list_kernels(cache_dir)
    if key is None:
        want = arch_spec(arch or host_kernel_arch()).value
        kernels = [k for k in kernels if k.arch == want]
        if not kernels:
            raise KernelError(f"no {want} kernel in the cache; run 'vmimg kernel build'")
        return kernels[0]
    hits = [k for k in kernels if k.key.startswith(key)]
    if len(hits) != 1:
        raise KernelError(
            f"kernel key {key!r} matches {len(hits)} cached kernels (`vmimg kernel list` "
            "lists them)"
        )
    return hits[0]


def check_fragments(
    arch: str = Arch.X86_64,
    *,
    debug: bool = False,
    source: str | Path | None = None,
    cache_dir: str | None = None,
    fragments_dir: Path = FRAGMENTS_DIR,
) -> list[Mismatch]:
    """Configure only (allnoconfig + fragments + olddefconfig) and return the requested
    options that did not survive: a quick check of a fragment change, for any arch.

    Without the cross compiler installed, kconfig probes the host compiler instead;
    that is close enough to tell whether the options' dependencies are met.
    """
    spec = arch_spec(arch)
    pin = read_pin(fragments_dir)
    src = Path(source or pin.default_source).expanduser().resolve()
    cache = Cache.open(cache_dir)
    fragments = read_fragments(arch, debug, fragments_dir)
    srctree = (
        src
        if src.is_dir()
        else extract_source(src, source_identity(src, kernels_dir(cache)), cache)
    )
    _check_clean_srctree(srctree)
    cross = _cross_prefix(spec)
    have_cross = not cross or shutil.which(cross + "gcc") is not None
    requested = merge_fragments(fragments)
    work = Path(cache.new_temp_dir("kconfig-"))
    try:
        allconfig = work / "fragment.config"
        allconfig.write_text(render_fragment(requested))
        env = _make_env()
        env["KCONFIG_ALLCONFIG"] = str(allconfig)
        (work / "obj").mkdir()
        with open(work / "config.log", "w") as log:
            make = _Make(srctree, work / "obj", spec, 1, 0, env, log, None, cross=have_cross)
            make("allnoconfig")
            make("olddefconfig")
            return check_config(requested, make.final_config())
    finally:
        cache.remove_temp(work)


def find_or_build_kernel(
    arch: str = Arch.X86_64,
    *,
    debug: bool = False,
    source: str | Path | None = None,
    cache_dir: str | None = None,
    progress: ProgressFn | None = None,
) -> KernelInfo:
    """The kernel `vmimg build` and the tests boot: cached, or built from the pinned source."""
    return build_kernel(
        source=source, arch=arch, debug=debug, cache_dir=cache_dir, progress=progress
    )


# -- user-supplied kernels -------------------------------------------------------

# Offsets in the x86 boot protocol header (Documentation/x86/boot.rst).
BZ_SETUP_SECTS = 0x1F1
BZ_HEADER_MAGIC_OFFSET = 0x202
BZ_HEADER_MAGIC = b"HdrS"
BZ_KERNEL_VERSION_PTR = 0x20E  # pointer to a NUL-terminated string, minus 0x200
BZ_VERSION_BIAS = 0x200
# arm64 Image header (Documentation/arm64/booting.rst).
ARM64_MAGIC_OFFSET = 0x38
ARM64_MAGIC = b"ARM\x64"
# ELF header fields we need.
ELF_MAGIC = b"\x7fELF"
ELF_MACHINE_OFFSET = 18
# "Linux version 6.1.0 (...)" as found in vmlinux and uncompressed images.
_BANNER_RE = re.compile(rb"Linux version (\d+\.\d+[^\s\x00]*)")


def kernel_from_path(path: str | Path, arch: str | None = None) -> KernelInfo:
    """KernelInfo for a kernel file the user supplied: a vmlinux ELF, an x86 bzImage
    or an arm64 Image. Recognises the format; rejects anything else."""
    p = Path(path).expanduser().resolve()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise KernelError(f"cannot read kernel {p}: {e.strerror}") from e
    kind, detected_arch, version = _identify_kernel(data, p)
    if arch is not None and arch_spec(arch) != detected_arch:
        raise KernelError(f"kernel {p} is for {detected_arch}, not {arch}")
    digest = hashlib.sha256(data).hexdigest()
    return KernelInfo(
        key="user-" + digest[:16],
        arch=detected_arch,
        version=version,
        config_version=None,
        image=p,
        vmlinux=p if kind == "vmlinux" else None,
        config=None,
        user_supplied=True,
        metadata={
            "format": METADATA_FORMAT,
            "kind": kind,
            "arch": detected_arch,
            "kernel_version": version,
            "files": {p.name: {"sha256": digest, "size": len(data)}},
        },
    )


def _identify_kernel(data: bytes, path: Path) -> tuple[str, str, str]:
    """(kind, arch, version) of a kernel image's bytes."""
    if data.startswith(ELF_MAGIC):
        machine = int.from_bytes(data[ELF_MACHINE_OFFSET : ELF_MACHINE_OFFSET + 2], "little")
        known = Arch.from_elf_machine(machine)
        if known is not None:
            return "vmlinux", known.value, _banner_version(data)
        raise KernelError(f"kernel {path} is an ELF file for machine {machine}, not a known arch")
    magic = data[BZ_HEADER_MAGIC_OFFSET : BZ_HEADER_MAGIC_OFFSET + len(BZ_HEADER_MAGIC)]
    if magic == BZ_HEADER_MAGIC:
        return Arch.X86_64.kernel_image, Arch.X86_64.value, _bzimage_version(data)
    if data[ARM64_MAGIC_OFFSET : ARM64_MAGIC_OFFSET + len(ARM64_MAGIC)] == ARM64_MAGIC:
        return Arch.ARM64.kernel_image, Arch.ARM64.value, _banner_version(data)
    raise KernelError(f"{path} is not a kernel image (no ELF, bzImage or arm64 Image header)")


def _banner_version(data: bytes) -> str:
    m = _BANNER_RE.search(data)
    return m.group(1).decode(errors="replace") if m else ""


def _bzimage_version(data: bytes) -> str:
    ptr = int.from_bytes(data[BZ_KERNEL_VERSION_PTR : BZ_KERNEL_VERSION_PTR + 2], "little")
    if not ptr:
        return ""
    start = ptr + BZ_VERSION_BIAS
    end = data.find(b"\0", start, start + 256)
    text = data[start:end].decode(errors="replace") if end > 0 else ""
    return text.split(" ", 1)[0]
