"""Reading the bytes a `Content` reference points at.

Writers never open layer files themselves: they ask a `ContentReader`, which
keeps one descriptor per layer tar and copies with os.copy_file_range (the
kernel moves the bytes, Python never sees them) where the output is a file.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from types import TracebackType

from vmimg.errors import ContentError
from vmimg.rootfs._readplan import cut, spans
from vmimg.rootfs.tree import Content
from vmimg.testhook import pause_point

COPY_CHUNK = 8 << 20  # bytes per copy_file_range / read call
# read_many: ranges of one layer file at most this far apart are cut out of one mapping of
# it (the tar headers and padding between small files are mapped, never copied).
READ_GAP_MAX = 8 << 10
# Bytes one mapping spans at most (unless one range is larger). Its pages count towards the
# peak RSS while it is mapped; 256 KiB spans took 40 ms for 100,000 small files, 4 MiB 30.
READ_SPAN_MAX = 4 << 20


class ContentReader:
    """Reads `Content`; holds the layer files open. Use as a context manager."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._sizes: dict[int, int] = {}  # each open file's size (layer files never change)
        self.on_bytes: Callable[[int], None] | None = None  # told each amount read or copied

    def __enter__(self) -> ContentReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ContentError(f"cannot open content file {path}: {e.strerror}") from e
            self._fds[path] = fd
            self._sizes[fd] = os.fstat(fd).st_size
        return fd

    def read(self, content: Content, start: int = 0, length: int | None = None) -> bytes:
        """Stored bytes [start, start+length) of `content` (for a sparse file,
        offsets into the concatenated data runs)."""
        # Called once per small file by the writers: the common cases without calls.
        stored = content.size if content.extents is None else content.stored_size
        if length is None:
            length = stored - start
        if start < 0 or length < 0 or start + length > stored:
            raise ContentError(f"read of {length} bytes at {start} outside content of {stored}")
        if self.on_bytes is not None:
            self.on_bytes(length)
        if content.data is not None:
            return content.data[start : start + length]
        if length == 0:
            return b""
        assert content.path is not None
        fd = self._fds.get(content.path)
        if fd is None:
            fd = self._fd(content.path)
        data = os.pread(fd, length, content.offset + start)
        if len(data) != length:
            raise ContentError(f"content file {content.path} is shorter than its index says")
        return data

    def read_many(self, ranges: list[tuple[Content, int, int]]) -> list[bytes]:
        """The stored bytes of each (content, start, length), as read() gives them, in
        order: ranges that follow each other closely in one layer file (the tails of
        small files, in tree order) are read by one pread, not one each. (Which ranges one
        pread covers, and cutting them out of it, is C's: _readplan.)"""
        out: list[bytes] = []
        for i, j, first, end in spans(ranges, READ_GAP_MAX, READ_SPAN_MAX, _CONTENT_FIELDS):
            content = ranges[i][0]
            if first < 0:  # read alone, and refused if bad
                out.append(self.read(*ranges[i]))
                continue
            assert content.path is not None
            fd = self._fd(content.path)
            if end > self._sizes[fd]:
                raise ContentError(f"content file {content.path} is shorter than its index says")
            if self.on_bytes is not None:
                self.on_bytes(sum([length for _, _, length in ranges[i:j]]))
            out += self._cut_span(fd, ranges, i, j, first, end)
        return out

    @staticmethod
    def _cut_span(
        fd: int, ranges: list[tuple[Content, int, int]], i: int, j: int, first: int, end: int
    ) -> list[bytes]:
        """Ranges i..j-1, which lie in bytes first..end of the file `fd`, cut out of it.

        The span is mapped, not read: only the ranges are copied (by cut), never the tar
        headers and padding between them, ten times the bytes of a small file's tail (100,000
        small files: 30 ms, where reading spans took 40). A layer file never changes while it
        is read (cache entries are written once, then renamed into place), so the mapping
        cannot lose pages under us. Where a file cannot be mapped, it is read."""
        start = first - first % mmap.ALLOCATIONGRANULARITY
        if end > start:
            try:
                with mmap.mmap(fd, end - start, offset=start, access=mmap.ACCESS_READ) as view:
                    return cut(view, ranges, i, j, start, _CONTENT_FIELDS)
            except (OSError, ValueError):  # a file system without mmap: read it
                pass
        return cut(os.pread(fd, end - first, first), ranges, i, j, first, _CONTENT_FIELDS)

    def read_all(self, content: Content) -> bytes:
        """The file's logical bytes, holes filled with zeros. For small files."""
        if not content.is_sparse:
            return self.read(content)
        out = bytearray(content.size)
        pos = 0
        for ext in content.data_extents():
            out[ext.offset : ext.offset + ext.length] = self.read(content, pos, ext.length)
            pos += ext.length
        return bytes(out)

    def copy(self, content: Content, start: int, length: int, out_fd: int, out_offset: int) -> None:
        """Copy stored bytes [start, start+length) to `out_fd` at `out_offset`."""
        if self.on_bytes is not None:
            self.on_bytes(length)
        pause_point("output-write-midway")
        if content.data is not None:
            written = os.pwrite(out_fd, content.data[start : start + length], out_offset)
            if written != length:
                raise ContentError("short write")
            return
        assert content.path is not None
        in_fd = self._fd(content.path)
        src = content.offset + start
        while length > 0:
            n = min(length, COPY_CHUNK)
            try:
                done = os.copy_file_range(in_fd, out_fd, n, src, out_offset)
            except OSError:
                done = os.pwrite(out_fd, os.pread(in_fd, n, src), out_offset)
            if done <= 0:
                raise ContentError(f"content file {content.path} is shorter than its index says")
            src += done
            out_offset += done
            length -= done

    def write_logical(self, content: Content, out_fd: int, out_offset: int) -> None:
        """Copy the file's data runs to their logical places after `out_offset`,
        leaving holes unwritten (they read back as zeros in a fresh file)."""
        pos = 0
        for ext in content.data_extents():
            self.copy(content, pos, ext.length, out_fd, out_offset + ext.offset)
            pos += ext.length


# What _readplan reads of each range's Content, in its order
_CONTENT_FIELDS = tuple(vars(Content)[name] for name in ("size", "path", "offset", "extents"))
