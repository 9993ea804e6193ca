# (name, type, mode, uid, gid, mtime_ns, size, linkname, devmajor, devminor, offset)
Member = tuple[bytes, bytes, int, int, int, int, int, bytes, int, int, int]

def scan(buf: bytes, pos: int, base: int, /) -> tuple[list[Member], int]: ...
