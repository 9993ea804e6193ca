"""Benchmark fixtures, made locally and cached between runs.

- `minbase`: Debian bookworm minbase from debootstrap as a two-layer OCI layout. Layer 1
  (gzip) is the debootstrap tree; layer 2 (zstd) deletes files (whiteouts), replaces a
  directory (opaque), adds hardlinks and changes files, like a typical `RUN apt-get ...` layer.
- `large`: the same plus python3 and build-essential installed in a chroot (500 MB+).
- `smallfiles`: one layer of 100k small files in a deep-ish tree; `smallfiles400k` the same
  with 400k, to see how peak memory grows per entry.

Each is an OCI layout under $VMIMG_BENCH_DIR (default ~/.cache/vmimg-bench), plus the
unpacked tree peers need as input (`<name>.rootfs/`).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator

from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
FIXED_MTIME = 1_700_000_000


def bench_dir() -> str:
    d = os.environ.get("VMIMG_BENCH_DIR") or os.path.expanduser("~/.cache/vmimg-bench")
    os.makedirs(d, exist_ok=True)
    return d


def _debootstrap(dest: str, include: str = "") -> None:
    tmp = dest + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = ["debootstrap", "--variant=minbase"]
    if include:
        cmd.append(f"--include={include}")
    subprocess.run([*cmd, SUITE, tmp, MIRROR], check=True, stdout=subprocess.DEVNULL)
    # Caches and logs vary run to run; keep the image focused on what an image holds.
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
        path = os.path.join(tmp, sub)
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                os.unlink(p)
    os.rename(tmp, dest)


def _tar_dir(root: str, skip: set[str] = frozenset()) -> bytes:  # type: ignore[assignment]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(os.listdir(root)):
            if name not in skip:
                tf.add(os.path.join(root, name), arcname=name)
    return buf.getvalue()


def _upper_layer(root: str) -> bytes:
    """Whiteouts, an opaque dir, hardlinks and changed files over the debootstrap tree."""
    buf = io.BytesIO()
    docs = sorted(os.listdir(os.path.join(root, "usr/share/doc")))[:200]

    def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mtime = FIXED_MTIME
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        info.linkname = link
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in docs:
            add(f"usr/share/doc/.wh.{d}")
        add("usr/share/locale/.wh..wh..opq")
        add("usr/share/locale/", kind=tarfile.DIRTYPE)
        add("usr/share/locale/locale.alias", b"# replaced\n")
        add("etc/motd", b"benchmark image\n")
        add("opt/app/", kind=tarfile.DIRTYPE)
        payload = os.urandom(4 << 20)
        add("opt/app/data.bin", payload)
        for i in range(20):
            add(f"opt/app/link{i}", kind=tarfile.LNKTYPE, link="opt/app/data.bin")
        for i in range(500):
            add(f"opt/app/conf/{i:04d}.conf", f"setting={i}\n".encode())
    return buf.getvalue()


def _write(name: str, layers: list[LayerSpec]) -> str:
    path = os.path.join(bench_dir(), name)
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    # Debian's umoci reads no zstd: the tag "gzip" holds the same layers, all gzip, for it.
    gzip_layers = [LayerSpec(layer.tar, "gzip") for layer in layers]
    config = {"Cmd": ["/bin/sh"]}
    write_layout(
        tmp, {"latest": ImageSpec(layers, config=config), "gzip": ImageSpec(gzip_layers, config)}
    )
    os.rename(tmp, path)
    return f"oci:{path}:latest"


def minbase() -> str:
    path = os.path.join(bench_dir(), "minbase")
    if not os.path.exists(path):
        rootfs = os.path.join(bench_dir(), "debootstrap-minbase")
        if not os.path.exists(rootfs):
            _debootstrap(rootfs)
        lower = LayerSpec(_tar_dir(rootfs, {"proc", "sys", "dev"}), "gzip")
        upper = LayerSpec(_upper_layer(rootfs), "zstd")
        _write("minbase", [lower, upper])
    return f"oci:{path}:latest"


def large() -> str:
    path = os.path.join(bench_dir(), "large")
    if not os.path.exists(path):
        rootfs = os.path.join(bench_dir(), "debootstrap-large")
        if not os.path.exists(rootfs):
            _debootstrap(rootfs, include="python3,build-essential")
        lower = LayerSpec(_tar_dir(rootfs, {"proc", "sys", "dev"}), "gzip")
        upper = LayerSpec(_upper_layer(rootfs), "zstd")
        _write("large", [lower, upper])
    return f"oci:{path}:latest"


SMALL_FILES = 100_000
SMALL_FILES_LARGE = 400_000
# Version 2 of the small-files layouts holds the directory entries too, as real layers do
# (mke2fs -d reading a tarball needs them); caches of version 1 lack them and stay unused.
SMALL_FILES_VERSION = "2"


def _small_files(count: int) -> Iterator[tuple[str, bytes | None]]:
    """(path, data), data None for a directory, each directory before what it holds.

    100 x 100 directories, so the 400k tree has 40 files where the 100k one has 10."""
    yield "data", None
    for top in range(100):
        yield f"data/{top:02d}", None
        for sub in range(100):
            yield f"data/{top:02d}/{sub:02d}", None
            for i in range(top + 100 * sub, count, 100 * 100):
                yield f"data/{top:02d}/{sub:02d}/f{i:06d}", f"file {i}\n".encode() * 3


def _small_files_layout(name: str, count: int) -> str:
    path = os.path.join(bench_dir(), f"{name}.{SMALL_FILES_VERSION}")
    if not os.path.exists(path):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for entry, data in _small_files(count):
                info = tarfile.TarInfo(entry)
                info.mtime = FIXED_MTIME
                if data is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tf.addfile(info)
                else:
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        _write(os.path.basename(path), [LayerSpec(buf.getvalue(), "gzip")])
    return f"oci:{path}:latest"


def smallfiles() -> str:
    return _small_files_layout("smallfiles", SMALL_FILES)


def smallfiles400k() -> str:
    return _small_files_layout("smallfiles400k", SMALL_FILES_LARGE)


FIXTURES = {
    "minbase": minbase,
    "large": large,
    "smallfiles": smallfiles,
    "smallfiles400k": smallfiles400k,
}

if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or list(FIXTURES):
        print(name, FIXTURES[name]())
