from typing import Any

# (name, type, mode, uid, gid, mtime_ns, size, linkname, devmajor, devminor, offset)
Member = tuple[bytes, bytes, int, int, int, int, int, bytes, int, int, int]

def scan(buf: bytes, pos: int, base: int, /) -> tuple[list[Member], int]: ...

# cls: tarparse.Entry; fields: its 13 slot descriptors in field order
def scan_entries(
    buf: bytes,
    pos: int,
    base: int,
    entries: list[Any],
    cls: type,
    fields: tuple[Any, ...],
    data_end: int,
    /,
) -> tuple[int, int]: ...
