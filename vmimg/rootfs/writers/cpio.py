"""The flattened root as a newc cpio archive: a Linux initramfs.

The kernel unpacks newc ("070701") archives, optionally compressed. A
hardlinked node is written with its data at its first path and with size 0
at the others, all sharing one inode number, which is how the kernel's
initramfs unpacker links them. newc has no xattrs and whole-second mtimes
only; both are documented limits of this format.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import zstandard
from isal import isal_zlib

from vmimg.errors import WriterError
from vmimg.rootfs.content import ContentReader
from vmimg.rootfs.tree import NS_PER_S, Content, Node, NodeType, Tree
from vmimg.rootfs.writers.options import CpioOptions as CpioOptions  # also importable from here
from vmimg.rootfs.writers.pathwarnings import PathWarnings

NEWC_MAGIC = b"070701"
TRAILER = b"TRAILER!!!"
ALIGN = 4
READ_CHUNK = 4 << 20
GZIP_WBITS = 31
COMPRESSIONS = ("gzip", "zstd", "none")
DEFAULT_GZIP_LEVEL = 3  # isal levels run 0..3
DEFAULT_ZSTD_LEVEL = 10
FIELD_MAX = 0xFFFFFFFF  # every newc header field is 8 hex digits
ZEROS = bytes(READ_CHUNK)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % ALIGN)


def newc_header(
    name: bytes,
    ino: int,
    mode: int,
    uid: int,
    gid: int,
    nlink: int,
    mtime: int,
    size: int,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    """One newc header with its name, padded so the data starts aligned."""
    namesize = len(name) + 1
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    if not all(0 <= f <= FIELD_MAX for f in fields):
        raise WriterError(f"{name!r}: a newc header field outside 0..{FIELD_MAX}: {fields}")
    hdr = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    return hdr + _pad(len(hdr))


class _Sink:
    """Writes to a file descriptor through an optional compressor."""

    def __init__(self, out_fd: int, compression: str, level: int | None) -> None:
        self.fd = out_fd
        self.written = 0  # uncompressed bytes so far
        self._compress: Callable[[bytes], bytes]
        self._flush: Callable[[], bytes]
        if compression == "gzip":
            c = isal_zlib.compressobj(
                level if level is not None else DEFAULT_GZIP_LEVEL, isal_zlib.DEFLATED, GZIP_WBITS
            )
            self._compress, self._flush = c.compress, c.flush
        elif compression == "zstd":
            z = zstandard.ZstdCompressor(
                level=level if level is not None else DEFAULT_ZSTD_LEVEL
            ).compressobj()
            self._compress, self._flush = z.compress, z.flush
        elif compression == "none":
            self._compress, self._flush = (lambda b: b), (lambda: b"")
        else:
            raise WriterError(f"unknown initramfs compression {compression!r}")

    def write(self, data: bytes) -> None:
        self.written += len(data)
        out = self._compress(data)
        if out:
            os.write(self.fd, out)

    def close(self) -> None:
        os.write(self.fd, self._flush())


def write_cpio(tree: Tree, reader: ContentReader, out_fd: int, options: CpioOptions) -> list[str]:
    """Write the tree as a (compressed) newc cpio to `out_fd`. Returns warnings."""
    warnings: list[str] = []
    clamped = PathWarnings("mtime outside what newc cpio stores (1970..2106); clamped")
    sink = _Sink(out_fd, options.compression, options.level)
    counts = tree.link_counts()
    inos: dict[int, int] = {}
    for path, node in tree.walk():
        name = b"." if path == b"/" else path.lstrip(b"/")
        if name == TRAILER:
            name = b"./" + name  # the bare name ends the archive for the kernel and cpio
        seen = id(node) in inos
        if not seen:
            inos[id(node)] = len(inos) + 1
        if node.xattrs and not seen:
            warnings.append(f"{os.fsdecode(path)}: xattrs are not stored in an initramfs")
        if node.size > FIELD_MAX:
            raise WriterError(
                f"{os.fsdecode(path)}: {node.size} bytes; an initramfs (newc cpio) stores files "
                f"of at most {FIELD_MAX} bytes"
            )
        mtime = _newc_mtime(node.mtime_ns)
        if mtime != node.mtime_ns // NS_PER_S and not seen:
            clamped.add(path)
        size = node.size if not seen else 0
        sink.write(
            newc_header(
                name,
                inos[id(node)],
                node.st_mode,
                node.uid,
                node.gid,
                counts[id(node)],
                mtime,
                size,
                node.rdev,
            )
        )
        if size:
            _write_data(sink, reader, node)
            sink.write(_pad(size))
    sink.write(newc_header(TRAILER, 0, 0, 0, 0, 1, 0, 0))
    sink.close()
    return warnings + clamped.lines()


def _newc_mtime(ns: int) -> int:
    """Whole seconds, clamped to the unsigned 32 bits a newc header holds."""
    return min(max(ns // NS_PER_S, 0), FIELD_MAX)


def _write_data(sink: _Sink, reader: ContentReader, node: Node) -> None:
    if node.type is NodeType.SYMLINK:
        assert node.target is not None
        sink.write(node.target)
        return
    assert node.content is not None
    _write_logical(sink, reader, node.content)


def _write_logical(sink: _Sink, reader: ContentReader, content: Content) -> None:
    """The file's bytes in bounded chunks, holes as zeros (newc has no holes)."""
    pos = 0  # logical offset reached
    stored = 0  # offset into the stored runs
    for ext in (*content.data_extents(), None):
        hole_end = content.size if ext is None else ext.offset
        while pos < hole_end:
            n = min(READ_CHUNK, hole_end - pos)
            sink.write(ZEROS[:n])
            pos += n
        if ext is None:
            break
        for start in range(0, ext.length, READ_CHUNK):
            sink.write(reader.read(content, stored + start, min(READ_CHUNK, ext.length - start)))
        stored += ext.length
        pos = ext.offset + ext.length
