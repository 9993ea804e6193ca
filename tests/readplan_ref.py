"""vmimg/rootfs/_readplan.c's functions in Python: what ContentReader.read_many did before
they were C's, kept to check the C against (tests/test_content.py)."""

from __future__ import annotations

from vmimg.rootfs.tree import Content

Range = tuple[Content, int, int]


def plain(content: Content, start: int, length: int) -> bool:
    """A range of stored bytes in a layer file: a path, no extents, inside the content."""
    return (
        content.path is not None
        and content.extents is None
        and start >= 0
        and length >= 0
        and start + length <= content.size
    )


def spans(ranges: list[Range], gap_max: int, span_max: int) -> list[tuple[int, int, int, int]]:
    out = []
    i = 0
    while i < len(ranges):
        content, start, length = ranges[i]
        if not plain(content, start, length):
            out.append((i, i + 1, -1, -1))
            i += 1
            continue
        path, first = content.path, content.offset + start
        end = first + length
        j = i + 1
        while j < len(ranges):
            c, s, n = ranges[j]
            at = c.offset + s
            if (
                not plain(c, s, n)
                or c.path != path
                or not 0 <= at - end <= gap_max
                or at + n - first > span_max
            ):
                break
            end = at + n
            j += 1
        out.append((i, j, first, end))
        i = j
    return out


def cut(data: bytes, ranges: list[Range], i: int, j: int, first: int) -> list[bytes]:
    return [data[c.offset + s - first : c.offset + s - first + n] for c, s, n in ranges[i:j]]
