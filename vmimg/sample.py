"""The built-in sample image: busybox (Debian's busybox-static) as a one-layer OCI image.

It is what the README's first command converts and boots, and what many
tests use: small, real, and made on this machine without any registry.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile

from vmimg.errors import VmimgError
from vmimg.ocilayout import ImageSpec, LayerSpec, write_layout

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


def sample_spec(busybox: str | None = None) -> ImageSpec:
    return ImageSpec(
        layers=[LayerSpec(busybox_layer(busybox), "gzip")],
        config={
            "Cmd": ["/bin/sh", "-c", "echo hello from vmimg; uname -sr"],
            "Env": ["PATH=/bin:/usr/bin", "GREETING=hello"],
            "WorkingDir": "/",
        },
    )


def write_sample(root: str) -> str:
    """Write the sample as an OCI layout at `root`; returns its reference (oci:ROOT:latest)."""
    write_layout(root, {SAMPLE_TAG: sample_spec()})
    return f"oci:{root}:{SAMPLE_TAG}"
