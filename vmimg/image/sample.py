"""The built-in sample image: busybox (Debian's busybox-static) as a one-layer OCI image.

It is what the README's first command converts and boots, and what many
tests use: small, real, and made on this machine without any registry.

It can also be a multi-platform image (an OCI index with linux/amd64 and
linux/arm64): the host's busybox for the host's platform, and Debian's
busybox-static .deb of the other architecture, fetched with apt and unpacked
into the vmimg cache once per machine (`foreign_busybox`).
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import tarfile

from vmimg.arch import Arch
from vmimg.errors import VmimgError
from vmimg.image.cache import Cache, commit
from vmimg.image.oci import Platform, host_platform, parse_platform
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout

BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
SAMPLE_TAG = "latest"
SAMPLE_MTIME = 1_700_000_000  # fixed, so the sample is the same bytes everywhere
APPLETS = (
    "sh",
    "ls",
    "cat",
    "echo",
    "id",
    "pwd",
    "env",
    "sleep",
    "mount",
    "uname",
    "hostname",
    "ps",
    "kill",
    "poweroff",
    "sync",
    "true",
    "false",
    "test",
    "grep",
    "wc",
    "head",
    "httpd",
    "wget",
    "ip",
    "ifconfig",
    "touch",
    "mkdir",
    "rm",
    "sha256sum",
    "find",
)

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"


_ELF_MAGIC = b"\x7fELF"
_ELF_MACHINE_OFFSET = 18
BUSYBOX_PACKAGE = "busybox-static"
SAMPLE_CACHE_DIR = "sample"  # under the vmimg cache root
APT_TIMEOUT = 300


def find_busybox() -> str:
    for path in BUSYBOX_PATHS:
        if os.path.isfile(path):
            return path
    found = shutil.which("busybox")
    if found:
        return found
    raise VmimgError("busybox not found: install Debian's busybox-static")


def _add(
    tf: tarfile.TarFile,
    name: str,
    kind: bytes,
    data: bytes = b"",
    mode: int = 0o755,
    target: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = SAMPLE_MTIME
    info.linkname = target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if data else None)


def busybox_layer(busybox: str | None = None) -> bytes:
    """A layer tar with busybox, its applet links, /etc basics and the usual directories."""
    with open(busybox or find_busybox(), "rb") as f:
        binary = f.read()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "etc", "root", "tmp", "proc", "sys", "dev", "run", "var", "usr"):
            _add(tf, d + "/", tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _add(tf, "bin/busybox", tarfile.REGTYPE, binary)
        for applet in APPLETS:
            _add(tf, f"bin/{applet}", tarfile.SYMTYPE, target="busybox", mode=0o777)
        _add(tf, "etc/passwd", tarfile.REGTYPE, PASSWD, mode=0o644)
        _add(tf, "etc/group", tarfile.REGTYPE, GROUP, mode=0o644)
    return buf.getvalue()


def elf_machine(path: str) -> int | None:
    """e_machine of an ELF file, None if it is not one."""
    with open(path, "rb") as f:
        head = f.read(_ELF_MACHINE_OFFSET + 2)
    if not head.startswith(_ELF_MAGIC) or len(head) < _ELF_MACHINE_OFFSET + 2:
        return None
    return int.from_bytes(head[_ELF_MACHINE_OFFSET:], "little")


def foreign_busybox(architecture: str, cache: Cache | None = None) -> str:
    """A static busybox for an OCI `architecture` (amd64, arm64), from Debian's
    busybox-static of that architecture: `apt-get download` into the cache, unpacked with
    `dpkg-deb -x`, once per machine. apt must know the architecture
    (`dpkg --add-architecture arm64 && apt-get update`)."""
    arch = Arch.from_oci(architecture)
    if arch is None:
        raise VmimgError(f"no sample busybox for architecture {architecture!r}")
    deb_arch = arch.oci  # Debian spells both architectures as OCI does
    cache = cache or Cache.open()
    home = os.path.join(cache.root, SAMPLE_CACHE_DIR, f"{BUSYBOX_PACKAGE}-{deb_arch}")
    binary = os.path.join(home, "bin", "busybox")
    if os.path.isfile(binary):
        return binary
    with cache.lock(f"sample-busybox-{deb_arch}"), cache.temp_dir() as tmp:
        if os.path.isfile(binary):
            return binary
        _run(["apt-get", "download", f"{BUSYBOX_PACKAGE}:{deb_arch}"], tmp, deb_arch)
        debs = glob.glob(os.path.join(tmp, f"{BUSYBOX_PACKAGE}_*_{deb_arch}.deb"))
        if len(debs) != 1:
            raise VmimgError(f"apt-get download left {len(debs)} {BUSYBOX_PACKAGE} packages")
        unpacked = os.path.join(tmp, "root")
        _run(["dpkg-deb", "-x", debs[0], unpacked], tmp, deb_arch)
        found = [p for p in BUSYBOX_PATHS if os.path.isfile(unpacked + p)]
        if not found:
            raise VmimgError(f"{os.path.basename(debs[0])} holds no busybox binary")
        if elf_machine(unpacked + found[0]) != arch.elf_machine:
            raise VmimgError(f"{os.path.basename(debs[0])}: busybox is not an {deb_arch} binary")
        staged = os.path.join(tmp, "staged")
        os.makedirs(os.path.join(staged, "bin"))
        shutil.copy2(unpacked + found[0], os.path.join(staged, "bin", "busybox"))
        shutil.copy2(debs[0], staged)  # kept: the package the binary came from
        os.makedirs(os.path.dirname(home), exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        commit(staged, home)
    return binary


def _run(argv: list[str], cwd: str, deb_arch: str) -> None:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VmimgError(f"cannot run {argv[0]}: {e}") from e
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise VmimgError(
            f"{' '.join(argv)} failed: {last} (does apt know {deb_arch}? "
            f"dpkg --add-architecture {deb_arch} && apt-get update)"
        )


def busybox_for(platform: Platform, cache: Cache | None = None) -> str:
    """A busybox binary for `platform`: the host's own for the host's platform, else
    Debian's package for that architecture (see `foreign_busybox`)."""
    if platform.architecture == host_platform().architecture:
        return find_busybox()
    return foreign_busybox(platform.architecture, cache)


def sample_spec(busybox: str | None = None, platform: Platform | None = None) -> ImageSpec:
    return ImageSpec(
        layers=[LayerSpec(busybox_layer(busybox), "gzip")],
        config={
            "Cmd": ["/bin/sh", "-c", "echo hello from vmimg; uname -sr"],
            "Env": ["PATH=/bin:/usr/bin", "GREETING=hello"],
            "WorkingDir": "/",
        },
        platform=platform or host_platform(),
    )


def write_sample(root: str, platforms: tuple[str, ...] = (), cache: Cache | None = None) -> str:
    """Write the sample as an OCI layout at `root`; returns its reference (oci:ROOT:latest).

    With `platforms` (e.g. ("linux/amd64", "linux/arm64")) the tag names an OCI index with
    one image per platform; without, it is a single image for the host's platform."""
    if not platforms:
        write_layout(root, {SAMPLE_TAG: sample_spec()})
        return f"oci:{root}:{SAMPLE_TAG}"
    specs = []
    for text in platforms:
        platform = parse_platform(text)
        specs.append(sample_spec(busybox_for(platform, cache), platform))
    write_layout(root, {SAMPLE_TAG: specs})
    return f"oci:{root}:{SAMPLE_TAG}"
