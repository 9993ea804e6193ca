"""Building layer tars in tests, one entry at a time, with Python's tarfile.

layer(file("etc/hosts", b"..."), dir("var", mode=0o700), whiteout("etc/motd"))
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

DEFAULT_MTIME = 1_600_000_000


@dataclass
class E:
    name: str
    type: bytes
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = DEFAULT_MTIME
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def file(name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> E:
    return E(name, tarfile.REGTYPE, data, mode, **kw)  # type: ignore[arg-type]


def dir(name: str, mode: int = 0o755, **kw: object) -> E:
    return E(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str, **kw: object) -> E:
    return E(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)  # type: ignore[arg-type]


def hardlink(name: str, target: str, **kw: object) -> E:
    return E(name, tarfile.LNKTYPE, linkname=target, **kw)  # type: ignore[arg-type]


def chardev(name: str, major: int, minor: int, **kw: object) -> E:
    return E(name, tarfile.CHRTYPE, devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]


def blockdev(name: str, major: int, minor: int, **kw: object) -> E:
    return E(name, tarfile.BLKTYPE, devmajor=major, devminor=minor, **kw)  # type: ignore[arg-type]


def fifo(name: str, **kw: object) -> E:
    return E(name, tarfile.FIFOTYPE, **kw)  # type: ignore[arg-type]


def whiteout(path: str) -> E:
    head, _, tail = path.rpartition("/")
    return file(f"{head}/.wh.{tail}" if head else f".wh.{tail}")


def opaque(directory: str) -> E:
    return file(f"{directory}/.wh..wh..opq")


def layer(*entries: E, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = e.mtime
            info.linkname = e.linkname
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.size = len(e.data) if e.type == tarfile.REGTYPE else 0
            info.pax_headers = dict(e.pax)
            tf.addfile(info, io.BytesIO(e.data) if info.size else None)
    return buf.getvalue()
