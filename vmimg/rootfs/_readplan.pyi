from mmap import mmap
from typing import Any

from vmimg.rootfs.tree import Content

def spans(
    ranges: list[tuple[Content, int, int]], gap_max: int, span_max: int, fields: tuple[Any, ...]
) -> list[tuple[int, int, int, int]]: ...
def cut(
    data: bytes | bytearray | memoryview | mmap,
    ranges: list[tuple[Content, int, int]],
    i: int,
    j: int,
    first: int,
    fields: tuple[Any, ...],
) -> list[bytes]: ...
